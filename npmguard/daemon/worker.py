"""Background workers with a clear lifetime.

Each worker runs in one thread, stops when its stop event is set, and is
joined with a timeout. A worker's loop that raises is logged with its
traceback; it never dies silently.
"""

from __future__ import annotations

import logging
import threading
from types import TracebackType

log = logging.getLogger(__name__)


class Worker:
    """Base class: subclasses implement ``run`` and poll ``self.stopping``."""

    name = "worker"

    def __init__(self) -> None:
        self.stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.failed: BaseException | None = None

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError(f"{self.name} already started")
        self._thread = threading.Thread(
            target=self._main, name=f"npmguard-{self.name}", daemon=True
        )
        self._thread.start()

    def _main(self) -> None:
        try:
            self.run()
        except Exception as err:  # noqa: BLE001 - logged, then surfaced by alive()
            self.failed = err
            log.exception("%s stopped after an error", self.name)

    def run(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        """Ask the worker to stop; ``join`` waits for it."""
        self.stopping.set()

    def join(self, timeout: float = 1.0) -> bool:
        """Wait up to ``timeout`` seconds; return True when the thread ended."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> Worker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        self.join()
