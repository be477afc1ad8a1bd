"""Continuous batching: batched replies equal unbatched ones, nobody waits, cancel frees rows, the queue is bounded."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from chatcore.batching import DONE, BatchScheduler
from chatcore.message import Busy
from chatcore.engine import Engine
from chatcore.model import GPT, GPTConfig
from chatcore.prefix_cache import PrefixCache
from chatcore.sampling import SamplingParams
from chatcore.tokenizer import Tokenizer

PROMPTS = [
    "Human: hi\nAssistant:",
    "Human: what is the capital of France, and why is it famous?\nAssistant:",
    "Human: tell me a story about a dragon who learned to code in Python\nAssistant:",
    "Human: ok\nAssistant:",
    "Human: 😀 emoji and ünïcödé text\nAssistant:",
    "Human: a somewhat longer message that goes on for a while so that the prompt has many more tokens than the others do\nAssistant:",
]


@pytest.fixture(scope="module")
def engine() -> Engine:
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=96, vocab_size=50257, n_layer=2, n_head=2, n_embd=32))
    return Engine(model, Tokenizer(), model_id="tiny", device="cpu", dtype="float32")


class Collector:
    """A sink that records deltas and completion (the Generator's role, without asyncio)."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.first = threading.Event()
        self.finished_at = 0.0

    def __call__(self, item) -> None:
        if item is DONE or isinstance(item, BaseException):
            self.error = item if item is not DONE else None
            self.finished_at = time.perf_counter()
            self.done.set()
        else:
            self.parts.append(item)
            self.first.set()

    @property
    def text(self) -> str:
        assert self.done.wait(30), "request did not finish"
        if self.error:
            raise self.error
        return "".join(self.parts)


def _run_all(sched: BatchScheduler, jobs: list[tuple[str, SamplingParams]], stagger: float = 0.0) -> list[str]:
    sinks = []
    for prompt, params in jobs:
        sink = Collector()
        sched.submit(prompt, params, sink)
        sinks.append(sink)
        if stagger:
            time.sleep(stagger)
    return [s.text for s in sinks]


def test_greedy_batched_equals_unbatched(engine):
    jobs = [(p, SamplingParams(temperature=0, max_new_tokens=8 + 5 * i, stop_at_newline=i % 2 == 0)) for i, p in enumerate(PROMPTS)]
    expected = [engine.generate(p, params) for p, params in jobs]
    sched = BatchScheduler(engine, max_batch=4, prefill_chunk=64)  # every prompt is one chunk of >= 2 tokens
    decode_rows = []
    forward = sched.model.forward_cached

    def spy(idx, cache, rows, **kw):
        if idx.size(1) == 1:
            decode_rows.append(list(rows))
        return forward(idx, cache, rows=rows, **kw)

    sched.model = type("Spy", (), {"forward_cached": staticmethod(spy)})()
    try:
        got = _run_all(sched, jobs, stagger=0.002)
    finally:
        sched.close(timeout=5)
    assert got == expected
    # requests came and went mid-batch, yet every decode step read rows 0..n-1 (one view, no gather)
    assert {len(r) for r in decode_rows} >= {2, 4}
    assert all(rows == list(range(len(rows))) for rows in decode_rows)
    assert any(expected)
    # they really shared decode steps: far fewer steps than tokens generated
    assert sched.steps < sum(len(engine.tokenizer.encode(t)) for t in expected) * 0.7


def test_seeded_sampling_batched_equals_unbatched(engine):
    settings = [
        dict(temperature=0.8, top_k=200, seed=1),
        dict(temperature=1.2, top_k=None, seed=2),
        dict(temperature=0.7, top_k=5, top_p=0.9, seed=3),
        dict(temperature=1.0, top_k=200, repetition_penalty=1.3, seed=4),
        dict(temperature=0, seed=5),
        dict(temperature=0.9, top_k=40, seed=6),
    ]
    jobs = [(p, SamplingParams(max_new_tokens=20, stop_at_newline=False, **kw)) for p, kw in zip(PROMPTS, settings)]
    expected = [engine.generate(p, params) for p, params in jobs]
    sched = BatchScheduler(engine, max_batch=8)
    try:
        got = _run_all(sched, jobs)
    finally:
        sched.close(timeout=5)
    assert got == expected
    assert len(set(expected)) == len(expected)


def test_stop_strings_and_sliding_window_match_the_engine(engine):
    long_prompt = "Human: " + "word " * 80 + "\nAssistant:"  # close to block_size 96: the window slides
    base = SamplingParams(temperature=0, max_new_tokens=40, stop_at_newline=False)
    free = engine.generate(PROMPTS[2], base)
    stop = free[len(free) // 2 : len(free) // 2 + 3]  # a string the reply is known to contain
    jobs = [(PROMPTS[2], base.updated(stop=(stop,))), (long_prompt, base), (PROMPTS[0], base.updated(max_new_tokens=0))]
    expected = [engine.generate(p, params) for p, params in jobs]
    assert len(expected[0]) < len(free) and stop not in expected[0]
    assert expected[2] == ""
    sched = BatchScheduler(engine, max_batch=3, prefill_chunk=32)
    try:
        assert _run_all(sched, jobs) == expected
    finally:
        sched.close(timeout=5)


def test_a_short_request_does_not_wait_for_a_long_one(engine):
    sched = BatchScheduler(engine, max_batch=2)
    try:
        long, short = Collector(), Collector()
        sched.submit(PROMPTS[2], SamplingParams(temperature=0, max_new_tokens=80, stop_at_newline=False), long)
        assert long.first.wait(10)
        sched.submit(PROMPTS[0], SamplingParams(temperature=0, max_new_tokens=3, stop_at_newline=False), short)
        short.text, long.text
        assert short.finished_at < long.finished_at
    finally:
        sched.close(timeout=5)


def test_cancellation_frees_the_slot(engine):
    sched = BatchScheduler(engine, max_batch=1, max_queue=4)
    try:
        endless = Collector()
        r = sched.submit(PROMPTS[1], SamplingParams(temperature=1.0, max_new_tokens=10_000, stop_at_newline=False), endless)
        assert endless.first.wait(10)
        nxt = Collector()
        sched.submit(PROMPTS[0], SamplingParams(temperature=0, max_new_tokens=5, stop_at_newline=False), nxt)
        time.sleep(0.05)
        assert sched.waiting == 1 and not nxt.first.is_set()  # the only row is taken
        r.cancel()
        assert nxt.done.wait(10) and nxt.error is None  # it got the freed row
        assert endless.done.is_set()
        steps = sched.steps
        time.sleep(0.05)
        assert sched.steps == steps and sched.running == 0  # the cancelled request consumes nothing
        assert len(r.reply) < 10_000
    finally:
        sched.close(timeout=5)


def test_cancelled_while_waiting_never_runs(engine):
    sched = BatchScheduler(engine, max_batch=1)
    try:
        first = Collector()
        sched.submit(PROMPTS[2], SamplingParams(temperature=0, max_new_tokens=30, stop_at_newline=False), first)
        assert first.first.wait(10)
        waiting = Collector()
        r = sched.submit(PROMPTS[0], SamplingParams(temperature=0, max_new_tokens=30), waiting)
        r.cancel()
        assert waiting.done.wait(10) and waiting.parts == [] and r.reply == []
        first.text
    finally:
        sched.close(timeout=5)


def test_queue_bound_raises_busy(engine):
    sched = BatchScheduler(engine, max_batch=1, max_queue=2)
    try:
        params = SamplingParams(temperature=1.0, max_new_tokens=10_000, stop_at_newline=False)
        running = Collector()
        handles = [sched.submit(PROMPTS[0], params, running)]
        assert running.first.wait(10)
        handles += [sched.submit(PROMPTS[1], params, Collector()) for _ in range(2)]
        with pytest.raises(Busy):
            sched.submit(PROMPTS[2], params, Collector())
        assert sched.waiting == 2 and sched.running == 1
        handles[1].cancel()
        time.sleep(0.05)
        sched.submit(PROMPTS[2], params, Collector())  # room again
    finally:
        sched.close(drain=False, timeout=5)
    assert sched.stopped


def test_bad_params_are_refused_before_queueing(engine):
    sched = BatchScheduler(engine)
    try:
        with pytest.raises(ValueError, match="temperature"):
            sched.submit("Human: hi\nAssistant:", SamplingParams(temperature=-1), Collector())
        assert sched.waiting == 0
    finally:
        sched.close(timeout=5)


def test_follow_up_turn_reuses_the_cached_prefix(engine):
    prefixes = PrefixCache(budget_bytes=64 * 2**20)
    sched = BatchScheduler(engine, max_batch=2, prefill_chunk=8, prefix_cache=prefixes)
    params = SamplingParams(temperature=0, max_new_tokens=6, stop_at_newline=False)
    try:
        turn1 = "Human: tell me about the sea and the ships on it\nAssistant:"
        reply1 = _run_all(sched, [(turn1, params)])[0]
        turn2 = f"{turn1}{reply1.rstrip()}\n\nHuman: and the fish?\nAssistant:"
        sink = Collector()
        r = sched.submit(turn2, params, sink)
        assert sink.text == engine.generate(turn2, params)
        # everything up to the reply's first token (re-tokenized after "Assistant:") is reused
        assert r.reused >= len(engine.tokenizer.encode(turn1)) - 1
        assert prefixes.hits == 1
    finally:
        sched.close(timeout=5)


def test_prompts_waiting_together_are_prefilled_in_one_forward(engine):
    """Prompts that arrive while the worker is busy run their prompt chunks in one forward (within
    `prefill_tokens`, padding included), and still get the tokens they would get alone."""
    jobs = [(p, SamplingParams(temperature=0, max_new_tokens=6, stop_at_newline=False)) for p in PROMPTS[:5]]
    expected = [engine.generate(p, params) for p, params in jobs]
    for budget, together in ((512, 4), (2 * 16, 2)):
        sched = BatchScheduler(engine, max_batch=8, prefill_chunk=16, prefill_tokens=budget)
        forward, gate, prefills = sched.model.forward_cached, threading.Event(), []

        def spy(idx, cache, rows, **kw):
            gate.wait(10)  # the first forward holds the worker until every request is queued
            if idx.size(1) > 1:
                prefills.append((idx.size(0), idx.size(1)))
            return forward(idx, cache, rows=rows, **kw)

        sched.model = type("Spy", (), {"forward_cached": staticmethod(spy)})()
        try:
            sinks = [Collector() for _ in jobs]
            sched.submit(*jobs[0], sinks[0])
            time.sleep(0.05)  # the worker is inside its first forward
            for job, sink in zip(jobs[1:], sinks[1:]):
                sched.submit(*job, sink)
            gate.set()
            assert [s.text for s in sinks] == expected
        finally:
            sched.close(timeout=5)
        assert max(rows for rows, _ in prefills) >= together  # the four waiting prompts ran together
        assert all(rows * width <= budget for rows, width in prefills)  # padding included


def test_a_prompt_runs_in_chunks_only_while_others_are_decoding(engine):
    """Chunks keep a long prompt from stalling the conversations decoding beside it; a prompt with
    nobody decoding beside it runs in one forward (up to `prefill_tokens`), and answers the same."""
    long_prompt, params = PROMPTS[5], SamplingParams(temperature=0, max_new_tokens=4, stop_at_newline=False)
    n = len(engine.tokenizer.encode(long_prompt))
    assert 8 < n <= 64
    sched = BatchScheduler(engine, max_batch=2, prefill_chunk=8, prefill_tokens=64)
    forward, widths = sched.model.forward_cached, []

    def spy(idx, cache, rows, **kw):
        if idx.size(1) > 1:
            widths.append(idx.size(1))
        return forward(idx, cache, rows=rows, **kw)

    sched.model = type("Spy", (), {"forward_cached": staticmethod(spy)})()
    try:
        assert _run_all(sched, [(long_prompt, params)]) == [engine.generate(long_prompt, params)]
        assert widths == [n]  # alone: one forward
        widths.clear()
        talker = Collector()
        sched.submit(PROMPTS[0], SamplingParams(temperature=0, max_new_tokens=60, stop_at_newline=False), talker)
        assert talker.first.wait(10)
        widths.clear()  # the talker's own prompt
        assert _run_all(sched, [(long_prompt, params)]) == [engine.generate(long_prompt, params)]
        assert not talker.done.is_set(), "the talker must still be decoding while the prompt runs"
        assert widths and max(widths) <= 8 and sum(widths) >= n  # beside a decoding conversation: chunks
    finally:
        sched.close(timeout=5)


def test_a_ragged_prefill_beside_a_row_near_the_end_of_the_window_stays_inside_it():
    # batched prefill pads a short chunk to the longest: a row holding 55 of 64 positions must not be
    # padded past position 63 (the bot answered 500 for every request once such a batch formed)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=1000, n_layer=2, n_head=2, n_embd=32)).eval()
    ids = torch.randint(0, 1000, (60,))
    with torch.no_grad():
        alone = model.new_cache(max_batch=1)
        want_long = model.forward_cached(ids[None, :60], alone, rows=[0])
        alone = model.new_cache(max_batch=1)
        want_short = model.forward_cached(ids[None, :30], alone, rows=[0])
        cache = model.new_cache(max_batch=2)
        model.forward_cached(ids[None, :55], cache, rows=[0])
        idx = torch.zeros(2, 30, dtype=torch.long)
        idx[0, :5], idx[1] = ids[55:60], ids[:30]
        got = model.forward_cached(idx, cache, rows=[0, 1], n_new=[5, 30])
    torch.testing.assert_close(got[0], want_long[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got[1], want_short[0], atol=1e-5, rtol=1e-4)
    assert cache.length(0) == 60 and cache.length(1) == 30
