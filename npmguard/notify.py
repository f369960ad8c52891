"""Desktop notifications: exposed tokens, secured tokens, a locked keychain.

On Linux and the BSDs a ``Notifier`` calls ``org.freedesktop.Notifications``
``Notify`` on the D-Bus session bus itself, through jeepney. Connecting and
the call each have a time limit. A missing bus, a missing notification
server or a server that hangs makes ``notify`` return False.

``notify_on_changes`` turns ``DaemonState`` changes into notifications: one
per new exposure, one when it was secured, one when the keychain locks. A
worker thread of its own sends them, because state listeners must return at
once, and it merges bursts (a first scan that finds twenty tokens gives one
notification, not twenty).

Notifications name the file, the line and the registry of a credential,
never its value: ``Exposure`` has no value to give.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from npmguard.commands.common import display_path
from npmguard.daemon.state import DaemonState, Exposure, Snapshot
from npmguard.daemon.worker import Worker

log = logging.getLogger(__name__)

APP_NAME = "npmguard"
URGENCIES = {"low": 0, "normal": 1, "critical": 2}

_BUS_NAME = "org.freedesktop.Notifications"
_OBJECT_PATH = "/org/freedesktop/Notifications"
_INTERFACE = "org.freedesktop.Notifications"
# D-Bus errors returned when no notification server is on the bus.
_NO_SERVER_ERRORS = frozenset(
    {
        "org.freedesktop.DBus.Error.ServiceUnknown",
        "org.freedesktop.DBus.Error.NameHasNoOwner",
        "org.freedesktop.DBus.Error.Spawn.ServiceNotFound",
        "org.freedesktop.DBus.Error.Spawn.ChildExited",
    }
)


class NotifyUnavailable(Exception):
    """Raised when a notification cannot be shown.

    The message gives the reason, never the notification's content.
    """


Transport = Callable[[str, str, str, int, float], None]


def _freedesktop_transport(
    app_name: str, summary: str, body: str, urgency: int, timeout: float
) -> None:
    """Send one ``Notify`` call on the session bus, or raise NotifyUnavailable."""
    # Imported here: jeepney is only needed on desktops with D-Bus, and the
    # CLI commands should not pay for the import. keyring brings it on Linux
    # only, so on the BSDs it may be missing.
    try:
        from jeepney import (  # type: ignore[import-untyped]
            DBusAddress,
            HeaderFields,
            MessageType,
            new_method_call,
        )
        from jeepney.io.blocking import (  # type: ignore[import-untyped]
            open_dbus_connection,
        )
    except ImportError:
        raise NotifyUnavailable("the jeepney package is not installed") from None

    if not os.environ.get("DBUS_SESSION_BUS_ADDRESS"):
        # jeepney has no fallback to $XDG_RUNTIME_DIR/bus, and a guessed
        # socket could belong to another session's bus.
        raise NotifyUnavailable("no D-Bus session bus (DBUS_SESSION_BUS_ADDRESS unset)")
    target = DBusAddress(_OBJECT_PATH, bus_name=_BUS_NAME, interface=_INTERFACE)
    # NOTE: bodies are sent as plain text. A server that renders body markup
    # misreads a '<' or '&' in a path. Such paths are rare, so the
    # GetCapabilities round trip that would detect markup is not made.
    message = new_method_call(
        target,
        "Notify",
        "susssasa{sv}i",
        (
            app_name,
            0,
            "",
            summary,
            body,
            [],
            {"urgency": ("y", urgency)},
            -1,
        ),
    )
    try:
        # auth_timeout limits connecting and authentication. NOTE: jeepney
        # sends the Hello call after that without a limit. The bus daemon
        # replies to Hello itself, so only a bus that hangs right after
        # authentication could block here.
        connection = open_dbus_connection(bus="SESSION", auth_timeout=timeout)
    except (OSError, TimeoutError, ValueError, RuntimeError) as err:
        raise NotifyUnavailable(
            f"cannot connect to the D-Bus session bus: {type(err).__name__}"
        ) from None
    try:
        reply = connection.send_and_get_reply(message, timeout=timeout)
    except TimeoutError:
        raise NotifyUnavailable(
            f"the notification server timed out after {timeout:g} s"
        ) from None
    except OSError as err:
        raise NotifyUnavailable(
            f"the session bus connection failed: {type(err).__name__}"
        ) from None
    finally:
        connection.close()
    if reply.header.message_type == MessageType.error:
        name = str(reply.header.fields.get(HeaderFields.error_name, "unknown"))
        if name in _NO_SERVER_ERRORS:
            raise NotifyUnavailable("no notification server on the session bus")
        raise NotifyUnavailable(f"the notification server returned {name}")


def _transport_for(platform: str) -> Transport | None:
    """Return how this platform shows notifications (decided only here)."""
    if platform in ("darwin", "win32"):
        # A no-op for now: macOS needs UNUserNotificationCenter (through
        # pyobjc) and Windows a toast through WinRT, and the Linux CI can test
        # neither. On Windows the Status item falls back to pystray's notify().
        return None
    return _freedesktop_transport


class Notifier:
    """A sender of desktop notifications.

    ``notify`` returns False when a notification cannot be shown. The reason
    is logged once, as a warning, until a notification succeeds again, so a
    desktop without a notification server does not fill the log.
    """

    def __init__(
        self,
        app_name: str = APP_NAME,
        *,
        timeout: float = 1.0,
        platform: str = sys.platform,
    ) -> None:
        self.app_name = app_name
        self.timeout = timeout
        self._transport = _transport_for(platform)
        self._lock = threading.Lock()
        self._failing = False

    @property
    def supported(self) -> bool:
        """False on platforms where notifications are a no-op stub."""
        return self._transport is not None

    def notify(self, summary: str, body: str, urgency: str = "normal") -> bool:
        """Show a notification; return whether a server accepted it."""
        if urgency not in URGENCIES:
            raise ValueError(
                f"urgency must be one of {', '.join(URGENCIES)}, not {urgency!r}"
            )
        if self._transport is None:
            self._note_failure("desktop notifications are not implemented here yet")
            return False
        try:
            self._transport(
                self.app_name, summary, body, URGENCIES[urgency], self.timeout
            )
        except NotifyUnavailable as err:
            self._note_failure(str(err))
            return False
        except Exception:  # noqa: BLE001 - a notification must never stop the daemon
            log.exception("sending a notification failed")
            return False
        with self._lock:
            recovered, self._failing = self._failing, False
        if recovered:
            log.info("desktop notifications work again")
        log.debug("notification shown: %s", summary)
        return True

    def _note_failure(self, reason: str) -> None:
        with self._lock:
            first, self._failing = not self._failing, True
        if first:
            log.warning("desktop notifications are off: %s", reason)


# --------------------------------------------------------------------------
# State changes to notifications

EXPOSED_EVENT = "exposed"
SECURED_EVENT = "secured"
LOCKED_EVENT = "locked"
# Raw observations that the sender pairs up into SECURED_EVENT messages.
VANISHED_EVENT = "vanished"
CREDIT_EVENT = "credit"


@dataclass(frozen=True)
class Event:
    kind: str
    exposure: Exposure | None = None
    at: float = field(default_factory=time.monotonic)


def exposure_key(exposure: Exposure) -> tuple[object, ...]:
    """Return the identity of an exposure: its place and value, not its line."""
    value = exposure.fingerprint if exposure.fingerprint else exposure.line
    return (exposure.path, exposure.registry, exposure.kind, value)


def where(exposure: Exposure) -> str:
    """Return where an exposure is: ``~/.npmrc:3, registry //registry.npmjs.org/``."""
    registry = exposure.registry or "the default registry"
    return f"{display_path(Path(exposure.path))}:{exposure.line}, registry {registry}"


