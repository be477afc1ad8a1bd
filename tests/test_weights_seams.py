"""Which weights serve, across the seams: damaged promotions, garbage registries, rollbacks, restarts,
and promotions made by another process reaching a running bot."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chatcore import checkpoint
from chatcore.cli import main
from chatcore.message import Message
from chatcore.model import GPT, GPTConfig
from chatcore.registry import Registry
from chatcore.testing import ScriptedEngine, make_bot


def tiny(seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=1, n_head=2, n_embd=16))


@pytest.fixture
def promoted(tmp_path):
    """A configured base checkpoint and a promoted fine-tune in data/models; returns (config file, base, candidate)."""
    base = checkpoint.save(tiny(0), tmp_path / "base", base_model="random-test")
    models = tmp_path / "data" / "models"
    candidate = checkpoint.save(tiny(1), models / "finetuned_20260101_000000")
    Registry(models).promote(candidate, {"val_loss": 1.0})
    config = tmp_path / "bot.yaml"
    config.write_text(f"bot:\n  data_dir: {tmp_path / 'data'}\n"
                      f"model:\n  checkpoint: {base}\n  device: cpu\n  threads: 1\n  quantize: none\n"
                      "generation:\n  max_new_tokens: 6\n")
    return config, base, candidate


def chat(config: Path, lines: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chatcore.cli", "chat", "-c", str(config)], input=lines.encode(),
                          capture_output=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.parametrize("plugin", ["enabled", "disabled"])
def test_a_damaged_promoted_checkpoint_serves_the_base_end_to_end(promoted, plugin):
    config, base, candidate = promoted
    if plugin == "disabled":
        config.write_text(config.read_text() + "plugins:\n  auto_finetune:\n    enabled: false\n")
    candidate.write_bytes(candidate.read_bytes()[:100])  # truncated on disk
    out = chat(config, "hi\nbye\n")
    err = out.stderr.decode()
    assert out.returncode == 0, err
    assert len(out.stdout.decode().splitlines()) == 2  # a reply per line
    assert candidate.name in err and "unusable" in err and "base model" in err  # says why
    assert "Traceback" not in err


@pytest.mark.parametrize("garbage", ["[]", '{"serving": 5}', '{"promoted": "x"}', "{not json"])
def test_a_garbage_registry_is_a_clear_error_and_the_base_keeps_serving(promoted, garbage, capsys):
    config, base, candidate = promoted
    (candidate.parent / "registry.json").write_text(garbage)
    for command in (["model", "status"], ["model", "rollback"]):
        assert main([*command, "-c", str(config)]) == 1
        err = capsys.readouterr().err
        assert "registry.json" in err and "fix or remove it" in err and len(err.strip().splitlines()) == 1
    from chatcore.config import load_config
    from chatcore.plugin_manager import make_plugin_manager
    from chatcore.weights import load_engine

    engine = load_engine(load_config(config, make_plugin_manager(entry_points=False).schema()))
    assert engine.meta["source"] == str(base)


def test_a_second_rollback_says_the_base_already_serves(promoted, capsys):
    config, base, candidate = promoted
    assert main(["model", "rollback", "-c", str(config)]) == 0
    assert "the configured base model" in capsys.readouterr().out
    assert main(["model", "rollback", "-c", str(config)]) == 1
    err = capsys.readouterr().err
    assert "never promoted" not in err
    assert "base model already serves" in err and candidate.name in err


def test_a_fine_tune_after_a_restart_starts_from_the_configured_base(promoted):
    from chatcore.plugins import auto_finetune

    config, base, candidate = promoted
    engine = ScriptedEngine()
    engine.meta = {"source": str(candidate)}  # after a restart the promoted fine-tune serves
    bot = make_bot(config.parent, engine=engine, config={
        "bot": {"data_dir": str(config.parent / "data")}, "model": {"checkpoint": str(base), "device": "cpu"}})
    try:
        spec = auto_finetune.state_of(bot).spec(bot)  # start_from: base (the default)
        assert spec.base == str(base)  # the start weights, recorded as the candidate's base_model
        assert spec.serving == str(candidate)  # what it must beat
    finally:
        bot.store.close()


def msg(text: str) -> Message:
    return Message(text=text, adapter="test", channel="c", user="u", is_direct=True)


async def test_promotions_and_rollbacks_from_another_process_reach_a_running_bot(promoted):
    from chatcore.config import load_config
    from chatcore.plugin_manager import make_plugin_manager
    from chatcore.weights import load_engine

    config, base, candidate = promoted
    models = candidate.parent
    assert main(["model", "rollback", "-c", str(config)]) == 0  # the base serves at start
    cfg = load_config(config, make_plugin_manager(entry_points=False).schema())
    bot = make_bot(config.parent, engine=load_engine(cfg), config={
        "bot": {"data_dir": str(config.parent / "data")},
        "model": {"checkpoint": str(base), "device": "cpu", "threads": 1, "quantize": "none"},
        "generation": {"max_new_tokens": 4}})
    bot.registry_poll_s = 0.05
    follower = asyncio.create_task(bot.follow_registry())
    seen: list[str] = []

    async def chatting(until) -> None:
        while not until():
            reply = await bot.handle(msg("hello"))
            seen.append(reply.model_id if reply is not None else "dropped")
            await asyncio.sleep(0)

    async def serving(name: str) -> None:
        await asyncio.wait_for(chatting(lambda: name in bot.engine.model_id), 60)

    try:
        assert bot.engine.model_id.startswith("base")
        again = checkpoint.save(tiny(2), models / "finetuned_20260102_000000")
        Registry(models).promote(again)  # what `chatcore finetune` does in its own process
        await serving("finetuned_20260102_000000")
        assert main(["model", "rollback", "-c", str(config)]) == 0
        await serving("base")
        (models / "registry.json").write_text("[]")  # garbage: the model that serves keeps serving
        await asyncio.sleep(0.5)
        assert bot.engine.model_id.startswith("base")
    finally:
        follower.cancel()
        await bot.close()
    assert "dropped" not in seen
