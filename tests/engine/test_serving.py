"""Generator: batched serving of a real (tiny) engine, the simple path for ScriptedEngine, hot swap, Busy, cancel."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from chatcore.batching import BatchScheduler
from chatcore.engine import Engine
from chatcore.model import GPT, GPTConfig
from chatcore.sampling import SamplingParams
from chatcore.message import Busy
from chatcore.serving import Generator
from chatcore.testing import ScriptedEngine
from chatcore.tokenizer import Tokenizer

GREEDY = SamplingParams(temperature=0, max_new_tokens=12, stop_at_newline=False)
LONG = SamplingParams(temperature=1.0, max_new_tokens=10_000, stop_at_newline=False)


def _engine(seed: int) -> Engine:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=96, vocab_size=50257, n_layer=2, n_head=2, n_embd=32))
    return Engine(model, Tokenizer(), model_id=f"tiny{seed}", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def engines() -> tuple[Engine, Engine]:
    return _engine(0), _engine(1)


async def _until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


async def test_concurrent_streams_are_batched_and_equal_unbatched(engines):
    engine = engines[0]
    gen = Generator(engine, max_batch=4)
    prompts = [f"Human: question number {i} {'about things ' * i}\nAssistant:" for i in range(6)]
    try:
        got = await asyncio.gather(*(gen.generate(p, GREEDY.updated(seed=i)) for i, p in enumerate(prompts)))
        assert isinstance(gen.backend, BatchScheduler)
        assert got == [engine.generate(p, GREEDY) for p in prompts]
        assert gen.backend.steps < 6 * GREEDY.max_new_tokens * 0.7
    finally:
        await gen.close()


async def test_leaving_a_stream_frees_its_row(engines):
    gen = Generator(engines[0], max_batch=1)
    try:
        async for _ in gen.stream("Human: go on forever\nAssistant:", LONG):
            break  # the client went away
        await _until(lambda: gen.backend.running == 0)
        steps = gen.backend.steps
        assert await gen.generate("Human: hi\nAssistant:", GREEDY) == engines[0].generate("Human: hi\nAssistant:", GREEDY)
        assert gen.backend.steps - steps <= GREEDY.max_new_tokens
    finally:
        await gen.close()


async def test_busy_when_the_queue_is_full(engines):
    gen = Generator(engines[0], max_batch=1, max_queue=1)
    first = gen.stream("Human: one\nAssistant:", LONG)
    try:
        await first.__anext__()  # running: holds the only row
        second = gen.stream("Human: two\nAssistant:", LONG)
        task = asyncio.ensure_future(second.__anext__())  # waits for a row
        await _until(lambda: gen.backend.waiting == 1)
        with pytest.raises(Busy):
            await gen.stream("Human: three\nAssistant:", GREEDY).__anext__()
        await first.aclose()  # frees the row: the waiting one starts
        assert isinstance(await asyncio.wait_for(task, 5), str)
        await second.aclose()
    finally:
        await gen.close()


async def test_hot_swap_running_requests_finish_on_the_old_engine(engines):
    old, new = engines
    gen = Generator(old)
    prompt = "Human: tell me something\nAssistant:"
    params = GREEDY.updated(max_new_tokens=30)
    try:
        running = gen.stream(prompt, params)
        parts = [await running.__anext__()]
        old_backend = gen.backend
        gen.swap(new)
        assert gen.engine is new
        after = await gen.generate(prompt, params)
        parts += [d async for d in running]
        assert "".join(parts) == old.generate(prompt, params)
        assert after == new.generate(prompt, params) != "".join(parts)
        await _until(lambda: old_backend.stopped)  # drained, its thread ended
        assert gen.backend is not old_backend and gen.backend.engine is new
    finally:
        await gen.close()


async def test_close_ends_outstanding_streams(engines):
    gen = Generator(engines[0], max_batch=1)
    running = gen.stream("Human: a\nAssistant:", LONG)
    await running.__anext__()
    waiting = asyncio.ensure_future(gen.generate("Human: b\nAssistant:", LONG))
    await _until(lambda: gen.backend.waiting == 1)
    backend = gen.backend
    await gen.close()
    rest = [d async for d in running]  # ends instead of hanging
    assert len(rest) < 10_000
    assert await asyncio.wait_for(waiting, 5) == ""
    await _until(lambda: backend.stopped)
    with pytest.raises(RuntimeError, match="closed"):
        await gen.generate("Human: c\nAssistant:", GREEDY)


async def test_bad_params_raise_value_error(engines):
    gen = Generator(engines[0])
    try:
        with pytest.raises(ValueError, match="top_p"):
            await gen.generate("Human: hi\nAssistant:", SamplingParams(top_p=0))
    finally:
        await gen.close()


# --- engines without a batchable model: one at a time ---------------------------------


async def test_scripted_engine_is_served_one_at_a_time():
    engine = ScriptedEngine(["hello there friend"])
    gen = Generator(engine)
    try:
        assert await gen.generate("Human: hi\nAssistant:", SamplingParams()) == " hello there friend"
        assert not isinstance(gen.backend, BatchScheduler)
        assert engine.prompts == ["Human: hi\nAssistant:"]
    finally:
        await gen.close()


async def test_scripted_busy_cancel_and_swap():
    words = " ".join(f"w{i}" for i in range(500))
    slow = ScriptedEngine([words], delay=0.01)
    gen = Generator(slow, max_queue=1)
    params = SamplingParams(max_new_tokens=1000)
    try:
        stream = gen.stream("Human: x\nAssistant:", params)
        assert await stream.__anext__() == " w0"
        with pytest.raises(Busy):
            await gen.generate("Human: y\nAssistant:", params)
        await stream.aclose()  # the engine stops at its next word
        start = time.monotonic()
        old = gen.backend
        await _until(lambda: old.idle, 2)
        gen.swap(ScriptedEngine(["swapped"]))
        assert await gen.generate("Human: z\nAssistant:", params) == " swapped"
        assert time.monotonic() - start < 2  # not 5 s of the old reply
    finally:
        await gen.close()


async def test_max_queue_zero_refuses_everything_on_the_simple_path():
    gen = Generator(ScriptedEngine(), max_queue=0)
    try:
        with pytest.raises(Busy):
            await gen.generate("Human: hi\nAssistant:", SamplingParams())
    finally:
        await gen.close()
