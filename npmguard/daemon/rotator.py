"""The daemon's side of the token lifecycle: scheduled rotation and reminders.

``RotationWorker`` is a worker with one thread. At start and then every
``interval`` seconds it runs a cycle:

1. finish or undo rotations a killed run left (``Rotator.recover``);
2. rotate each stored token whose scheduled rotation is due
   (``rotation.due`` with the registry's ``rotate_days``), unattended;
3. remind the user of what it cannot do alone. That is a due rotation
   that needs the account password (none stored) or a one-time code, and
   a token older than ``remind_days`` of a registry that cannot rotate at
   all (GitHub Packages, unknown ones). A reminder is a desktop
   notification and an audit ``reminder`` record, at most once per token
   and day. ``reminders.json`` in the state directory keeps the times
   across restarts.

A rotation that fails before the new token is stored leaves the old one
in use, and one that fails to revoke the old token leaves a journal entry
for the next cycle (``rotation.py`` sees to both). The worker lists the
failure in the state's ``rotation_failures`` (the tray shows "rotation
failed"), and sends one notification per streak of failures. It tries
that token again only after a back-off that doubles each time, so a
registry that is down is not hammered.

The same thread serves requested rotations: the socket's ``rotate`` op
and the tray's "Rotate exposed tokens". One thread for all of them keeps
two rotations of one token from racing; ``rotation_lock`` keeps the CLI
out as well.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from npmguard.config import Settings
from npmguard.daemon.state import DaemonState, RotationFailure
from npmguard.daemon.worker import Worker
from npmguard.errors import NpmguardError
from npmguard.logsetup import REDACTOR
from npmguard.vault.base import CredentialStore, LazyStore

log = logging.getLogger(__name__)

# How often a cycle runs. Scheduled rotation counts in days, so a few
# minutes is precise enough and costs one index read per cycle.
CHECK_SECONDS = 300.0
# The wait after a first failure. It doubles per failure up to the maximum.
BACKOFF_SECONDS = 900.0
BACKOFF_MAX_SECONDS = 86400.0
# A reminder about one token is repeated at most this often.
REMIND_SECONDS = 86400.0
# How long a ``rotate`` request waits for its rotations before it replies
# "still running". The rotations go on in the worker.
REPLY_SECONDS = 25.0
REMINDERS_FILE = "reminders.json"

ProviderFor = Callable[[Any], Any]
Notify = Callable[[str, str, str], object]


@dataclass
class _Job:
    """A requested rotation. ``done`` is set when ``results`` are final."""

    registry: str | None
    exposed: bool
    origin: str  # "socket" or "tray"
    done: threading.Event = field(default_factory=threading.Event)
    results: list[dict[str, Any]] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    error: str | None = None


_CYCLE = "cycle"
_REFRESH = "refresh"


class RotationWorker(Worker):
    """Runs scheduled rotations, reminders and requested rotations.

    ``store_factory`` opens the vault the rotations use (the daemon passes
    its own store, not the cached view, so that a value written is read
    back from the keychain). ``invalidate`` drops the daemon's cached
    copies after a new token is stored. ``notify(summary, body, urgency)``
    shows a desktop notification; ``provider_for(entry)`` and ``clock``
    are there for tests that inject a fault.
    """

    name = "rotator"

    def __init__(
        self,
        settings: Settings,
        state: DaemonState,
        store_factory: Callable[[], CredentialStore],
        *,
        notify: Notify | None = None,
        invalidate: Callable[[], None] = lambda: None,
        provider_for: ProviderFor | None = None,
        interval: float = CHECK_SECONDS,
        backoff: float = BACKOFF_SECONDS,
        backoff_max: float = BACKOFF_MAX_SECONDS,
        remind_every: float = REMIND_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.state = state
        self.store = LazyStore(store_factory)
        self.notify = notify
        self.invalidate = invalidate
        self.interval = interval
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.remind_every = remind_every
        self.clock = clock
        self._provider_for = provider_for
        self._urls: dict[str, str] = {}
        self._queue: queue.SimpleQueue[_Job | str | None] = queue.SimpleQueue()
        # Per vault name: failures in a row and when to try again (clock).
        self._failures: dict[str, int] = {}
        self._retry_at: dict[str, float] = {}
        # Tokens whose rotation needs the user (a password or one-time
        # code), by vault name -> fingerprint: not tried again until the
        # token changes.
        self._needs_user: dict[str, str] = {}
        self._logged: set[tuple[str, str]] = set()
        self.cycles = 0
        self.cycled = threading.Event()

    # --- the interface for the daemon ----------------------------------------

    def stop(self) -> None:
        super().stop()
        self._queue.put(None)

    def check_now(self) -> None:
        """Run a cycle soon, as after a settings or index change."""
        self._queue.put(_CYCLE)

    def refresh(self) -> None:
        """Publish the index's exposed tokens and drop stale failures."""
        self._queue.put(_REFRESH)

    def request(
        self, registry: str | None, *, exposed: bool, origin: str = "socket"
    ) -> _Job:
        """Queue a rotation like ``npmguard rotate`` and return the job, whose
        ``done`` event is set when it has run."""
        job = _Job(registry, exposed, origin)
        if self.stopping.is_set() or not self.alive():
            job.error = "the daemon's rotator is not running"
            job.done.set()
        else:
            self._queue.put(job)
        return job

    def rotate_exposed(self) -> None:
        """Queue a rotation like ``npmguard rotate --exposed``, for the tray's
        "Rotate exposed tokens"."""
        self.request(None, exposed=True, origin="tray")

    # --- the thread --------------------------------------------------------

    def run(self) -> None:
        next_cycle = time.monotonic()
        while not self.stopping.is_set():
            wait = max(0.0, next_cycle - time.monotonic())
            try:
                item = self._queue.get(timeout=wait)
            except queue.Empty:
                item = _CYCLE
            if item is None or self.stopping.is_set():
                self._cancel_queued()
                return
            if item == _CYCLE:
                self._guarded("the scheduled rotation check", self.cycle)
                next_cycle = time.monotonic() + self.interval
            elif item == _REFRESH:
                self._guarded("refreshing the exposed tokens", self._refresh)
            elif isinstance(item, _Job):
                try:
                    self._guarded("a requested rotation", self._serve, item)
                finally:
                    item.done.set()

    def _cancel_queued(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Job):
                item.error = "the daemon stopped before the rotation ran"
                item.done.set()

    def _guarded(self, what: str, function: Callable[..., object],
                 *args: object) -> None:
        try:
            function(*args)
        except Exception:  # noqa: BLE001 - logged; the next cycle runs anyway
            log.exception("%s failed", what)

    # --- one cycle ---------------------------------------------------------

    def cycle(self) -> None:
        """Recover, then rotate what is due and remind what needs the user."""
        try:
            self._cycle()
        finally:
            self.cycles += 1
            self.cycled.set()

    def _cycle(self) -> None:
        from npmguard import lifecycle, rotation

        self._recover()
        self.state.refresh_leaks()
        try:
            entries = lifecycle.managed(tokens_only=True)
        except NpmguardError as err:
            # A damaged index is the user's to fix, and every command reports
            # it, so this is one line instead of a traceback per check.
            self._once("index", str(err), "not checking scheduled rotations: %s",
                       err)
            return
        self._urls = _configured_urls()
        now = self.clock()
        pending = rotation.pending_names()
        due = {e.name for e in rotation.due(entries, self._rotate_days, now)}
        for entry in entries:
            if self.stopping.is_set():
                return
            try:
                self._consider(entry, entry.name in due, entry.name in pending, now)
            except Exception:  # noqa: BLE001 - one token must not stop the rest
                log.exception("checking the token for %s failed", entry.registry)
        self._drop_stale(entries)

    def _rotate_days(self, entry: Any) -> float:
        return self.settings.for_registry(entry.registry).rotate_days

    def _recover(self) -> None:
        from npmguard.rotation import RotationBusyError

        try:
            # Rotator.recover logs what it finished at INFO.
            messages = self._rotator().recover()
        except RotationBusyError:
            log.debug("another process is rotating; recovery waits for the next "
                      "check")
            return
        except (NpmguardError, OSError) as err:
            self._once("recover", str(err), "could not finish an interrupted "
                       "rotation: %s", REDACTOR.redact(str(err)))
            return
        for message in messages:
            if message.startswith("could not"):
                self._once("recover", message, "%s", message)

    def _consider(self, entry: Any, due: bool, pending: bool, now: float) -> None:
        settings = self.settings.for_registry(entry.registry)
        try:
            provider = self.provider_for(entry)
        except (NpmguardError, ValueError) as err:
            self._once(entry.name, f"provider: {err}", "cannot tell what %s allows "
                       "(%s); not rotating it", entry.registry, err)
            return
        caps = provider.capabilities
        if not caps.rotate:
            age = entry.age_days(now)
            if settings.remind_days > 0 and age is not None and (
                age >= settings.remind_days
            ):
                what_to_do = caps.note.split(";")[0].rstrip(".")
                self._remind(
                    entry, "old", now,
                    f"npm token for {entry.registry} is {int(age)} days old",
                    f"{what_to_do}.\nThen store it with `npmguard login --registry "
                    f"{entry.url(self._urls)} --token-stdin`.",
                    reason=f"{int(age)} days old; the registry cannot rotate it",
                )
            return
        if not due or pending:
            return
        if self._needs_user.get(entry.name) == entry.fingerprint:
            self._remind_due(entry, now)
            return
        if self._retry_at.get(entry.name, 0.0) > now:
            return
        if not caps.unattended and not (caps.needs_password and entry.password_name):
            self._remind_due(entry, now)
            return
        self._rotate_scheduled(entry, now)

    def _remind_due(self, entry: Any, now: float) -> None:
        url = entry.url(self._urls)
        self._remind(
            entry, "due", now,
            f"rotation of {entry.registry} is due",
            f"It needs your password or a one-time code: run `npmguard rotate "
            f"--registry {url}`.",
            reason="scheduled rotation due; it needs a password or one-time code",
        )

    def _rotate_scheduled(self, entry: Any, now: float) -> None:
        from npmguard.registry.base import OtpRequiredError, PasswordRequiredError
        from npmguard.rotation import RotationBusyError

        try:
            outcome = self._rotator().rotate(entry, reason="scheduled")
        except RotationBusyError:
            log.info("not rotating %s now: another npmguard process is rotating; "
                     "trying at the next check", entry.registry)
        except (OtpRequiredError, PasswordRequiredError) as err:
            log.info("the scheduled rotation of %s needs the user: %s",
                     entry.registry, err)
            self._needs_user[entry.name] = entry.fingerprint
            self._remind_due(entry, now)
        except (NpmguardError, OSError) as err:
            self._failed(entry, err, now)
        else:
            self._succeeded(entry, outcome)

    # --- outcomes ------------------------------------------------------------

    def _failed(self, entry: Any, err: BaseException, now: float, *,
                scheduled: bool = True) -> str:
        """Record a failed rotation and return its one-line message."""
        from npmguard.registry.base import RegistryError
        from npmguard.rotation import RotationError

        message = REDACTOR.redact(" ".join(str(err).split())) or type(err).__name__
        if not isinstance(err, (RegistryError, RotationError)):
            # rotation.py records the failures of the registry calls and of
            # the steps after them. These happened before any of that.
            _audit("failed", registry=entry.registry, fingerprint=entry.fingerprint,
                   reason=f"rotation: {message}"[:300])
        if not scheduled:
            log.warning("the requested rotation of %s (fingerprint %s) failed: %s",
                        entry.registry, entry.fingerprint, message)
            self._set_failure(RotationFailure(
                entry.name, entry.registry, entry.fingerprint, message,
                self._retry_at.get(entry.name),
            ))
            return message
        count = self._failures.get(entry.name, 0) + 1
        self._failures[entry.name] = count
        delay = min(self.backoff * 2 ** (count - 1), self.backoff_max)
        self._retry_at[entry.name] = now + delay
        log.warning(
            "the scheduled rotation of %s (fingerprint %s) failed: %s; the old token "
            "stays in use; trying again in %s", entry.registry, entry.fingerprint,
            message, _duration(delay),
        )
        self._set_failure(RotationFailure(
            entry.name, entry.registry, entry.fingerprint, message, now + delay
        ))
        if count == 1:
            url = entry.url(self._urls)
            self._notify(
                f"Rotation of the npm token for {entry.registry} failed",
                f"{message}\nnpmguard tries again in {_duration(delay)}; to try "
                f"now, run `npmguard rotate --registry {url}`.",
                "critical",
            )
        return message

    def _succeeded(self, entry: Any, outcome: Any) -> None:
        self._failures.pop(entry.name, None)
        self._retry_at.pop(entry.name, None)
        self._needs_user.pop(entry.name, None)
        self._clear_failure(entry.name)
        self.state.refresh_leaks()
        self._notify(
            f"npm token for {entry.registry} rotated",
            f"fingerprint {outcome.old_fingerprint} -> {outcome.new_fingerprint}; "
            + ("the old token is revoked" if outcome.revoked
               else "the old token could not be revoked: revoke it on the "
                    "registry's website"),
            "low",
        )

    def _set_failure(self, failure: RotationFailure) -> None:
        others = tuple(f for f in self.state.snapshot.rotation_failures
                       if f.name != failure.name)
        self.state.update(rotation_failures=(*others, failure))

    def _clear_failure(self, name: str) -> None:
        failures = self.state.snapshot.rotation_failures
        others = tuple(f for f in failures if f.name != name)
        if others != failures:
            self.state.update(rotation_failures=others)

    def _drop_stale(self, entries: list[Any]) -> None:
        """Forget failures of tokens that were removed or rotated elsewhere."""
        current = {e.name: e.fingerprint for e in entries}
        for failure in self.state.snapshot.rotation_failures:
            if current.get(failure.name) != failure.fingerprint:
                self._failures.pop(failure.name, None)
                self._retry_at.pop(failure.name, None)
                self._clear_failure(failure.name)
        for name, fingerprint in list(self._needs_user.items()):
            if current.get(name) != fingerprint:
                del self._needs_user[name]

    def _refresh(self) -> None:
        from npmguard import lifecycle

        self.state.refresh_leaks()
        try:
            entries = lifecycle.managed(tokens_only=True)
        except NpmguardError as err:
            log.debug("not checking for stale failures: %s", err)
            return
        self._drop_stale(entries)

    # --- requested rotations -------------------------------------------------

    def _serve(self, job: _Job) -> None:
        from npmguard import lifecycle
        from npmguard.npmrc.nerf import InvalidRegistryError
        from npmguard.registry.base import NotSupportedError
        from npmguard.rotation import RotationBusyError

        self._urls = _configured_urls()
        try:
            self._recover()
            entries = lifecycle.find(job.registry)
        except InvalidRegistryError as err:
            job.error = f"registry: {err}"
            return
        except NpmguardError as err:
            job.error = str(err)
            return
        if job.registry and not entries:
            job.error = (f"no stored token for {job.registry}; `npmguard status` "
                         "lists what is stored")
            return
        reasons: dict[str, str] = {}
        if job.exposed:
            reasons = self._exposed(entries)
            entries = [e for e in entries if e.name in reasons]
            if not entries:
                job.messages.append("no stored token is known to be exposed")
        now = self.clock()
        for entry in entries:
            if self.stopping.is_set():
                job.messages.append("the daemon stopped; the rest were not rotated")
                break
            reason = f"exposed: {reasons[entry.name]}" if entry.name in reasons \
                else "on demand"
            result: dict[str, Any] = {"registry": entry.registry,
                                      "old_fingerprint": entry.fingerprint}
            try:
                outcome = self._rotator().rotate(entry, reason=reason)
            except NotSupportedError as err:
                result.update(ok=False, unsupported=True,
                              error=REDACTOR.redact(str(err)))
            except RotationBusyError as err:
                result.update(ok=False, unsupported=False, error=str(err))
            except (NpmguardError, OSError) as err:
                message = self._failed(entry, err, now, scheduled=False)
                result.update(ok=False, unsupported=False, error=message)
            else:
                self._succeeded(entry, outcome)
                result.update(ok=True, new_fingerprint=outcome.new_fingerprint,
                              revoked=outcome.revoked, expires=outcome.expires,
                              message=outcome.message)
            job.results.append(result)
        self.state.refresh_leaks()
        if job.origin == "tray":
            self._report_to_tray(job)

    def _exposed(self, entries: list[Any]) -> dict[str, str]:
        from npmguard.exposure import exposed

        roots = [str(root.path) for root in self.settings.roots]
        return exposed(entries, self.store, roots)

    def _report_to_tray(self, job: _Job) -> None:
        done = [r for r in job.results if r.get("ok")]
        failed = [r for r in job.results if not r.get("ok")]
        if not job.results:
            self._notify("No exposed npm token", "\n".join(job.messages) or
                         "nothing to rotate", "low")
            return
        lines = [f"{r['registry']}: rotated, fingerprint {r['old_fingerprint']} -> "
                 f"{r['new_fingerprint']}" for r in done]
        lines += [f"{r['registry']}: {r['error']}" for r in failed]
        summary = (f"{len(done)} exposed npm token(s) rotated" if not failed
                   else f"{len(failed)} of {len(job.results)} rotations failed")
        self._notify(summary, "\n".join(lines), "critical" if failed else "normal")

    # --- helpers -------------------------------------------------------------

    def provider_for(self, entry: Any) -> Any:
        if self._provider_for is not None:
            return self._provider_for(entry)
        from npmguard.commands.rotate import provider_for_entry

        return provider_for_entry(entry, self.settings, self._urls)

    def _rotator(self) -> Any:
        from npmguard.rotation import Rotator

        return Rotator(self.store, self.provider_for, ask=None,
                       invalidate=self.invalidate)

    def _remind(self, entry: Any, kind: str, now: float, summary: str, body: str,
                *, reason: str) -> None:
        key = f"{kind} {entry.name} {entry.fingerprint}"
        reminders = _load_reminders()
        if now - reminders.get(key, 0.0) < self.remind_every:
            return
        reminders[key] = now
        _save_reminders(reminders, now - max(self.remind_every, REMIND_SECONDS))
        log.info("reminder for %s (fingerprint %s): %s", entry.registry,
                 entry.fingerprint, reason)
        _audit("reminder", registry=entry.registry, fingerprint=entry.fingerprint,
               reason=reason)
        self._notify(summary, body, "normal")

    def _notify(self, summary: str, body: str, urgency: str) -> None:
        if self.notify is None:
            return
        try:
            self.notify(summary, body, urgency)
        except Exception:  # noqa: BLE001 - a notification must not stop rotation
            log.exception("sending a rotation notification failed")

    def _once(self, key: str, cause: str, message: str, *args: object) -> None:
        if (key, cause) in self._logged:
            return
        self._logged.add((key, cause))
        log.warning(message, *args)



