"""The daemon's status, shared by the watcher, the server and the tray.

Listeners (the tray, the log) are called on every change from the thread
that made it; they must return quickly.
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
class Snapshot:
    paused: bool = False
    vault_locked: bool = False
    error: str | None = None
    exposures: tuple[Exposure, ...] = ()
    secured_count: int = 0
    started: float = field(default_factory=time.time)

    @property
    def status(self) -> str:
        if self.paused:
            return PAUSED
        if self.error:
            return ERROR
        if self.vault_locked:
            return LOCKED
        if self.exposures:
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
        }


Listener = Callable[[Snapshot, Snapshot], None]


class DaemonState:
    """A thread-safe holder of the current ``Snapshot`` with change listeners."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._snapshot = Snapshot()
        self._listeners: list[Listener] = []

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