@dataclass(frozen=True)
class Message:
    summary: str
    body: str
    urgency: str


_LISTED = 3


def _listing(exposures: list[Exposure], unnamed: int = 0) -> str:
    lines = [where(e) for e in exposures[:_LISTED]]
    more = len(exposures) - len(lines) + unnamed
    if more:
        lines.append(f"and {more} more")
    return "\n".join(lines)


def compose(kind: str, exposures: list[Exposure], unnamed: int = 0) -> Message:
    """Build the notification for events of one kind.

    ``unnamed`` counts secured tokens whose file the state did not name.
    """
    count = len(exposures) + unnamed
    if kind == LOCKED_EVENT:
        return Message(
            "Keychain locked",
            "npmguard cannot secure or hand out npm tokens until it is unlocked.",
            "normal",
        )
    if kind == EXPOSED_EVENT:
        summary = (
            "Exposed npm token found"
            if count == 1
            else f"{count} exposed npm tokens found"
        )
        # The guardian lists an ``auto`` file only while paused or after
        # securing it failed, so the advice is the same for every policy.
        advice = "Choose Secure now in the tray menu or run `npmguard secure`."
        return Message(summary, f"{_listing(exposures)}\n{advice}", "critical")
    if kind == SECURED_EVENT:
        summary = "npm token secured" if count == 1 else f"{count} npm tokens secured"
        if exposures:
            body = f"{_listing(exposures, unnamed)}\nnow in the keychain"
        else:
            files = (
                "a watched npm config file"
                if count == 1
                else "watched npm config files"
            )
            body = f"Moved from {files} into the keychain."
        return Message(summary, body, "normal")
    raise ValueError(f"unknown notification kind {kind!r}")


