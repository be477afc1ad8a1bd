"""No single request can take down serving: the batch worker fails that request and keeps the others (issue 17, item 1)."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from chatcore import batching, reply_text, serving
from chatcore.batching import DONE, BatchScheduler
from chatcore.engine import Engine
from chatcore.model import GPT, GPTConfig
from chatcore.params import SamplingParams, validate
from chatcore.serving import Generator
from chatcore.testing import ScriptedEngine
from chatcore.tokenizer import Tokenizer

PARAMS = SamplingParams(temperature=0.0, max_new_tokens=6, stop_at_newline=False)


@pytest.fixture(scope="module")
def engine() -> Engine:
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=1, n_head=2, n_embd=16))
    return Engine(model, Tokenizer(), model_id="tiny", device="cpu", dtype="float32")


class Sink:
    def __init__(self) -> None:
        self.parts: list[str] = []
        self.error: BaseException | None = None
        self.done = threading.Event()

    def __call__(self, item) -> None:
        if item is DONE or isinstance(item, BaseException):
            self.error = None if item is DONE else item
            self.done.set()
        else:
            self.parts.append(item)

    def wait(self) -> "Sink":
        assert self.done.wait(30), "the request never finished: the worker is dead or stuck"
        return self


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 10**400, True, 1.5])
def test_out_of_range_seeds_are_refused_before_they_reach_the_worker(seed):
    with pytest.raises(ValueError, match="seed"):
        validate(PARAMS.updated(seed=seed))


def test_a_seed_torch_refuses_fails_only_its_request(engine, monkeypatch):
    # as if validation had let it through: the worker must still survive
    monkeypatch.setattr(batching, "validate", lambda params: params)
    scheduler = BatchScheduler(engine, max_batch=2)
    try:
        bad, good = Sink(), Sink()
        scheduler.submit("Human: bad seed\nAssistant:", PARAMS.updated(temperature=0.8, seed=2**64), bad)
        scheduler.submit("Human: hi\nAssistant:", PARAMS, good)
        assert isinstance(bad.wait().error, (ValueError, RuntimeError))
        assert good.wait().error is None and good.parts
        after = scheduler.submit("Human: again\nAssistant:", PARAMS, Sink())
        assert after.sink.wait().error is None
        assert scheduler.health(60) is None
    finally:
        scheduler.close(drain=False, timeout=10)


def test_failures_inside_one_request_fail_only_that_request(engine, monkeypatch):
    """Inject a failure at admission (prompt) and while decoding (text) for one request; others complete."""
    real_encode, real_push = engine.tokenizer.encode, reply_text.ReplyText.push

    def encode(text, *args, **kwargs):
        if "EXPLODE-AT-START" in text:
            raise RuntimeError("injected: tokenizer failure")
        return real_encode(text, *args, **kwargs)

    def push(self, token):
        if getattr(self, "poisoned", False):
            raise RuntimeError("injected: decoder failure")
        return real_push(self, token)

    monkeypatch.setattr(engine.tokenizer, "encode", encode)
    monkeypatch.setattr(reply_text.ReplyText, "push", push)
    real_start = BatchScheduler._start

    def start(self, r):
        real_start(self, r)
        r.text.poisoned = "EXPLODE-WHILE-DECODING" in r.prompt

    monkeypatch.setattr(BatchScheduler, "_start", start)
    scheduler = BatchScheduler(engine, max_batch=3)
    try:
        sinks = {p: Sink() for p in ["Human: one\nAssistant:", "Human: EXPLODE-AT-START\nAssistant:",
                                     "Human: two\nAssistant:", "Human: EXPLODE-WHILE-DECODING\nAssistant:",
                                     "Human: three\nAssistant:"]}
        for prompt, sink in sinks.items():
            scheduler.submit(prompt, PARAMS, sink)
        results = {p: s.wait() for p, s in sinks.items()}
        failed = sorted(p for p, s in results.items() if s.error is not None)
        assert failed == ["Human: EXPLODE-AT-START\nAssistant:", "Human: EXPLODE-WHILE-DECODING\nAssistant:"]
        assert all(s.parts for p, s in results.items() if "EXPLODE" not in p)
        assert scheduler.submit("Human: later\nAssistant:", PARAMS, Sink()).sink.wait().error is None
    finally:
        scheduler.close(drain=False, timeout=10)


def test_a_dead_worker_fails_waiting_requests_and_reports_itself(engine, monkeypatch):
    scheduler = BatchScheduler(engine, max_batch=1)
    try:
        assert scheduler.health(60) is None

        def die(self):
            raise SystemExit("injected: the worker thread dies")

        monkeypatch.setattr(BatchScheduler, "_step", die)
        sink = Sink()
        scheduler.submit("Human: hi\nAssistant:", PARAMS, sink)
        assert sink.wait().error is not None  # failed, not left hanging
        scheduler.join(10)
        assert "stopped" in scheduler.health(60)
        with pytest.raises(RuntimeError, match="stopped"):
            scheduler.submit("Human: hi\nAssistant:", PARAMS, Sink())
    finally:
        scheduler.close(drain=False, timeout=10)


async def test_generator_health_reports_a_stuck_model(monkeypatch):
    gate = threading.Event()
    generator = Generator(ScriptedEngine(lambda prompt: "done" if gate.wait(10) else "never"))
    monkeypatch.setattr(serving, "STUCK_AFTER_S", 0.2)
    try:
        assert generator.health() is None
        task = asyncio.create_task(generator.generate("Human: hi\nAssistant:", PARAMS))
        while not generator.engine.prompts:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        assert "no progress" in generator.health()
        gate.set()
        assert (await task).strip() == "done"
        assert generator.health() is None
    finally:
        gate.set()
        await generator.close()
    assert generator.health() == "the generator is closed"
