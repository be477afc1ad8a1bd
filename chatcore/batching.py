"""Continuous batching: many conversations decode together on one model.

One worker thread owns the model and a `KVCache` with a row per running
request. Each iteration of its loop:

1. drops requests whose consumer went away (their row is free at once);
2. admits waiting requests, oldest first, into free rows, restoring the
   longest cached prefix of their prompt (`PrefixCache`) so a follow-up turn
   only runs its new tokens;
3. runs one chunk (`prefill_chunk` tokens) of the oldest unfinished prompt, and in
   the same forward the next chunks of the next oldest ones while the batch stays
   within `prefill_tokens` (padding included), so prompts that arrive together
   are run together, and a long prompt delays the others by one chunk per step,
   not by its whole length (with no conversation decoding, a chunk may take the
   whole `prefill_tokens`: there is nobody to delay);
4. decodes one token for every other running request in a single batched
   forward (per-row positions and lengths: rows never see each other); a lone
   conversation with a drafter (``engine.speculator``, `chatcore.speculative`)
   checks several guessed tokens in that forward instead.

A request leaves as soon as it finishes (end-of-text, newline, stop string,
max tokens); the next waiting one takes its row on the next iteration. Nobody
waits for anyone else to finish, admission is first come first served, and
everyone running advances every step, so nobody starves. Past `max_queue`
waiting requests, `submit` raises `Busy` instead of queueing without bound.

Each request keeps its own SamplingParams and seeded generator, and its text
follows the Engine's rules by construction: the same sampler and the same
`chatcore.reply_text` (stop strings, UTF-8-safe decoding, context window).
So a batched request produces the tokens it would produce alone (greedy: the
same tokens; seeded sampling: the same draws).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from contextlib import nullcontext
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .lora import AdapterPool, route
from .message import Busy
from .prefix_cache import PrefixCache
from .reply_text import ReplyText, prompt_window, slide_window, turn_marker_ids
from .sampling import SamplingParams, make_generator, sample, validate
from .speculative import accept_or_resample, distribution, is_greedy
from .threads import SERVING_THREADS, ThreadTuner

log = logging.getLogger("chatcore.batching")


log = logging.getLogger("chatcore")

Sink = Callable[[Any], None]  # receives text deltas (str), then DONE, or an exception
DONE = object()


@dataclass(eq=False)
class Request:
    """One generation: the prompt, its settings, where its text goes, and its progress."""

    prompt: str
    params: SamplingParams
    sink: Sink
    cancelled: threading.Event = field(default_factory=threading.Event)
    adapter: tuple[str | None, str] | None = None  # (slot, LoRA adapter file) added to this row only
    # set by the scheduler
    adapter_key: Any = None  # the adapter's key in the pool once attached
    row: int = -1
    todo: list[int] = field(default_factory=list)  # tokens still to run through the model
    fed: list[int] = field(default_factory=list)  # tokens in this request's cache row, in order
    context: list[int] = field(default_factory=list)  # the (truncated) prompt ids
    reply: list[int] = field(default_factory=list)
    pending: int | None = None  # last sampled token, fed at the next decode step
    reused: int = 0  # prompt tokens restored from the prefix cache
    generator: torch.Generator | None = None
    text: Any = None

    def cancel(self) -> None:
        """The consumer went away: stop at the next step and free the row."""
        self.cancelled.set()

    @property
    def decoding(self) -> bool:
        """Its prompt has run and a sampled token waits to be fed: it takes part in the next decode step."""
        return self.pending is not None and not self.todo


class BatchScheduler:
    """Continuous batching over one Engine's model (see the module docstring)."""

    def __init__(
        self,
        engine: Any,
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        prefill_chunk: int = 128,
        prefill_tokens: int = 512,
        prefix_cache: PrefixCache | None = None,
        adapter_budget_mb: float = 64,
        adapt_threads: bool = True,
    ) -> None:
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1 or prefill_tokens < 1:
            raise ValueError("max_batch, prefill_chunk and prefill_tokens must be >= 1, max_queue >= 0")
        self.engine = engine
        self.model = engine.model
        self.tokenizer = engine.tokenizer
        self.block_size = engine.block_size
        self.device = self.model.device
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.prefill_tokens = prefill_tokens  # prompt tokens (padding included) run in one forward
        self.prefix_cache = prefix_cache
        # on the CPU the cache takes memory only for the tokens the running rows hold (chatcore.model.KVCache)
        self.cache = self.model.new_cache(max_batch, max_len=self.block_size)
        self.speculator = getattr(engine, "speculator", None)
        self.drafted = self.accepted = 0  # guessed tokens checked and kept (speculative decoding)
        # per-row LoRA adapters (chatcore.lora): loaded on first use, their prefixes flushed when they go
        self.adapters = AdapterPool(self.model, int(adapter_budget_mb * 2**20),
                                    on_unload=lambda key: prefix_cache and prefix_cache.clear(namespace=key))
        self._exempt = turn_marker_ids(self.tokenizer)
        self._vocab = self.tokenizer.n_vocab
        self._free = list(range(max_batch))
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []  # in admission order
        self._cond = threading.Condition()
        self._closing = False  # finish what was submitted, then stop
        self._stopped = False
        self.died: BaseException | None = None  # what killed the worker thread, if anything did
        self.heartbeat = time.monotonic()  # when the worker last went round its loop (health checks)
        self.steps = 0  # decode steps run (for tests and benchmarks)
        threads = getattr(engine, "threads", None) or SERVING_THREADS
        self.tuner = ThreadTuner(threads) if adapt_threads and self.device.type == "cpu" and threads > 1 else None
        self.step_rows = 0  # conversations over all decode steps: step_rows / steps is the mean batch size
        self._thread = threading.Thread(target=self._run, name="chatcore-batch", daemon=True)
        self._thread.start()

    # --- called from any thread ---------------------------------------------------

    def submit(self, prompt: str, params: SamplingParams, sink: Sink,
               adapter: tuple[str | None, str] | None = None) -> Request:
        """Queue a request; its text goes to `sink`. Raises Busy past `max_queue` waiting.

        `adapter` = (slot, file): this request's rows add that LoRA adapter (a slot is a scope:
        a new file in the same slot replaces the old version once its requests are done)."""
        validate(params)
        request = Request(prompt, params, sink, adapter=adapter)
        with self._cond:
            if self.died is not None:
                raise RuntimeError("the model worker stopped; restart the bot")
            if self._closing:
                raise RuntimeError("this scheduler is closed")
            if len(self._waiting) >= self.max_queue and not (self._free and not self._waiting):
                raise Busy(f"{len(self._waiting)} requests are already waiting; try again shortly")
            if not self._running and not self._waiting:
                self.heartbeat = time.monotonic()  # it was idle: no progress was owed before now
            self._waiting.append(request)
            self._cond.notify()
        return request

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; with `drain`, finish the submitted ones first, else cancel them
        (their streams end). The worker thread then ends; `timeout` waits for that (None: don't wait)."""
        with self._cond:
            self._closing = True
            if not drain:
                for r in list(self._waiting) + self._running:
                    r.cancel()
            self._cond.notify()
        if timeout is not None:
            self._thread.join(timeout)

    def join(self, timeout: float | None = None) -> None:
        """Wait for the worker thread to end (after `close`)."""
        self._thread.join(timeout)

    @property
    def stopped(self) -> bool:
        return self._stopped

    # --- the worker thread ----------------------------------------------------------

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    self.heartbeat = time.monotonic()
                    with self._cond:
                        self._admit_locked()
                        if not self._running:
                            if self._closing and not self._waiting:
                                return
                            self._cond.wait()
                            continue
                    try:
                        self._step()
                    except Exception as exc:  # a bug or an out-of-memory in the batch: fail its requests, keep serving
                        log.exception("batch step failed; failing the %d running request(s)", len(self._running))
                        for r in list(self._running):
                            if r in self._running:
                                self._finish(r, error=exc)
        except BaseException as exc:  # never expected: say so, and fail everyone rather than leave them hanging
            self.died = exc
            log.critical("the batch worker died; every request now fails", exc_info=exc)
            with self._cond:
                self._closing = True
                orphans = list(self._waiting) + self._running
                self._waiting.clear()
            for r in orphans:
                _send(r, exc if isinstance(exc, Exception) else RuntimeError("the batch worker died"))
        finally:
            self._stopped = True

    def health(self, stuck_after: float) -> str | None:
        """None when serving; else why not (the worker died, or has work and made no progress in `stuck_after` s)."""
        if self.died is not None or (not self._thread.is_alive() and not self._closing):
            return "the model worker stopped"
        if (self._running or self._waiting) and time.monotonic() - self.heartbeat > stuck_after:
            return f"the model worker made no progress in {stuck_after:g} s"
        return None

    def _admit_locked(self) -> None:
        for r in [r for r in self._waiting if r.cancelled.is_set()]:
            self._waiting.remove(r)
            _send(r, DONE)
        while self._waiting and self._free:
            r = self._waiting.popleft()
            r.row = self._free.pop(0)
            self._running.append(r)
            try:
                self._start(r)
            except Exception as exc:  # this request's own setup failed (prompt, seed, cache): only it fails
                log.exception("a request failed to start")
                self._running.remove(r)
                self.cache.reset(r.row)
                self._free.append(r.row)
                self._free.sort()
                _send(r, exc)

    def _start(self, r: Request) -> None:
        r.context = prompt_window(self.tokenizer.encode(r.prompt), self.block_size, self.tokenizer.eot_token)
        r.generator = make_generator(r.params.seed, self.device)
        r.text = ReplyText(self.tokenizer, r.params)
        self.cache.reset(r.row)
        r.todo = list(r.context)
        if r.adapter is not None:
            try:
                r.adapter_key = self.adapters.acquire(r.adapter[1], slot=r.adapter[0])
            except Exception as exc:  # a damaged or mismatched adapter: this request serves on the base
                log.warning("LoRA adapter %s is unusable (%s); serving this request without it", r.adapter[1], exc)
        if self.prefix_cache is not None:
            hit = self.prefix_cache.lookup(r.todo, max_length=len(r.todo) - 1, namespace=r.adapter_key)
            if hit is not None:
                self.cache.restore(r.row, hit.k, hit.v)
                r.fed, r.todo, r.reused = r.todo[: hit.length], r.todo[hit.length :], hit.length

    def _step(self) -> None:
        for r in [r for r in self._running if r.cancelled.is_set()]:
            self._finish(r)
        if not self._running:
            return
        if any(r.params.max_new_tokens == 0 for r in self._running):
            for r in [r for r in self._running if r.params.max_new_tokens == 0]:
                self._finish(r)
        # Chunks keep a long prompt from stalling the conversations decoding beside it. With none decoding
        # there is nobody to stall: the prompts take the whole budget (a lone 512-token prompt answered
        # 1.55x sooner in fp32 as one forward than as four of 128, 1.13x in int8)
        decoders = any(r.decoding for r in self._running)
        chunk = self.prefill_chunk if decoders else max(self.prefill_chunk, self.prefill_tokens)
        prefilling = self._prefill_batch([r for r in self._running if r.todo], chunk)
        if self.tuner and (prefilling or self.speculator is not None):
            self._use_threads(self.tuner.current)
        if prefilling:
            chunks = []
            for r in prefilling:
                chunks.append(r.todo[:chunk])
                r.todo = r.todo[chunk:]
            logits = self._forward(prefilling, chunks)
            done = [i for i, r in enumerate(prefilling) if not r.todo]
            if done:
                self._sampled([prefilling[i] for i in done], logits[done])
        decoding = [r for r in self._running if r.decoding]
        if self.speculator is not None and len(self._running) == 1 and decoding and self._speculate(decoding[0]):
            return
        if decoding:
            decoding = self._compact(decoding)
            threads = self._use_threads(self.tuner.choose(len(decoding))) if self.tuner else 0
            started = time.perf_counter()
            logits = self._forward(decoding, [[r.pending] for r in decoding])
            if self.tuner:
                self.tuner.observe(len(decoding), threads, time.perf_counter() - started)
            self.steps += 1
            self.step_rows += len(decoding)
            self._sampled(decoding, logits)

    def _use_threads(self, n: int) -> int:
        """Run this thread's next torch ops on `n` threads; returns `n`."""
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)  # this thread's setting (and torch's default for threads started later)
        return n

    def _prefill_batch(self, prefilling: list[Request], chunk: int) -> list[Request]:
        """The prompts whose next chunk (at most `chunk` tokens) runs this step: the oldest, and the next
        oldest while the forward (rows x longest chunk, padding included) stays within `prefill_tokens`.

        Prompts that arrive together are run together: one matrix product over all their tokens
        reads each weight once, where one forward per prompt would read every weight per prompt
        and make the last of them wait for all the others' steps."""
        batch: list[Request] = []
        widest = 0
        for r in prefilling:  # oldest first: first come first served
            n = min(len(r.todo), chunk)
            if batch and (len(batch) + 1) * max(widest, n) > self.prefill_tokens:
                break
            batch.append(r)
            widest = max(widest, n)
        return batch

    def _compact(self, decoding: list[Request]) -> list[Request]:
        """Move the decoding requests to rows 0..n-1 (in that order) and return them sorted by row.

        The model then reads their cache as one view instead of gathering every row's
        keys and values on every layer. A move copies one row once, when requests
        come and go; a prefilling request in the way swaps rows with the mover.
        """
        n = len(decoding)
        holes = sorted(set(range(n)) - {r.row for r in decoding})
        movers = sorted((r for r in decoding if r.row >= n), key=lambda r: r.row)
        by_row = {r.row: r for r in self._running}
        for r, hole in zip(movers, holes):
            occupant = by_row.get(hole)
            if occupant is None:
                self.cache.copy_row(r.row, hole)
                self.cache.reset(r.row)
                with self._cond:
                    self._free.remove(hole)
                    self._free.append(r.row)
                    self._free.sort()
            else:
                k, v = self.cache.snapshot(hole)
                self.cache.copy_row(r.row, hole)
                self.cache.restore(r.row, k, v)
                occupant.row = r.row
            r.row = hole
        return sorted(decoding, key=lambda r: r.row)

    def _speculate(self, r: Request) -> bool:
        """One step of speculative decoding for ``r`` (see chatcore.speculative); False: nothing to guess."""
        # room for the pending token and k guesses, and the cache never fills mid-step (no slide among accepted tokens)
        k = min(self.speculator.k, r.params.max_new_tokens - len(r.reply) - 1,
                self.block_size - self.cache.length(r.row) - 2)
        if k < 1 or r.adapter_key is not None:
            return False
        guesses, q = self.speculator.propose(r.fed + [r.pending], k, r.params, r.reply, r.generator, self._exempt)
        guesses = guesses[:k]
        if not guesses:
            return False
        kept = self.cache.length(r.row) + 1  # the pending token, then each guess that stands
        logits = self._forward([r], [[r.pending] + guesses], last_only=False)[0]
        self.steps += 1
        self.step_rows += 1
        picked: list[int] = []
        for i, x in enumerate(guesses + [None]):
            previous = r.reply + picked
            if is_greedy(r.params):  # the model's own pick decides: plain greedy decoding's tokens
                tok = int(sample(logits[i : i + 1], r.params, [r.generator], [previous], self._exempt)[0])
            else:
                p = distribution(logits[i], r.params, previous, self._exempt)
                tok = accept_or_resample(x, p, None if q is None else q[i], r.generator) if x is not None \
                    else int(sample(logits[i : i + 1], r.params, [r.generator], [previous], self._exempt)[0])
            picked.append(tok)
            if tok != x:
                break
        self.drafted += len(guesses)
        self.accepted += len(picked) - 1
        kept += len(picked) - 1
        self.cache.truncate(r.row, kept)  # the rejected guesses' keys and values are dropped
        del r.fed[kept:]
        for tok in picked:  # each as plain decoding would take it: stop rules, max tokens, end-of-text
            self._accept(r, tok)
            if r not in self._running:
                break
        return True

    def _forward(self, requests: list[Request], tokens: list[list[int]], last_only: bool = True) -> torch.Tensor:
        T = max(len(t) for t in tokens)
        idx = torch.zeros(len(tokens), T, dtype=torch.long)
        for i, t in enumerate(tokens):
            idx[i, : len(t)] = torch.tensor(t)
        groups: dict[Any, list[int]] = {}
        for i, r in enumerate(requests):
            if r.adapter_key is not None:
                groups.setdefault(r.adapter_key, []).append(i)
        with route(self.model, list(groups.items())) if groups else nullcontext():  # base matmuls once; each group adds its own update
            logits = self.model.forward_cached(
                idx.to(self.device), self.cache, rows=[r.row for r in requests], n_new=[len(t) for t in tokens],
                last_only=last_only, pack=not groups,  # an adapter's rows are batch rows: keep the batch layout
            )
        for r, t in zip(requests, tokens):
            r.fed.extend(t)
            r.pending = None
        return logits[..., : self._vocab]  # the model's vocabulary may be padded: never pick a padding id

    def _sampled(self, requests: list[Request], logits: torch.Tensor) -> None:
        """Pick each request's next token and act on it."""
        # one call for the whole batch: `sample` draws row by row, each row with its own generator
        tokens = sample(logits, [r.params for r in requests], [r.generator for r in requests],
                        [r.reply for r in requests], self._exempt).tolist()
        for r, tok in zip(requests, tokens):
            try:
                self._accept(r, tok)
            except Exception as exc:  # this request's text handling failed: only it fails
                log.exception("a request failed while decoding")
                if r in self._running:
                    self._finish(r, error=exc)

    def _accept(self, r: Request, tok: int) -> None:
        if r.cancelled.is_set() or tok == self.tokenizer.eot_token:
            self._finish(r)
            return
        r.reply.append(tok)
        text, stopped = r.text.push(tok)
        if text:
            _send(r, text)
        if stopped or len(r.reply) >= r.params.max_new_tokens:
            self._finish(r, flush=not stopped)
            return
        if self.cache.length(r.row) >= self.block_size:
            self.cache.reset(r.row)  # context full: slide, exactly as the Engine does
            r.fed, r.todo = [], slide_window(r.context + r.reply, self.block_size)
        else:
            r.pending = tok

    def _finish(self, r: Request, flush: bool = True, error: BaseException | None = None) -> None:
        if error is None and flush and r.text is not None and not r.cancelled.is_set():
            rest = r.text.finish()
            if rest:
                _send(r, rest)
        if self.prefix_cache is not None and r.fed and error is None and len(r.fed) == self.cache.length(r.row):
            # what this row ran is valid for any prompt that starts with the same tokens; moved, not copied:
            # a copy would hold the row twice at the moment the process peaks (a long prompt just finished)
            self.prefix_cache.store(r.fed, *self.cache.take(r.row), namespace=r.adapter_key)  # take resets the row
        else:
            self.cache.reset(r.row)
        if r.adapter_key is not None:
            self.adapters.release(r.adapter_key)
            r.adapter_key = None
        with self._cond:
            self._running.remove(r)
            self._free.append(r.row)
            self._free.sort()
        _send(r, error if error is not None else DONE)


def _send(r: Request, item: Any) -> None:
    try:
        r.sink(item)
    except Exception:  # the consumer's loop is gone; nothing left to tell
        r.cancel()
