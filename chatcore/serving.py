"""`Generator`: the async front of the engine, shared by every adapter.

Model work runs on a worker thread so it never blocks the event loop. The engine
is read when a request starts, so `swap` is a hot swap: requests already running
finish on the old engine, the next ones use the new one, and none ever sees a
half-loaded model (the caller loads fully, then swaps one reference).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .sampling import SamplingParams


class Busy(RuntimeError):
    """Raised when more requests are waiting than the queue allows."""


_DONE = object()


class Generator:
    def __init__(self, engine: Any, *, max_queue: int = 64) -> None:
        self._engine = engine
        self._max_queue = max_queue
        self._waiting = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chatcore-model")

    @property
    def engine(self) -> Any:
        return self._engine

    def swap(self, engine: Any) -> None:
        """Serve `engine` from the next request on."""
        self._engine = engine

    async def stream(self, prompt: str, params: SamplingParams) -> AsyncIterator[str]:
        """Yield the reply's text as it is generated; stopping early cancels the work."""
        if self._waiting >= self._max_queue:
            raise Busy(f"{self._waiting} requests are already waiting; try again shortly")
        self._waiting += 1
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancelled = threading.Event()

        def work() -> None:
            try:
                if not cancelled.is_set():
                    for delta in self._engine.stream(prompt, params, cancelled.is_set):
                        loop.call_soon_threadsafe(queue.put_nowait, delta)
            except BaseException as exc:  # handed to the awaiting coroutine
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)

        loop.run_in_executor(self._executor, work)
        try:
            while (item := await queue.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancelled.set()
            self._waiting -= 1

    async def generate(self, prompt: str, params: SamplingParams) -> str:
        return "".join([delta async for delta in self.stream(prompt, params)])

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
