"""`chatcore finetune`, `chatcore model status|rollback` and the starter model, on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from chatcore import checkpoint
from chatcore.cli import main
from chatcore.model import GPT, GPTConfig
from chatcore.training.starter import StarterConfig, build_starter, chitchat_exchanges
from tests.engine_fixtures import torch_threads



@pytest.fixture
def one_thread():
    with torch_threads(1):
        yield


@pytest.mark.slow  # a whole fine-tune job
def test_finetune_command_promotes_then_rollback_returns(tmp_path, capsys, one_thread, sample_conversations):
    torch.manual_seed(0)
    base = checkpoint.save(GPT(GPTConfig(block_size=128, n_layer=2, n_head=2, n_embd=32)), tmp_path / "base")
    config = tmp_path / "bot.yaml"
    config.write_text(
        f"bot:\n  data_dir: {tmp_path / 'data'}\n"
        f"model:\n  checkpoint: {base}\n  device: cpu\n"
        "plugins:\n  auto_finetune:\n    threads: 1\n    training:\n"
        "      max_iters: 10\n      eval_interval: 5\n      warmup_iters: 2\n      batch_size: 4\n"
        "      block_size: 64\n      learning_rate: 0.003\n      min_lr: 0.0003\n"
    )
    assert main(["history", "import", "-c", str(config), str(sample_conversations)]) == 0
    capsys.readouterr()
    assert main(["finetune", "-c", str(config), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["status"] == "promoted"
    assert result["data"]["train_exchanges"] + result["data"]["val_exchanges"] == 349  # one too short
    assert main(["model", "status", "-c", str(config)]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["serving"] == Path(result["candidate"]).name
    assert main(["model", "rollback", "-c", str(config)]) == 0
    assert "configured base model" in capsys.readouterr().out
    assert main(["model", "rollback", "-c", str(config)]) == 1  # nothing left to roll back
    assert "nothing to roll back" in capsys.readouterr().err


def test_bad_training_option_is_a_config_error(tmp_path, capsys):
    config = tmp_path / "bot.yaml"
    config.write_text("plugins:\n  auto_finetune:\n    training:\n      learning_rat: 0.1\n")
    assert main(["finetune", "-c", str(config)]) == 2
    err = capsys.readouterr().err
    assert "plugins.auto_finetune.training.learning_rat" in err and "learning_rate" in err


def test_chitchat_corpus_pairs_turns_by_conversation():
    rows = chitchat_exchanges(limit=200)
    assert len(rows) == 200
    assert all(r.user and r.assistant for r in rows)
    assert len({r.conversation for r in rows}) > 10  # several conversations, kept together


def test_starter_builds_a_loadable_model_from_a_jsonl(tmp_path, one_thread, sample_conversations):
    # a wall-clock budget (preparing the data included): enough to learn even on a busy machine
    cfg = StarterConfig(n_layer=1, n_head=2, n_embd=32, block_size=64, minutes=0.2, max_exchanges=200)
    path = build_starter(tmp_path / "starter", corpus=sample_conversations, cfg=cfg, progress=False)
    model, meta = checkpoint.load(path)
    assert model.config.n_layer == 1 and meta["provenance"]["corpus"] == str(sample_conversations)
    prov = meta["provenance"]
    assert prov["val_loss"] < prov["initial_val_loss"] - 0.05  # it learned something
    assert prov["output_vocab"] <= 8192
    # the tokens it never learned to say have zero rows: their logits are exactly 0
    assert (model.transformer.wte.weight.abs().sum(1) == 0).sum() >= 50257 - 8192
