"""The daemon's status, shared by the watcher, the server and the tray.

Listeners (the tray, the log) are called on every change from the thread
that made it; they must return quickly.

Besides plaintext credentials on disk (``exposures``), the snapshot lists
stored tokens that count as leaked (``leaks``: the credential index marks
them, for example after the guardian saw one in plaintext again) and
scheduled rotations that failed (``rotation_failures``). Neither holds a
value: registries, fingerprints and reasons only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

log = logging.getLogger(__name__)

# Icon states, most urgent first: the tray shows the most urgent one.
SECURE = "secure"
EXPOSED = "exposed"
LOCKED = "locked"
ERROR = "error"
PAUSED = "paused"


@dataclass(frozen=True)
class Exposure:
    """A plaintext credential the daemon saw and has not secured (yet)."""

    path: str
    line: int
    registry: str | None
    kind: str
    fingerprint: str | None
    policy: str


@dataclass(frozen=True)
class Leak:
    """A stored token that counts as exposed until it is rotated."""

    name: str  # the vault name: the npmrc key and an id, no value
    registry: str
    fingerprint: str
    reason: str


@dataclass(frozen=True)
class RotationFailure:
    """A scheduled or requested rotation that did not finish."""

    name: str
    registry: str
    fingerprint: str
    message: str
    retry_at: float | None = None  # epoch seconds of the next automatic try


@dataclass(frozen=True)
class Snapshot:
    paused: bool = False
    vault_locked: bool = False
    error: str | None = None
    exposures: tuple[Exposure, ...] = ()
    secured_count: int = 0
    started: float = field(default_factory=time.time)
    leaks: tuple[Leak, ...] = ()
    rotation_failures: tuple[RotationFailure, ...] = ()

    @property
    def status(self) -> str:
        if self.paused:
            return PAUSED
        if self.error or self.rotation_failures:
            return ERROR
        if self.vault_locked:
            return LOCKED
        if self.exposures or self.leaks:
            return EXPOSED
        return SECURE

    def to_json(self) -> dict[str, object]:
        return {
            "status": self.status,
            "paused": self.paused,
            "vault_locked": self.vault_locked,
            "error": self.error,
            "exposures": [e.__dict__ for e in self.exposures],
            "secured_count": self.secured_count,
            "uptime_seconds": round(time.time() - self.started, 1),
            "leaks": [leak.__dict__ for leak in self.leaks],
            "rotation_failures": [f.__dict__ for f in self.rotation_failures],
        }


Listener = Callable[[Snapshot, Snapshot], None]


class DaemonState:
    """A thread-safe holder of the current ``Snapshot`` with change listeners."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._snapshot = Snapshot()
        self._listeners: list[Listener] = []
        # Held while ``leaks`` is read from the index and published, so two
        # threads cannot publish in the opposite order of their reads.
        self._leaks_lock = threading.Lock()

    @property
    def snapshot(self) -> Snapshot:
        with self._lock:
            return self._snapshot

    def subscribe(self, listener: Listener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def update(self, **changes: object) -> Snapshot:
        with self._lock:
            before = self._snapshot
            after = replace(before, **changes)  # type: ignore[arg-type]
            self._snapshot = after
            listeners = list(self._listeners)
        if after != before:
            for listener in listeners:
                try:
                    listener(before, after)
                except Exception:  # noqa: BLE001 - a listener must not stop others
                    log.exception("state listener failed")
        return after

    def refresh_leaks(self) -> Snapshot:
        """Set ``leaks`` from the credential index: stored tokens marked exposed.

        An unreadable index keeps the leaks known so far. It is logged at
        debug level only, because every command that reads the index reports it.
        """
        from npmguard.errors import NpmguardError
        from npmguard.lifecycle import managed

        with self._leaks_lock:
            try:
                entries = managed()
            except NpmguardError as err:
                log.debug("leaks not refreshed: %s", err)
                return self.snapshot
            leaks = tuple(
                Leak(e.name, e.registry, e.fingerprint, str(e.meta["exposed"]))
                for e in entries
                if e.meta.get("exposed")
            )
            return self.update(leaks=leaks)
