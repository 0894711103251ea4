"""Writes that no decision waits for, run in order on a thread of their own (MLflow's, Optuna's).

Why: Tune calls the searchers and callbacks on its one event-loop thread, and every result it has not handled
holds a trial that has reported (a function trainable waits for the driver after each report). A trial's
MLflow results and artifacts took ~100 ms a trial there, and Optuna's intermediate values and user
attributes ~4 ms a report with Postgres (bench/scale.py); on this thread they overlap the loop. What the
driver decides with is still updated at once on the loop's thread; only the store lags, by the queue
(usually empty), and whoever reads the store back calls `flush` first.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor


class Writes:
    """An ordered queue of writes on one thread. A write's error is raised on the caller's thread at the
    next `submit` or at `flush`, as the write itself would have raised it, not lost."""

    def __init__(self, thread_name: str) -> None:
        self._thread_name = thread_name
        self._pool: ThreadPoolExecutor | None = None  # started at the first write
        self._pending: deque[Future[None]] = deque()

    def submit(self, write: Callable[[], None]) -> None:
        while self._pending and self._pending[0].done():
            self._pending.popleft().result()  # an earlier write's error, here on the caller's thread
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix=self._thread_name)
        self._pending.append(self._pool.submit(write))

    def flush(self) -> None:
        """Wait for every write submitted so far; raise the first that failed (the rest still run)."""
        first: BaseException | None = None
        while self._pending:
            error = self._pending.popleft().exception()
            first = first or error
        if first is not None:
            raise first

    def __getstate__(self) -> dict:
        """A pickled copy (Tune saves searchers with pickle) is an empty queue: threads do not pickle."""
        return {"_thread_name": self._thread_name, "_pool": None, "_pending": deque()}
