"""The background job process, its lock and cancellation, and the hot swap."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from chatcore import checkpoint
from chatcore.engine import Engine
from chatcore.model import GPT, GPTConfig
from chatcore.sampling import SamplingParams
from chatcore.serving import Generator
from chatcore.registry import Registry
from chatcore.tokenizer import Tokenizer
from chatcore.training.job import JobSpec
from chatcore.training.scheduler import JobBusy, JobScheduler

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


def start_endless(d: Path, base: Path, corpus: Path) -> tuple[JobScheduler, object]:
    sched = JobScheduler(d, threads=1)
    job = sched.start(JobSpec(models_dir=str(d), base=str(base), jsonl=[str(corpus)], train=ENDLESS,
                              progress=False))
    wait_for(lambda: "fine-tune:" in (job.dir / "log.txt").read_text(), what="training to start")
    time.sleep(0.5)  # well inside the loop
    return sched, job


@pytest.mark.slow  # a worker process: torch import + a short training
def test_killed_job_leaves_serving_untouched_and_no_checkpoint(models, sample_conversations):
    d, serving, base = models
    before = snapshot(d)
    sched, job = start_endless(d, base, sample_conversations)
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
def test_cancel_stops_the_job_and_a_new_one_can_start(models, sample_conversations):
    d, serving, base = models
    (d / ".finetuned_20260101_000001.safetensors.dead.tmp").write_bytes(b"half")  # a crash mid-write
    before = snapshot(d) - {".finetuned_20260101_000001.safetensors.dead.tmp"}
    sched, job = start_endless(d, base, sample_conversations)
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
