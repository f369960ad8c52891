"""Desktop notifications: exposed tokens, secured tokens, a locked keychain,
stored tokens that leaked, and the rotations of the token lifecycle.

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
never its value: ``Exposure`` and ``Leak`` have no value to give.

Actions: a notification may offer buttons (``actions``: key and label).
They need a bus connection that stays open, because the server reports a
chosen button with an ``ActionInvoked`` signal for the connection that sent
the notification. A ``Notifier`` made with ``on_action`` keeps one such
connection (``ActionChannel``, a worker) from its first notification with
actions until ``close``, and calls ``on_action(key)`` on that worker's
thread. Only signals from the server that showed the notification, about a
notification and key it offered, are passed on. Without ``on_action`` the
buttons are left out, and the body names the command to run in any case.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from npmguard.commands.common import display_path
from npmguard.daemon.state import DaemonState, Exposure, Leak, Snapshot
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
Actions = Sequence[tuple[str, str]]


def _jeepney() -> Any:
    """Import jeepney, or raise NotifyUnavailable."""
    # Imported here: jeepney is only needed on desktops with D-Bus, and the
    # CLI commands should not pay for the import. keyring brings it on Linux
    # only, so on the BSDs it may be missing.
    try:
        import jeepney  # type: ignore[import-untyped]
    except ImportError:
        raise NotifyUnavailable("the jeepney package is not installed") from None
    if not os.environ.get("DBUS_SESSION_BUS_ADDRESS"):
        # jeepney has no fallback to $XDG_RUNTIME_DIR/bus, and a guessed
        # socket could belong to another session's bus.
        raise NotifyUnavailable("no D-Bus session bus (DBUS_SESSION_BUS_ADDRESS unset)")
    return jeepney


def _notify_message(
    app_name: str, summary: str, body: str, urgency: int, actions: Actions = ()
) -> Any:
    """Build the ``Notify`` method call; ``actions`` are (key, label) pairs."""
    jeepney = _jeepney()
    target = jeepney.DBusAddress(
        _OBJECT_PATH, bus_name=_BUS_NAME, interface=_INTERFACE
    )
    # NOTE: bodies are sent as plain text. A server that renders body markup
    # misreads a '<' or '&' in a path. Such paths are rare, so the
    # GetCapabilities round trip that would detect markup is not made.
    flat = [text for pair in actions for text in pair]
    return jeepney.new_method_call(
        target,
        "Notify",
        "susssasa{sv}i",
        (
            app_name,
            0,
            "",
            summary,
            body,
            flat,
            {"urgency": ("y", urgency)},
            -1,
        ),
    )


def _check_reply(reply: Any) -> None:
    """Raise NotifyUnavailable when ``reply`` is a D-Bus error."""
    from jeepney import HeaderFields, MessageType

    if reply.header.message_type == MessageType.error:
        name = str(reply.header.fields.get(HeaderFields.error_name, "unknown"))
        if name in _NO_SERVER_ERRORS:
            raise NotifyUnavailable("no notification server on the session bus")
        raise NotifyUnavailable(f"the notification server returned {name}")


def _freedesktop_transport(
    app_name: str, summary: str, body: str, urgency: int, timeout: float
) -> None:
    """Send one ``Notify`` call on the session bus, or raise NotifyUnavailable."""
    message = _notify_message(app_name, summary, body, urgency)
    from jeepney.io.blocking import (  # type: ignore[import-untyped]
        open_dbus_connection,
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
    _check_reply(reply)


# Notifications whose actions are remembered; older ones are forgotten.
_OFFERED_LIMIT = 64


class ActionChannel(Worker):
    """A session bus connection that stays open to hear chosen actions.

    ``send`` shows a notification with actions on this connection and
    remembers its id and keys. The thread waits for ``ActionInvoked``
    signals. It calls ``on_action(key)`` for a signal from the server that
    showed the notification, naming a key it offered, and logs a callback
    that raises. ``stop`` and ``join`` close the connection.
    """

    name = "notify-actions"

    def __init__(self, on_action: Callable[[str], None], *, timeout: float = 1.0
                 ) -> None:
        super().__init__()
        self.on_action = on_action
        self.timeout = timeout
        self._lock = threading.Lock()
        self._router: Any = None
        self._connection: Any = None
        self._filter: Any = None
        # Unbounded, so that the stop sentinel always fits. The thread only
        # compares a signal with what it offered, so it keeps up.
        self._signals: queue.Queue[Any] = queue.Queue()
        # notification id -> (the server's unique bus name, offered keys)
        self._offered: dict[int, tuple[str, frozenset[str]]] = {}

    def send(
        self, app_name: str, summary: str, body: str, urgency: int, actions: Actions
    ) -> None:
        """Show a notification with ``actions``, or raise NotifyUnavailable."""
        from jeepney import HeaderFields

        message = _notify_message(app_name, summary, body, urgency, actions)
        router = self._connect()
        try:
            reply = router.send_and_get_reply(message, timeout=self.timeout)
        except (TimeoutError, concurrent.futures.TimeoutError):
            raise NotifyUnavailable(
                f"the notification server timed out after {self.timeout:g} s"
            ) from None
        except Exception as err:  # noqa: BLE001 - RouterClosed, OSError: reconnect
            self._disconnect()
            raise NotifyUnavailable(
                f"the session bus connection failed: {type(err).__name__}"
            ) from None
        _check_reply(reply)
        sender = str(reply.header.fields.get(HeaderFields.sender, ""))
        with self._lock:
            self._offered[int(reply.body[0])] = (
                sender, frozenset(key for key, _ in actions)
            )
            while len(self._offered) > _OFFERED_LIMIT:
                del self._offered[next(iter(self._offered))]

    def _connect(self) -> Any:
        with self._lock:
            if self._router is not None:
                return self._router
            from jeepney import MatchRule, message_bus
            from jeepney.io.threading import DBusRouter, open_dbus_connection

            try:
                connection = open_dbus_connection(bus="SESSION",
                                                  auth_timeout=self.timeout)
            except (OSError, TimeoutError, ValueError, RuntimeError) as err:
                raise NotifyUnavailable(
                    f"cannot connect to the D-Bus session bus: {type(err).__name__}"
                ) from None
            router = DBusRouter(connection)
            rule = MatchRule(type="signal", interface=_INTERFACE, path=_OBJECT_PATH)
            self._filter = router.filter(rule, queue=self._signals)
            try:
                router.send_and_get_reply(message_bus.AddMatch(rule),
                                          timeout=self.timeout)
            except Exception as err:  # noqa: BLE001 - closed below, then reported
                self._close(router, connection)
                raise NotifyUnavailable(
                    f"cannot listen for notification actions: {type(err).__name__}"
                ) from None
            self._router, self._connection = router, connection
            return router

    def _disconnect(self) -> None:
        with self._lock:
            router, connection = self._router, self._connection
            self._router = self._connection = None
        if router is not None:
            self._close(router, connection)

    def _close(self, router: Any, connection: Any) -> None:
        if self._filter is not None:
            self._filter.close()
            self._filter = None
        try:
            router.close()
            connection.close()
        except Exception:  # noqa: BLE001 - closing a broken connection
            log.debug("closing the notification actions connection failed",
                      exc_info=True)

    def stop(self) -> None:
        super().stop()
        self._signals.put(None)

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                message = self._signals.get()
                if message is None or self.stopping.is_set():
                    return
                self._handle(message)
        finally:
            self._disconnect()

    def _handle(self, message: Any) -> None:
        from jeepney import HeaderFields

        fields = message.header.fields
        member = fields.get(HeaderFields.member)
        sender = str(fields.get(HeaderFields.sender, ""))
        if member == "NotificationClosed":
            with self._lock:
                offered = self._offered.get(int(message.body[0]))
                if offered is not None and offered[0] == sender:
                    del self._offered[int(message.body[0])]
            return
        if member != "ActionInvoked":
            return
        notification, key = int(message.body[0]), str(message.body[1])
        with self._lock:
            offered = self._offered.get(notification)
            if offered is None or offered[0] != sender or key not in offered[1]:
                log.debug("ignored an action signal for notification %d",
                          notification)
                return
            del self._offered[notification]
        log.info("notification action chosen: %s", key)
        try:
            self.on_action(key)
        except Exception:  # noqa: BLE001 - a failing action must not end the thread
            log.exception("the notification action %s failed", key)


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
        on_action: Callable[[str], None] | None = None,
    ) -> None:
        self.app_name = app_name
        self.timeout = timeout
        self._transport = _transport_for(platform)
        self._lock = threading.Lock()
        self._failing = False
        self.on_action = on_action
        self._channel: ActionChannel | None = None
        self._closed = False

    @property
    def supported(self) -> bool:
        """False on platforms where notifications are a no-op stub."""
        return self._transport is not None

    @property
    def actions_supported(self) -> bool:
        """Tell whether buttons are offered: it takes the freedesktop server and
        ``on_action``."""
        return self.on_action is not None and self._transport is _freedesktop_transport

    def notify(
        self, summary: str, body: str, urgency: str = "normal", actions: Actions = ()
    ) -> bool:
        """Show a notification and return whether a server accepted it.

        ``actions`` are (key, label) pairs, offered as buttons where
        ``actions_supported``, and dropped elsewhere.
        """
        if urgency not in URGENCIES:
            raise ValueError(
                f"urgency must be one of {', '.join(URGENCIES)}, not {urgency!r}"
            )
        if self._transport is None:
            self._note_failure("desktop notifications are not implemented here yet")
            return False
        try:
            channel = self._action_channel() if actions else None
            if channel is not None:
                channel.send(self.app_name, summary, body, URGENCIES[urgency],
                             actions)
            else:
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

    def _action_channel(self) -> ActionChannel | None:
        if not self.actions_supported or self.on_action is None:
            return None
        with self._lock:
            if self._closed:
                return None
            if self._channel is None:
                channel = ActionChannel(self.on_action, timeout=self.timeout)
                channel.start()
                self._channel = channel
            return self._channel

    def close(self, timeout: float = 0.5) -> None:
        """Stop listening for actions. Later notifications have no buttons."""
        with self._lock:
            channel, self._channel = self._channel, None
            self._closed = True
        if channel is not None:
            channel.stop()
            if not channel.join(timeout):
                log.warning("the notification actions listener did not stop "
                            "within %.1f s", timeout)


# --------------------------------------------------------------------------
# State changes to notifications

EXPOSED_EVENT = "exposed"
SECURED_EVENT = "secured"
LOCKED_EVENT = "locked"
LEAKED_EVENT = "leaked"
# The action a leak notification offers, and its button.
ROTATE_EXPOSED_ACTION = "rotate-exposed"
ROTATE_EXPOSED_LABEL = "Rotate and revoke"
# Raw observations that the sender pairs up into SECURED_EVENT messages.
VANISHED_EVENT = "vanished"
CREDIT_EVENT = "credit"


@dataclass(frozen=True)
class Event:
    kind: str
    exposure: Exposure | None = None
    at: float = field(default_factory=time.monotonic)
    leak: Leak | None = None


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
    actions: tuple[tuple[str, str], ...] = ()


_LISTED = 3


def _listing(exposures: list[Exposure], unnamed: int = 0) -> str:
    lines = [where(e) for e in exposures[:_LISTED]]
    more = len(exposures) - len(lines) + unnamed
    if more:
        lines.append(f"and {more} more")
    return "\n".join(lines)


def compose(
    kind: str,
    exposures: list[Exposure],
    unnamed: int = 0,
    leaks: Sequence[Leak] = (),
) -> Message:
    """Build the notification for events of one kind.

    ``unnamed`` counts secured tokens whose file the state did not name.
    """
    if kind == LEAKED_EVENT:
        return _leak_message(list(leaks))
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


def _leak_message(leaks: list[Leak]) -> Message:
    summary = (
        "Stored npm token exposed"
        if len(leaks) == 1
        else f"{len(leaks)} stored npm tokens exposed"
    )
    lines = [
        f"{leak.registry} (fingerprint {leak.fingerprint}): {leak.reason}"
        for leak in leaks[:_LISTED]
    ]
    if len(leaks) > _LISTED:
        lines.append(f"and {len(leaks) - _LISTED} more")
    lines.append(
        "Rotate and revoke it: choose Rotate exposed tokens in the tray menu or "
        "run `npmguard rotate --exposed`."
    )
    return Message(
        summary, "\n".join(lines), "critical",
        ((ROTATE_EXPOSED_ACTION, ROTATE_EXPOSED_LABEL),),
    )


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
        # Leaks already announced, by (vault name, fingerprint).
        self._leaks: set[tuple[str, str]] = set()
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
            leaks = {(leak.name, leak.fingerprint): leak for leak in snapshot.leaks}
            for key, leak in sorted(leaks.items()):
                if key not in self._leaks:
                    events.append(Event(LEAKED_EVENT, leak=leak))
            # A leak that was rotated and comes back is news again.
            self._leaks = set(leaks)
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
        self.notifier.close()

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
        for kind in (LEAKED_EVENT, EXPOSED_EVENT, SECURED_EVENT, LOCKED_EVENT):
            batch = [e for e in pending if e.kind == kind]
            if not batch:
                continue
            if self._until_budget() > 0 or self.stopping.is_set():
                break
            named = _unique(e.exposure for e in batch if e.exposure is not None)
            unnamed = sum(1 for e in batch if e.exposure is None)
            if kind in (LOCKED_EVENT, LEAKED_EVENT):
                unnamed = 0
            leaks = [e.leak for e in batch if e.leak is not None]
            message = compose(kind, named, unnamed, leaks)
            self._sends.append(time.monotonic())
            self.notifier.notify(message.summary, message.body, message.urgency,
                                 message.actions)
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