class ChangeNotifier(Worker):
    """A worker that sends notifications for ``DaemonState`` changes.

    ``on_change`` is the state listener: it only works out what changed and
    queues it. ``run`` waits ``settle`` seconds after a first event to
    collect the rest of a burst, then sends one notification per kind. At
    most ``burst`` notifications go out per ``per_seconds``. Events that
    arrive while that budget is spent wait and are merged into the next one.

    The snapshot counts secured tokens (``secured_count``) without naming
    them. The guardian raises the count and drops the exposure in two
    updates, so the sender pairs each count step with an exposure that went
    away within ``match_seconds`` of it, oldest first. A step left without a
    partner (the ``auto`` policy secures before anything is exposed) gives
    an "npm token secured" without a file. An exposure that went away
    without a step (deleted by hand) gives no message.
    """

    name = "notify"

    def __init__(
        self,
        notifier: Notifier,
        *,
        settle: float = 0.2,
        burst: int = 3,
        per_seconds: float = 30.0,
        match_seconds: float = 3.0,
    ) -> None:
        super().__init__()
        self.notifier = notifier
        self.settle = settle
        self.burst = burst
        self.per_seconds = per_seconds
        self.match_seconds = match_seconds
        self._events: queue.SimpleQueue[Event | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        # Exposures already announced and not secured since. Seeing one of
        # these again is not news.
        self._notified: set[tuple[object, ...]] = set()
        self._present: dict[tuple[object, ...], Exposure] = {}
        # None until the first snapshot, whose count is the baseline: tokens
        # secured before this notifier started are not news.
        self._secured_count: int | None = None
        self._locked = False
        self._sends: list[float] = []

    # ---- the listener side

    def on_change(self, before: Snapshot, after: Snapshot) -> None:
        """Queue the news in ``after``; as a DaemonState listener it must not block."""
        if self.stopping.is_set():
            return
        for event in self._diff(after):
            self._events.put(event)

    def _diff(self, snapshot: Snapshot) -> list[Event]:
        # Compared with what this notifier saw last, not with ``before``,
        # because listeners of updates from two threads may run in any order.
        events: list[Event] = []
        with self._lock:
            now = {exposure_key(e): e for e in snapshot.exposures}
            for key, exposure in sorted(self._present.items(), key=_by_place):
                if key not in now:
                    events.append(Event(VANISHED_EVENT, exposure))
            if self._secured_count is None:
                self._secured_count = snapshot.secured_count
            steps = max(0, snapshot.secured_count - self._secured_count)
            events += [Event(CREDIT_EVENT) for _ in range(steps)]
            for key, exposure in sorted(now.items(), key=_by_place):
                if key not in self._notified:
                    self._notified.add(key)
                    events.append(Event(EXPOSED_EVENT, exposure))
            self._present = now
            self._secured_count = max(self._secured_count, snapshot.secured_count)
            if snapshot.vault_locked and not self._locked:
                events.append(Event(LOCKED_EVENT))
            self._locked = snapshot.vault_locked
        return events

    # ---- the sender side

    def stop(self) -> None:
        super().stop()
        self._events.put(None)

    def run(self) -> None:
        pending: list[Event] = []
        while True:
            # Blocks until an event, the stop sentinel, or the moment held
            # events can go out (budget) or be settled (pairing).
            event = self._get(self._next_wake(pending))
            if self.stopping.is_set():
                break
            if event is not None:
                pending.append(event)
                pending.extend(self._collect_burst())
            if pending and self._until_budget() == 0:
                pending = self._send(pending)
        held = [e for e in pending if e.kind not in (VANISHED_EVENT, CREDIT_EVENT)]
        if held:
            log.info("dropped %d notification(s) still held back at stop", len(held))

    def _get(self, timeout: float | None) -> Event | None:
        try:
            return self._events.get(
                timeout=None if timeout is None else max(timeout, 0.0)
            )
        except queue.Empty:
            return None

    def _next_wake(self, pending: list[Event]) -> float | None:
        if not pending:
            return None
        wait = self._until_budget()
        if wait > 0:
            return wait
        oldest = min(e.at for e in pending)
        return max(0.01, oldest + self.match_seconds - time.monotonic())

    def _collect_burst(self) -> list[Event]:
        events: list[Event] = []
        deadline = time.monotonic() + self.settle
        while not self.stopping.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            event = self._get(left)
            if event is not None:
                events.append(event)
        return events

    def _until_budget(self) -> float:
        """Return the seconds until another notification may go out (0: now)."""
        now = time.monotonic()
        self._sends = [t for t in self._sends if now - t < self.per_seconds]
        if len(self._sends) < self.burst:
            return 0.0
        return self._sends[0] + self.per_seconds - now

    def _pair(self, pending: list[Event]) -> list[Event]:
        """Turn count steps and vanished exposures into SECURED_EVENTs."""
        steps = [e for e in pending if e.kind == CREDIT_EVENT]
        gone = [e for e in pending if e.kind == VANISHED_EVENT]
        rest = [e for e in pending if e.kind not in (CREDIT_EVENT, VANISHED_EVENT)]
        pairs = min(len(steps), len(gone))
        secured = [Event(SECURED_EVENT, e.exposure) for e in gone[:pairs]]
        with self._lock:
            for event in secured:
                assert event.exposure is not None
                # Secured, so the same value showing up again is news.
                self._notified.discard(exposure_key(event.exposure))
        expired = time.monotonic() - self.match_seconds
        for step in steps[pairs:]:
            if step.at <= expired:
                secured.append(Event(SECURED_EVENT))
            else:
                rest.append(step)
        rest += [e for e in gone[pairs:] if e.at > expired]
        return rest + secured

    def _send(self, pending: list[Event]) -> list[Event]:
        """Send what the budget allows, one notification per kind; return the rest."""
        pending = self._pair(pending)
        # An exposure found and secured in one batch (the ``auto`` policy)
        # gets only the "secured" message, which implies it was found.
        secured = {
            exposure_key(e.exposure)
            for e in pending
            if e.kind == SECURED_EVENT and e.exposure is not None
        }
        pending = [
            e
            for e in pending
            if not (
                e.kind == EXPOSED_EVENT
                and e.exposure is not None
                and exposure_key(e.exposure) in secured
            )
        ]
        for kind in (EXPOSED_EVENT, SECURED_EVENT, LOCKED_EVENT):
            batch = [e for e in pending if e.kind == kind]
            if not batch:
                continue
            if self._until_budget() > 0 or self.stopping.is_set():
                break
            named = _unique(e.exposure for e in batch if e.exposure is not None)
            unnamed = sum(1 for e in batch if e.exposure is None)
            if kind == LOCKED_EVENT:
                unnamed = 0
            message = compose(kind, named, unnamed)
            self._sends.append(time.monotonic())
            self.notifier.notify(message.summary, message.body, message.urgency)
            pending = [e for e in pending if e.kind != kind]
        return pending


def _by_place(item: tuple[tuple[object, ...], Exposure]) -> tuple[str, int]:
    return (item[1].path, item[1].line)


def _unique(exposures: Iterable[Exposure]) -> list[Exposure]:
    seen: dict[tuple[object, ...], Exposure] = {}
    for exposure in exposures:
        seen.setdefault(exposure_key(exposure), exposure)
    return list(seen.values())


def notify_on_changes(
    state: DaemonState, notifier: Notifier, **options: Any
) -> ChangeNotifier:
    """Start notifying about ``state``'s changes and return the started worker.

    Exposures already in the snapshot count as new, so the first scan's
    findings are announced whether it ran before or after this call. The
    caller stops the worker with ``stop()`` and ``join()``.
    """
    worker = ChangeNotifier(notifier, **options)
    state.subscribe(worker.on_change)
    worker.on_change(Snapshot(), state.snapshot)
    worker.start()
    return worker