def _configured_urls() -> dict[str, str]:
    from npmguard.lifecycle import configured_urls

    try:
        return configured_urls(os.environ, Path.home())
    except (NpmguardError, OSError) as err:
        log.debug("registry URLs from npm's config not read: %s", err)
        return {}


def _audit(event: str, **fields: object) -> None:
    from npmguard import audit

    # note() logs a failure instead of raising, so that the rotation's
    # outcome still reaches the state and the user.
    audit.note(event, **fields)


def _reminders_path() -> Path:
    from npmguard.paths import state_dir

    return state_dir() / REMINDERS_FILE


def _load_reminders() -> dict[str, float]:
    try:
        data = json.loads(_reminders_path().read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        log.warning("%s is unreadable (%s); reminders start afresh",
                    _reminders_path(), err)
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(k): float(v) for k, v in data.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _save_reminders(reminders: dict[str, float], older: float) -> None:
    from npmguard.files import write_private

    recent = {k: v for k, v in reminders.items() if v >= older}
    try:
        write_private(_reminders_path(),
                      json.dumps(recent, indent=1, sort_keys=True).encode())
    except OSError as err:
        # The reminder still goes out. After a restart it may come again
        # within the day.
        log.warning("could not save %s: %s", _reminders_path(), err)


def _duration(seconds: float) -> str:
    if seconds >= 86400 and seconds % 3600 == 0:
        hours = int(seconds // 3600)
        return f"{hours // 24} d" if hours % 24 == 0 else f"{hours} h"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h".replace(".0 h", " h")
    if seconds >= 60:
        return f"{int(seconds // 60)} min"
    return f"{seconds:g} s"
