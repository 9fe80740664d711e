"""A bounded pool for blocking inference: the event loop only awaits, so /healthz and static files answer
while a long clip is encoded, and a full queue is refused at once (503) instead of piling up requests
whose clients have long given up."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

T = TypeVar("T")


class PoolFull(RuntimeError):
    """Every worker is busy and the queue is full; the app answers 503 with Retry-After."""


class InferencePool:
    def __init__(self, workers: int = 1, queue: int = 32):
        if workers < 1 or queue < 0:
            raise ValueError(f"workers must be >= 1 and queue >= 0, got {workers} and {queue}")
        self.capacity = workers + queue  # running + waiting
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="speechclip-inference")
        self._lock = threading.Lock()
        self._pending = 0

    @property
    def pending(self) -> int:
        """Jobs running or waiting (a job whose client went away still counts until it ends)."""
        return self._pending

    def _finished(self, _future) -> None:
        with self._lock:
            self._pending -= 1

    async def run(self, function: Callable[..., T], *args) -> T:
        """Run `function(*args)` on a worker thread; PoolFull at once when the queue is full."""
        with self._lock:
            if self._pending >= self.capacity:
                raise PoolFull(f"the server is busy ({self._pending} queries queued); try again in a moment")
            self._pending += 1
        future = self._executor.submit(function, *args)
        future.add_done_callback(self._finished)
        return await asyncio.wrap_future(future)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
