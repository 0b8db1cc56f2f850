"""Periodic background work (scheduler, reconciler, metrics ingest) on daemon threads: each run
is isolated, so one failing tick is logged and the loop goes on. A loop's `gate` (the leader
lease's `holds`, service/leader.py) skips its ticks while this process may not act."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Loop:
    def __init__(self, name: str, fn: Callable[[], None], interval: float):
        self.name, self.fn, self.interval = name, fn, interval
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.ticks = 0
        self.skipped = 0
        self.last_error: str | None = None
        self.gate: Callable[[], bool] | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"slimtrain-{self.name}", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Run the next tick now instead of at the end of the interval."""
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self.gate is not None and not self.gate():
                    self.skipped += 1
                else:
                    self.fn()
                self.last_error = None
            except Exception as e:  # a bad tick must not end the loop; the next one retries
                self.last_error = f"{type(e).__name__}: {e}"
                log.exception("%s loop: tick failed", self.name)
            self.ticks += 1
            self._wake.wait(self.interval)
            self._wake.clear()
