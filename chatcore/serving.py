"""`Generator`: the async front of the engine, shared by every adapter.

Model work runs on a worker thread so it never blocks the event loop. An engine
with a model (`chatcore.engine.Engine`) is served by continuous batching
(`chatcore.batching.BatchScheduler`): requests from all adapters decode together,
each joining as it arrives and leaving as it finishes, and a follow-up turn
reuses its conversation's cached prefix (`chatcore.prefix_cache`). Anything
else with the Engine's shape (`chatcore.testing.ScriptedEngine`) is served one
request at a time.

The engine is picked when a request is submitted, so `swap` is a hot swap:
requests already submitted finish on the old engine (its worker then stops),
the next ones use the new one, and none ever sees a half-loaded model (the
caller loads fully, then swaps one reference). Each engine gets its own prefix
cache: a state computed by old weights is never reused with new ones.

Cancellation: when the consumer of `stream` stops iterating (client gone), the
request stops at the next token and its batch row is free for the next one.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from .batching import DONE, BatchScheduler, Sink
from .message import Busy
from .metrics import generator_stats
from .prefix_cache import PrefixCache
from .params import SamplingParams

__all__ = ["Generator"]

STUCK_AFTER_S = 120.0
"""A model worker with work that has not moved for this long is reported stuck by health checks."""

MAX_AUTO_BATCH = 64
"""The most rows ``max_batch: auto`` gives (see `batch_limits`)."""
AUTO_QUEUE_PER_ROW = 4
"""``max_queue: auto`` holds this many waiting requests per batch row (see `batch_limits`)."""


def batch_limits(max_batch: int | str, max_queue: int | str, model: Any,
                 available: int | None = None) -> tuple[int, int]:
    """``serving.max_batch`` and ``serving.max_queue`` as numbers, ``auto`` sized here.

    max_batch auto: as many rows as half the available memory (`available_memory`: the
    device's on a GPU; or ``available`` bytes) holds if every row filled its whole context with keys and
    values (2 x n_layer x block_size x n_embd x the cache's bytes per value: 72 MiB
    for GPT-2 124M in fp32), between 1 and `MAX_AUTO_BATCH`. On the CPU the cache
    takes memory only for the tokens rows really hold (`chatcore.model.KVCache`), so
    this is the worst case, not what is used. The other half is left to the
    weights, the prefix cache and everything else on the machine. The cap: on a
    CPU a decode step costs in proportion to its rows well before 64 (its
    aggregate throughput flattens), and a batch's rows share every step's time.

    max_queue auto: `AUTO_QUEUE_PER_ROW` x max_batch. Requests past it get the busy
    answer with a Retry-After (HTTP 503) at once instead of waiting longer than
    about four replies take; clients that retry (OpenAI's SDKs do) come back.
    """
    if max_batch == "auto":
        cfg = model.config
        itemsize = torch.empty((), dtype=getattr(model, "dtype", torch.float32)).element_size()
        per_row = 2 * cfg.n_layer * cfg.block_size * cfg.n_embd * itemsize
        free = available_memory(getattr(model, "device", None)) if available is None else available
        max_batch = max(1, min(MAX_AUTO_BATCH, free // 2 // per_row))
    if max_queue == "auto":
        max_queue = AUTO_QUEUE_PER_ROW * max_batch
    return int(max_batch), int(max_queue)


def available_memory(device: Any = None) -> int:
    """Bytes this process could still take for its KV cache: on a CUDA device, the
    device's free memory (the cache is allocated there, whole, up front); otherwise
    the system's available memory, within a container's (cgroup v2) limit when it has one."""
    if device is not None and torch.device(device).type == "cuda":
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    free = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except OSError:
        pass
    if free is None:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):  # not POSIX: assume a small machine
            free = 2 << 30
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            free = min(free, max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return free


def supports_batching(engine: Any) -> bool:
    """Engines that expose a GPT with a batch KV cache and a tokenizer can be batched."""
    model = getattr(engine, "model", None)
    return hasattr(model, "forward_cached") and hasattr(getattr(engine, "tokenizer", None), "stream_decoder")


class _Handle:
    def __init__(self) -> None:
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()


class _Serial:
    """One request at a time on one worker thread: for engines without a batchable model."""

    def __init__(self, engine: Any, max_queue: int) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self._pending = 0  # submitted, not yet started
        self._active = 0
        self._lock = threading.Lock()
        self._handles: set[_Handle] = set()
        self.heartbeat = time.monotonic()  # when the running request last produced text
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chatcore-model")

    def submit(self, prompt: str, params: SamplingParams, sink: Sink, adapter: Any = None) -> _Handle:
        handle = _Handle()
        with self._lock:
            # as before batching: the running request counts too (max_queue 0 refuses everything)
            if self._pending + self._active >= self.max_queue:
                raise Busy(f"{self._pending + self._active} requests are already waiting; try again shortly")
            self._pending += 1
            self._handles.add(handle)

        def work() -> None:
            with self._lock:
                self._pending -= 1
                self._active += 1
            self.heartbeat = time.monotonic()
            try:
                if not handle.cancelled.is_set():
                    for delta in self.engine.stream(prompt, params, handle.cancelled.is_set):
                        self.heartbeat = time.monotonic()
                        sink(delta)
                sink(DONE)
            except BaseException as exc:  # handed to the awaiting coroutine
                sink(exc)
            finally:
                with self._lock:
                    self._active -= 1
                    self._handles.discard(handle)

        self._executor.submit(work)
        return handle

    @property
    def idle(self) -> bool:
        return not (self._pending or self._active)

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def active(self) -> int:
        return self._active

    def health(self, stuck_after: float) -> str | None:
        """None when serving; else why not (a request has produced nothing for `stuck_after` s)."""
        if self._active and time.monotonic() - self.heartbeat > stuck_after:
            return f"the model worker made no progress in {stuck_after:g} s"
        return None

    def close(self, drain: bool = True) -> None:
        if not drain:  # queued work still runs, but finds itself cancelled and just ends its stream
            with self._lock:
                for handle in self._handles:
                    handle.cancel()
        self._executor.shutdown(wait=False)

    def join(self, timeout: float | None = None) -> None:
        self._executor.shutdown(wait=True)  # its requests are cancelled: they end at their next word


class Generator:
    """Async front of one engine at a time (see the module docstring).

    `max_queue`: with batching, requests waiting for a free batch row (past it,
    `stream` raises `Busy`); one at a time, requests in flight, the running one
    included. `max_batch`: conversations decoding together. Either may be
    ``auto``: sized from the memory available and the model's shape when its
    worker starts (`batch_limits`); an engine served one at a time then takes 64.
    `prefill_chunk` / `prefill_tokens`: prompt tokens run per step, per prompt while others decode / over
    the prompts run together (`chatcore.batching`). `prefix_cache_mb`: memory for reusable conversation states (0: off).
    `adapt_threads`: let a CPU batch worker decode on one thread while that is faster (`chatcore.threads`).
    """

    def __init__(
        self,
        engine: Any,
        *,
        max_queue: int | str = 64,
        max_batch: int | str = 8,
        prefill_chunk: int = 128,
        prefill_tokens: int = 512,
        prefix_cache_mb: float = 256,
        adapt_threads: bool = True,
    ) -> None:
        self._max_queue = max_queue
        self._max_batch = max_batch
        self._prefill_chunk = prefill_chunk
        self._prefill_tokens = prefill_tokens
        self._prefix_cache_bytes = int(prefix_cache_mb * 2**20)
        self._adapt_threads = adapt_threads
        self._engine = engine
        self._backend: Any = None
        self._retired: list[Any] = []  # backends of swapped-out engines, finishing their requests
        self._closed = False
        self.busy = 0  # requests refused with Busy (for /metrics)

    @property
    def engine(self) -> Any:
        return self._engine

    @property
    def backend(self) -> BatchScheduler | _Serial:
        """The worker serving the current engine (created on first use)."""
        if self._backend is None or self._backend.engine is not self._engine:
            if self._backend is not None:
                self._retire(self._backend)
            self._backend = self._make_backend(self._engine)
        return self._backend

    def health(self) -> str | None:
        """None while requests can be served; else why not (closed, a dead or a stuck model worker)."""
        if self._closed:
            return "the generator is closed"
        return self._backend.health(STUCK_AFTER_S) if self._backend is not None else None

    def swap(self, engine: Any) -> None:
        """Serve `engine` from the next request on."""
        self._engine = engine

    async def ready(self) -> Any:
        """The engine that will serve the next request (a remote one, `chatcore.remote`, asks its server first)."""
        return self._engine

    async def stream(self, prompt: str, params: SamplingParams, adapter: tuple[str | None, str] | None = None,
                     info: dict[str, Any] | None = None) -> AsyncIterator[str]:
        """Yield the reply's text as it is generated; stopping early cancels the work.

        `adapter` = (scope, LoRA adapter file) adds that adapter to this request (batched
        engines only: `chatcore.batching`); an engine served one at a time ignores it.
        `info["model_id"]` is set to the id of the weights that answer (a swap may come in between)."""
        if self._closed:
            raise RuntimeError("the generator is closed")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()

        def sink(item: Any) -> None:  # called on the worker thread
            loop.call_soon_threadsafe(queue.put_nowait, item)

        backend = self.backend
        try:
            handle = backend.submit(prompt, params, sink, adapter=adapter)  # Busy / ValueError surface here
        except Busy:
            self.busy += 1
            raise
        if info is not None:
            info["model_id"] = backend.engine.model_id
        try:
            while (item := await queue.get()) is not DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            handle.cancel()

    def stats(self) -> dict[str, int]:
        """Queue and cache figures of the current engine's worker, for /metrics and the dashboard."""
        backend = self._backend
        out = generator_stats(busy=self.busy)
        if isinstance(backend, BatchScheduler):
            out.update(waiting=backend.waiting, running=backend.running, decode_steps=backend.steps,
                       decode_rows=backend.step_rows)
            if backend.tuner is not None:
                out.update(decode_threads=backend.tuner.current, thread_switches=backend.tuner.switches)
            if backend.prefix_cache is not None:
                out.update(prefix_hits=backend.prefix_cache.hits, prefix_misses=backend.prefix_cache.misses)
        elif backend is not None:
            out.update(waiting=backend.pending, running=backend.active)
        return out

    async def generate(self, prompt: str, params: SamplingParams,
                       adapter: tuple[str | None, str] | None = None) -> str:
        return "".join([delta async for delta in self.stream(prompt, params, adapter)])

    async def close(self) -> None:
        """Stop serving: running and waiting requests are cancelled (their streams end)."""
        self._closed = True
        backends = self._retired + ([self._backend] if self._backend is not None else [])
        for backend in backends:
            backend.close(drain=False)
        self._retired.clear()
        self._backend = None
        # wait (off the event loop) for the workers to leave the model: a thread still inside
        # torch when the interpreter exits aborts the process
        await asyncio.to_thread(lambda: [b.join(10.0) for b in backends])

    def _make_backend(self, engine: Any) -> BatchScheduler | _Serial:
        if supports_batching(engine):
            prefixes = PrefixCache(self._prefix_cache_bytes) if self._prefix_cache_bytes > 0 else None
            max_batch, max_queue = batch_limits(self._max_batch, self._max_queue, engine.model)
            return BatchScheduler(
                engine,
                max_batch=max_batch,
                max_queue=max_queue,
                prefill_chunk=self._prefill_chunk,
                prefill_tokens=self._prefill_tokens,
                prefix_cache=prefixes,
                adapt_threads=self._adapt_threads,
            )
        return _Serial(engine, 64 if self._max_queue == "auto" else self._max_queue)

    def _retire(self, backend: Any) -> None:
        # the old engine's worker finishes what it has, then its thread ends
        backend.close(drain=True)
        self._retired = [b for b in self._retired if not _finished(b)] + [backend]


def _finished(backend: Any) -> bool:
    if isinstance(backend, BatchScheduler):
        return backend.stopped
    return backend.idle
