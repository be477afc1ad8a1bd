"""The starter model keeps its wall-clock budget whatever the load, and shows progress with an ETA."""

from __future__ import annotations

import time
import pytest
import torch

from chatcore import checkpoint
from chatcore.model import GPT, GPTConfig
from chatcore.tokenizer import Tokenizer
from chatcore.training import train as train_mod
from chatcore.training.data import build_dataset, load_jsonl
from chatcore.training.starter import StarterConfig, build_starter
from chatcore.training.train import TrainConfig, get_lr, train
from tests.engine_fixtures import torch_threads

def slow_steps(monkeypatch, seconds: float) -> None:
    """Every training step waits `seconds` more, as on a machine other jobs are loading."""
    real = train_mod.get_batch

    def slowed(*args, **kwargs):
        time.sleep(seconds)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "get_batch", slowed)


@pytest.fixture
def one_thread():
    with torch_threads(1):
        yield


def test_starter_finishes_within_its_budget_when_steps_slow_down(tmp_path, monkeypatch, one_thread,
                                                                 sample_conversations):
    slow_steps(monkeypatch, 1.0)
    cfg = StarterConfig(n_layer=1, n_head=2, n_embd=32, block_size=64, minutes=0.1, max_exchanges=200)
    # torch's one-off imports for a fused AdamW take seconds on a loaded machine: not this test's subject
    train_mod.make_optimizer(GPT(GPTConfig(block_size=8, n_layer=1, n_head=1, n_embd=8)), TrainConfig())
    t0 = time.monotonic()
    path = build_starter(tmp_path / "starter", corpus=sample_conversations, cfg=cfg, progress=False)
    elapsed = time.monotonic() - t0
    # 6 s budget; generous slack for a busy machine. Before: an iteration count fixed up
    # front (at least 20 steps, each slowed by 1 s) overran it by far.
    assert elapsed < 6 + 6, elapsed
    model, meta = checkpoint.load(path)
    assert meta["provenance"]["iteration"] >= 1


def test_time_budget_stops_training_and_runs_the_cosine_over_the_clock(monkeypatch, one_thread, sample_conversations):
    slow_steps(monkeypatch, 0.3)
    exchanges, _ = load_jsonl(sample_conversations)
    data = build_dataset(exchanges[:100], Tokenizer(), loss_on="all", val_fraction=0.1, seed=0)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, n_layer=1, n_head=2, n_embd=32))
    cfg = TrainConfig(max_iters=10**6, max_seconds=5.0, warmup_iters=1, eval_interval=10**6, batch_size=2,
                      block_size=32, learning_rate=1e-3, min_lr=1e-4, dropout=0.0)
    t0 = time.monotonic()
    out = train(model, data, cfg, progress=False)
    assert time.monotonic() - t0 < 5.0 + 3.0
    assert out.stopped == "time_budget" and 2 <= out.iters < 5.0 / 0.3 + 1
    assert out.history[-1]["iter"] == out.iters  # a final evaluation at the budget
    # the cosine decayed with the clock (per iteration it would barely have moved)
    assert out.history[-1]["lr"] < 0.9 * cfg.learning_rate


def test_get_lr_follows_the_fraction_done():
    cfg = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=10**9)
    assert get_lr(5, cfg, 0.0) < 1e-3  # warming up
    assert get_lr(20, cfg, 0.0) == pytest.approx(1e-3)
    assert get_lr(20, cfg, 0.5) == pytest.approx(5.5e-4)
    assert get_lr(20, cfg, 1.0) == pytest.approx(1e-4)


def test_progress_without_a_terminal_prints_lines_with_time_left(capsys, one_thread, sample_conversations):
    exchanges, _ = load_jsonl(sample_conversations)
    data = build_dataset(exchanges[:100], Tokenizer(), loss_on="all", val_fraction=0.1, seed=0)
    model = GPT(GPTConfig(block_size=64, n_layer=1, n_head=2, n_embd=32))
    cfg = TrainConfig(max_iters=40, warmup_iters=1, eval_interval=100, batch_size=2, block_size=32, dropout=0.0)
    train(model, data, cfg, progress=True)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) >= 5 and all("s left" in line for line in lines)
    assert "100%" in lines[-1]
