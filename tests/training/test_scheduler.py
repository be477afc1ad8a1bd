"""The background job process, its lock and cancellation, hot swap, and the auto-fine-tune plugin."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from chatcore import checkpoint, hookimpl
from chatcore.engine import Engine
from chatcore.model import GPT, GPTConfig
from chatcore.sampling import SamplingParams
from chatcore.serving import Generator
from chatcore.store import Store
from chatcore.testing import ScriptedEngine, make_bot
from chatcore.tokenizer import Tokenizer
from chatcore.registry import Registry
from chatcore.training.job import JobSpec
from chatcore.training.scheduler import JobBusy, JobScheduler

SAMPLE = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "sample_conversations.jsonl"
QUICK = dict(max_iters=10, eval_interval=5, warmup_iters=2, batch_size=4, block_size=64,
             learning_rate=3e-3, min_lr=3e-4)
ENDLESS = dict(max_iters=100_000, eval_interval=100_000, batch_size=2, block_size=32)


def tiny(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=128, n_layer=2, n_head=2, n_embd=32))


def wait_for(predicate, timeout: float = 90.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def models(tmp_path):
    """A models folder whose registry already serves a promoted checkpoint."""
    d = tmp_path / "models"
    serving = checkpoint.save(tiny(1), d / "finetuned_20260101_000000")
    Registry(d).promote(serving)
    return d, serving, checkpoint.save(tiny(), tmp_path / "base")


def snapshot(d: Path) -> set[str]:
    return {p.name for p in d.iterdir() if p.name not in ("jobs", ".finetune.lock")}


def start_endless(d: Path, base: Path) -> tuple[JobScheduler, object]:
    sched = JobScheduler(d, threads=1)
    job = sched.start(JobSpec(models_dir=str(d), base=str(base), jsonl=[str(SAMPLE)], train=ENDLESS,
                              progress=False))
    wait_for(lambda: "fine-tune:" in (job.dir / "log.txt").read_text(), what="training to start")
    time.sleep(0.5)  # well inside the loop
    return sched, job


@pytest.mark.slow  # a worker process: torch import + a short training
def test_killed_job_leaves_serving_untouched_and_no_checkpoint(models):
    d, serving, base = models
    before = snapshot(d)
    sched, job = start_endless(d, base)
    assert sched.busy()
    with pytest.raises(JobBusy, match=f"pid {job.pid}"):
        sched.start(JobSpec(models_dir=str(d), base=str(base)))  # one job at a time
    os.kill(job.pid, signal.SIGKILL)
    result = job.wait(30)
    assert result["status"] == "failed" and "signal 9" in result["error"]
    assert Registry(d).current() == serving
    assert snapshot(d) == before  # no candidate, no half file: exactly what was there
    assert not sched.busy()  # the lock died with the worker


@pytest.mark.slow  # a worker process: torch import + a short training
def test_cancel_stops_the_job_and_a_new_one_can_start(models):
    d, serving, base = models
    (d / ".finetuned_20260101_000001.safetensors.dead.tmp").write_bytes(b"half")  # a crash mid-write
    before = snapshot(d) - {".finetuned_20260101_000001.safetensors.dead.tmp"}
    sched, job = start_endless(d, base)
    assert not (d / ".finetuned_20260101_000001.safetensors.dead.tmp").exists()  # cleaned by the next start
    result = job.cancel(grace=60)  # generous: CI machines can be very busy
    assert result["status"] == "cancelled" and job.proc.returncode == 3
    assert Registry(d).current() == serving and snapshot(d) == before
    assert not sched.busy()


async def test_hot_swap_under_concurrent_requests_loses_none():
    tok = Tokenizer()

    def engine_saying(word: str, seed: int) -> Engine:
        # The last layer norm ignores its input and emits one token's (enlarged) embedding,
        # so greedy decoding repeats that token: each engine's answer is unmistakable.
        model = tiny(seed)
        (t,) = tok.encode(word)
        with torch.no_grad():
            model.transformer.wte.weight[t] *= 5
            model.transformer.ln_f.weight.zero_()
            model.transformer.ln_f.bias.copy_(model.transformer.wte.weight[t])
        return Engine(model, tok, model_id=word.strip(), device="cpu", dtype=torch.float32)

    old, new = engine_saying(" old", 0), engine_saying(" new", 1)
    params = SamplingParams(temperature=0, max_new_tokens=6, stop_at_newline=False)
    gen = Generator(old, max_queue=64)
    try:
        first = [asyncio.create_task(gen.generate(f"Human: hi {i}\nAssistant:", params)) for i in range(12)]
        await asyncio.sleep(0.05)
        gen.swap(new)  # fully built engine, one reference swapped
        second = [asyncio.create_task(gen.generate(f"Human: yo {i}\nAssistant:", params)) for i in range(12)]
        results = await asyncio.wait_for(asyncio.gather(*first, *second), 120)
    finally:
        await gen.close()
    assert len(results) == 24
    assert results[:12] == [" old" * 6] * 12  # submitted before the swap: finished on the old model
    assert results[12:] == [" new" * 6] * 12
    assert gen.engine is new


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []

    @hookimpl
    def finetune_started(self, bot, job):
        self.events.append(("started", {"job": job.id}))

    @hookimpl
    def finetune_finished(self, bot, job, result):
        self.events.append(("finished", result))

    @hookimpl
    def finetune_promoted(self, bot, result):
        self.events.append(("promoted", result))

    @hookimpl
    def finetune_rejected(self, bot, result):
        self.events.append(("rejected", result))


@pytest.mark.slow  # a worker process: torch import + a short training
async def test_counter_triggers_at_n_survives_restart_and_promotion_swaps(tmp_path, caplog):
    from chatcore.plugins import auto_finetune

    base = checkpoint.save(tiny(), tmp_path / "base", base_model="random-test")
    with Store(tmp_path / "history.db") as store:  # make_bot's data_dir is tmp_path
        store.import_jsonl(SAMPLE)
        store.mark_finetune()  # the sample is old news: the counter starts at 0
    config = {
        "model": {"checkpoint": str(base), "device": "cpu", "threads": 1},
        "plugins": {"auto_finetune": {"every": 3, "cooldown_minutes": 0, "threads": 1, "training": QUICK}},
    }

    def scripted() -> ScriptedEngine:
        engine = ScriptedEngine(["sure, sounds good", "I like that a lot", "tell me more about it"])
        engine.meta = {"source": str(base)}  # what Engine.meta carries for a loaded checkpoint
        return engine

    def msg(text: str, user: str):
        from chatcore.message import Message

        return Message(text=text, adapter="test", channel="c", user=user, is_direct=True)

    bot = make_bot(tmp_path, engine=scripted(), config=config)
    await bot.handle(msg("hello there", "alice"))
    await bot.handle(msg("what do you like?", "bob"))
    assert auto_finetune.state_of(bot).job is None  # 2 < 3
    await bot.close()

    recorder = Recorder()
    bot = make_bot(tmp_path, engine=scripted(), config=config, plugins=[recorder])  # a restart
    try:
        assert bot.store.exchanges_since_finetune() == 2
        await bot.handle(msg("any plans for the weekend?", "carol"))
        st = auto_finetune.state_of(bot)
        assert st.job is not None and [e[0] for e in recorder.events] == ["started"]
        # the bot keeps answering while the job runs in its own process
        reply = await bot.handle(msg("still there?", "dave"))
        assert reply is not None and reply.text
        result = await asyncio.wait_for(st.task, 180)
    finally:
        st = auto_finetune._states.get(bot)
        if st is not None and st.running:
            st.job.cancel()
    assert result["status"] == "promoted", result
    assert [e[0] for e in recorder.events] == ["started", "finished", "promoted"]
    assert recorder.events[2][1]["gate"]["candidate_val_loss"] < recorder.events[2][1]["gate"]["serving_val_loss"]
    # hot-swapped to the candidate: a real engine now serves
    assert isinstance(bot.engine, Engine) and bot.engine.meta["source"] == result["candidate"]
    # the counter restarts from the newest exchange the job read: dave's counts again if it came later
    assert bot.store.exchanges_since_finetune() == (1 if reply.exchange_id > result["up_to_id"] else 0)
    assert result["data"]["train_exchanges"] + result["data"]["val_exchanges"] >= 350
    await bot.close()


async def test_finetune_command_is_admin_only_and_reports_status(tmp_path):
    engine = ScriptedEngine()
    bot = make_bot(tmp_path, engine=engine, config={"bot": {"admins": ["test:root"]},
                                                   "plugins": {"auto_finetune": {"every": 5}}})
    from chatcore.message import Message

    def msg(text: str, user: str) -> Message:
        return Message(text=text, adapter="test", channel="c", user=user, is_direct=True)

    try:
        assert "Unknown command" in (await bot.handle(msg("/finetune", "eve"))).text
        status = (await bot.handle(msg("/finetune status", "root"))).text
        assert "No fine-tune is running" in status and "base model" in status
        # a scripted engine has no weights to start from: a clear refusal, nothing started
        assert "Not started" in (await bot.handle(msg("/finetune", "root"))).text
        assert (await bot.handle(msg("/finetune cancel", "root"))).text == "No fine-tune is running."
    finally:
        await bot.close()
