"""The batch worker decodes on one thread while that is faster than all of them, and comes back when it is not."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from chatcore.batching import DONE, BatchScheduler
from chatcore.engine import Engine
from chatcore.model import GPT, GPTConfig
from chatcore.sampling import SamplingParams
from chatcore.threads import ThreadTuner
from chatcore.tokenizer import Tokenizer


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def decode(tuner: ThreadTuner, clock: Clock, cost: dict[int, float], steps: int, batch: int = 1) -> list[int]:
    """Run `steps` decode steps where a step on n threads takes cost[n] seconds; the threads each step used."""
    used = []
    for _ in range(steps):
        n = tuner.choose(batch)
        clock.now += cost[n]
        tuner.observe(batch, n, cost[n])
        used.append(n)
    return used


def test_a_busy_machine_moves_decoding_to_one_thread_and_an_idle_one_brings_it_back():
    clock = Clock()
    tuner = ThreadTuner(2, min_interval=1.0, max_interval=30.0, clock=clock)
    idle, busy = {2: 0.015, 1: 0.025}, {2: 0.070, 1: 0.028}
    used = decode(tuner, clock, idle, 2000)  # 30 s idle: two threads win every probe
    assert tuner.current == 2 and tuner.switches == 0
    assert 0 < used.count(1) <= 8, used.count(1)  # probes back off: 1, 2, 4, 8, 16 s apart
    decode(tuner, clock, busy, 200)
    assert tuner.current == 1 and tuner.switches == 1
    used = decode(tuner, clock, busy, 1000)  # ~28 s busy on one thread: probing two costs little
    assert tuner.current == 1 and used.count(2) <= 6, used.count(2)
    decode(tuner, clock, idle, 4000)
    assert tuner.current == 2 and tuner.switches == 2


def test_one_fast_probe_is_not_enough_to_switch():
    clock = Clock()
    tuner = ThreadTuner(2, min_interval=1.0, clock=clock)
    decode(tuner, clock, {2: 0.015, 1: 0.025}, 100)
    clock.now = tuner.next_probe
    assert tuner.choose(1) == 1
    tuner.observe(1, 1, 0.001)  # a lucky probe
    assert tuner.current == 2 and tuner.choose(1) == 1  # probes again at once
    tuner.observe(1, 1, 0.030)
    assert tuner.current == 2 and tuner.choose(1) == 2


def test_probes_compare_steps_of_the_same_batch_size():
    clock = Clock()
    tuner = ThreadTuner(2, min_interval=1.0, clock=clock)
    decode(tuner, clock, {2: 0.100, 1: 0.150}, 50, batch=8)  # batch 8 steps are slow on any setting
    clock.now += 5
    assert tuner.choose(1) == 2  # no batch-1 steps to compare with yet
    decode(tuner, clock, {2: 0.015, 1: 0.025}, 200, batch=1)
    assert tuner.current == 2 and tuner.switches == 0


def test_one_thread_has_nothing_to_tune():
    tuner = ThreadTuner(1, min_interval=0.0)
    assert decode(tuner, Clock(), {1: 0.01}, 50) == [1] * 50


@pytest.fixture(scope="module")
def engine() -> Engine:
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=128, vocab_size=50257, n_layer=2, n_head=2, n_embd=32))
    return Engine(model, Tokenizer(), model_id="tiny", device="cpu", dtype="float32", threads=2)


def _reply(sched: BatchScheduler, params: SamplingParams) -> str:
    parts, done = [], threading.Event()
    sched.submit("Human: hi\nAssistant:", params,
                 lambda item: done.set() if item is DONE or isinstance(item, BaseException) else parts.append(item))
    assert done.wait(60)
    return "".join(parts)


def test_the_batch_worker_decodes_on_one_thread_while_two_are_slower_and_replies_stay_the_same(engine):
    params = SamplingParams(temperature=0, max_new_tokens=60, stop_at_newline=False)
    steady = BatchScheduler(engine, max_batch=2, adapt_threads=False)
    expected = _reply(steady, params)
    steady.close(timeout=10)
    assert steady.tuner is None

    sched = BatchScheduler(engine, max_batch=2)
    assert sched.tuner is not None and sched.tuner.current == 2
    sched.tuner = ThreadTuner(2, min_interval=0.001, max_interval=60.0)  # probe within milliseconds
    forward, threads_seen = engine.model.forward_cached, []

    def contended(idx, cache, **kw):  # what a busy machine does to a two-thread step
        threads_seen.append(torch.get_num_threads())
        if torch.get_num_threads() > 1:
            time.sleep(0.01)
        return forward(idx, cache, **kw)

    engine.model.forward_cached = contended
    try:
        assert _reply(sched, params) == expected
    finally:
        del engine.model.forward_cached
        sched.close(timeout=10)
    assert sched.tuner.current == 1 and sched.tuner.switches == 1
    assert threads_seen[-10:].count(1) >= 9, threads_seen  # after the switch only a probe uses two, ever rarer
