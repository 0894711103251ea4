"""Writes that no decision waits for, run in order on a thread of their own (MLflow's, Optuna's).

Why: Tune calls the searchers and callbacks on its one event-loop thread, and every result it has not handled
holds a trial that has reported (a function trainable waits for the driver after each report). A trial's
MLflow results and artifacts took ~100 ms a trial there, and Optuna's ask and tell ~100 ms with Postgres
(bench/scale.py); on this thread they overlap the loop. What the driver decides with is still updated at once
on the loop's thread; only the store lags, by the queue (usually empty), and whoever reads the store back
calls `flush` first.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor


class Writes:
    """An ordered queue of writes on one thread. A write's error is raised on the caller's thread at the
    next `submit` or at `flush`, as the write itself would have raised it, not lost. Callers on several
    threads share one order: that of their `submit` calls."""

    def __init__(self, thread_name: str) -> None:
        self._thread_name = thread_name
        self._pool: ThreadPoolExecutor | None = None  # started at the first write
        self._pending: deque[Future[None]] = deque()
        self._lock = threading.Lock()

    def submit(self, write: Callable[[], None]) -> None:
        with self._lock:
            while self._pending and self._pending[0].done():
                self._pending.popleft().result()  # an earlier write's error, here on the caller's thread
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix=self._thread_name)
            self._pending.append(self._pool.submit(write))

    def flush(self) -> None:
        """Wait for every write submitted so far; raise the first that failed (the rest still run)."""
        with self._lock:
            pending, self._pending = list(self._pending), deque()
        errors = [error for future in pending if (error := future.exception()) is not None]
        if errors:
            raise errors[0]

    def close(self) -> None:
        """Stop the thread once the writes submitted so far are done (a later `submit` starts another)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def __getstate__(self) -> dict:
        """A pickled copy (Tune saves searchers with pickle) is an empty queue: threads do not pickle."""
        return {"_thread_name": self._thread_name, "_pool": None, "_pending": deque()}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
