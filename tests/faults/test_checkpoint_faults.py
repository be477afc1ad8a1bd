"""Fault injection: broken checkpoints through every path that loads weights.

Each case feeds one broken file (truncated, integer weights, a declared n_layer of
100000, vocab_size 100, block_size 1, a JSON list as sidecar or metadata, a
wrongly typed config, a missing or an extra tensor, NaN weights, an untied HF
head) to one load path: ``model.checkpoint`` at start (native, seed ``.pt``,
Hugging Face directory), the promoted checkpoint at start (core and the
auto-fine-tune plugin), the hot swap after a promotion, and the gate. Every case
must end in a clear CheckpointError (naming the file) and, wherever a model was
serving, that model keeps serving. The module's summary line gives the counts.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from chatcore import checkpoint
from chatcore.checkpoint import CheckpointError
from chatcore.config import parse_config
from chatcore.engine import Engine
from chatcore.hf import to_hf_state_dict
from chatcore.plugin_manager import make_plugin_manager
from chatcore.registry import Registry
from chatcore.testing import make_bot
from chatcore.tokenizer import Tokenizer
from chatcore.training.data import TokenData
from chatcore.weights import load_engine

from ..engine_fixtures import tiny_model

TALLY: Counter = Counter()


@pytest.fixture(scope="module", autouse=True)
def summary(request):
    yield
    line = f"checkpoint faults: {TALLY['tried']} cases tried, {TALLY['held']} held"
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():  # past pytest's capture, into the run's summary
            reporter.write_line(line)


def held(ok: bool, why: object = "") -> None:
    TALLY["tried"] += 1
    TALLY["held"] += bool(ok)
    assert ok, why


def state_of(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}


def cfg_of(model, **changes) -> dict:
    return {**model.config.__dict__, **changes}


def write_native(path: Path, state: dict, config: dict | None, meta: object = None) -> Path:
    """A .safetensors with chatcore metadata built by hand (so it can lie)."""
    if meta is None and config is not None:
        meta = {"format": checkpoint.FORMAT, "config": config, "provenance": {}}
    save_file({k: v.contiguous() for k, v in state.items()}, str(path),
              metadata=None if meta is None else {"chatcore": json.dumps(meta)})
    return path


# --- broken native checkpoints ---------------------------------------------------------


def native_case(name: str, path: Path) -> Path:
    m = tiny_model()
    state, cfg = state_of(m), cfg_of(m)
    if name == "truncated":
        checkpoint.save(m, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return path
    if name == "int_weights":
        state = {k: (v * 100).to(torch.int32) for k, v in state.items()}
    elif name == "huge_n_layer":
        cfg["n_layer"] = 100_000
    elif name == "vocab_100":
        m = tiny_model(vocab_size=100)
        state, cfg = state_of(m), cfg_of(m)
    elif name == "block_size_1":
        m = tiny_model(block_size=1)
        state, cfg = state_of(m), cfg_of(m)
    elif name == "json_list_sidecar":
        write_native(path, state, None)
        checkpoint.sidecar_path(path).write_text("[1, 2, 3]\n")
        return path
    elif name == "json_list_metadata":
        return write_native(path, state, None, meta=["chatcore", cfg])
    elif name == "wrong_typed_config":
        cfg["n_embd"] = "32"
    elif name == "missing_tensor":
        del state["transformer.h.1.mlp.c_fc.weight"]
    elif name == "extra_tensor":
        state["transformer.h.0.attn.extra.weight"] = torch.zeros(4)
    elif name == "nan_weights":
        state["transformer.h.0.mlp.c_fc.weight"][0, 0] = math.nan
    else:
        raise ValueError(name)
    return write_native(path, state, cfg)


NATIVE = ["truncated", "int_weights", "huge_n_layer", "vocab_100", "block_size_1", "json_list_sidecar",
          "json_list_metadata", "wrong_typed_config", "missing_tensor", "extra_tensor", "nan_weights"]


def pt_case(name: str, path: Path) -> Path:
    """The seed's plain state dict, or nanoGPT's ckpt.pt where a config is needed."""
    m = tiny_model()
    state = state_of(m)
    if name == "truncated":
        torch.save(state, path)
        path.write_bytes(path.read_bytes()[:5000])
        return path
    if name == "int_weights":
        state = {k: (v * 100).to(torch.int64) for k, v in state.items()}
    elif name == "huge_n_layer":
        state = {"model": state, "model_args": cfg_of(m, n_layer=100_000)}
    elif name == "wrong_typed_config":
        state = {"model": state, "model_args": cfg_of(m, n_layer=[2])}
    elif name == "vocab_100":
        state = state_of(tiny_model(vocab_size=100))
    elif name == "block_size_1":
        state = state_of(tiny_model(block_size=1))
    elif name == "missing_tensor":
        del state["transformer.h.1.attn.c_proj.weight"]
    elif name == "extra_tensor":
        state["transformer.h.7.mlp.c_fc.weight"] = torch.zeros(128, 32)
    elif name == "nan_weights":
        state["transformer.ln_f.weight"][3] = math.nan
    elif name == "not_a_dict":
        state = [torch.zeros(2)]
    else:
        raise ValueError(name)
    torch.save(state, path)
    return path


PT = ["truncated", "int_weights", "huge_n_layer", "wrong_typed_config", "vocab_100", "block_size_1",
      "missing_tensor", "extra_tensor", "nan_weights", "not_a_dict"]


def hf_case(name: str, folder: Path) -> Path:
    """A Hugging Face GPT-2 directory (config.json + model.safetensors), broken one way."""
    folder.mkdir(parents=True)
    m = tiny_model(block_size=1 if name == "block_size_1" else 64, vocab_size=100 if name == "vocab_100" else 50257)
    c = m.config
    config = dict(model_type="gpt2", n_positions=c.block_size, vocab_size=c.vocab_size, n_layer=c.n_layer,
                  n_head=c.n_head, n_embd=c.n_embd, activation_function="gelu_new")
    state = {k: v.contiguous() for k, v in to_hf_state_dict(m).items() if k != "lm_head.weight"}
    if name == "int_weights":
        state = {k: (v * 100).to(torch.int16) for k, v in state.items()}
    elif name == "huge_n_layer":
        config["n_layer"] = 100_000
    elif name == "config_json_list":
        config = [config]
    elif name == "wrong_typed_config":
        config["n_embd"] = "32"
    elif name == "wrong_typed_epsilon":
        config["layer_norm_epsilon"] = "1e-5"
    elif name == "missing_tensor":
        del state["transformer.h.0.mlp.c_proj.weight"]
    elif name == "extra_tensor":
        state["transformer.h.0.mlp.gate.weight"] = torch.zeros(3)
    elif name == "nan_weights":
        state["transformer.wpe.weight"][1, 1] = math.nan
    elif name == "untied_head":
        config["tie_word_embeddings"] = False
        state["lm_head.weight"] = torch.randn_like(state["transformer.wte.weight"])
    elif name not in ("truncated", "vocab_100", "block_size_1"):
        raise ValueError(name)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(state, str(folder / "model.safetensors"))
    if name == "truncated":
        w = folder / "model.safetensors"
        w.write_bytes(w.read_bytes()[:-1000])
    return folder


HF = ["truncated", "int_weights", "huge_n_layer", "config_json_list", "wrong_typed_config", "wrong_typed_epsilon",
      "vocab_100", "block_size_1", "missing_tensor", "extra_tensor", "nan_weights", "untied_head"]


def config_for(tmp_path: Path, checkpoint_path: Path):
    pm = make_plugin_manager([])
    raw = {"bot": {"data_dir": str(tmp_path / "data")},
           "model": {"checkpoint": str(checkpoint_path), "device": "cpu", "starter": False}}
    return parse_config(yaml.safe_dump(raw), pm.schema(), environ={})


def refused_clearly(exc: BaseException, path: Path) -> bool:
    return isinstance(exc, CheckpointError) and path.stem in str(exc)  # the file, or its sidecar


# --- model.checkpoint at start: native, seed .pt, Hugging Face directory -----------------


@pytest.mark.parametrize("case", NATIVE)
def test_configured_native_checkpoint(tmp_path, case):
    path = native_case(case, tmp_path / "model.safetensors")
    with pytest.raises(Exception) as info:
        load_engine(config_for(tmp_path, path))
    held(refused_clearly(info.value, path), repr(info.value))


@pytest.mark.parametrize("case", PT)
def test_configured_seed_pt(tmp_path, case):
    path = pt_case(case, tmp_path / "gpt2_nano.pt")
    with pytest.raises(Exception) as info:
        load_engine(config_for(tmp_path, path))
    held(refused_clearly(info.value, path), repr(info.value))


@pytest.mark.parametrize("case", HF)
def test_configured_hf_directory(tmp_path, case):
    folder = hf_case(case, tmp_path / "gpt2-export")
    with pytest.raises(Exception) as info:
        load_engine(config_for(tmp_path, folder))
    held(refused_clearly(info.value, folder), repr(info.value))


# --- the promoted checkpoint at start: the configured model serves instead ----------------


def promote_broken(tmp_path: Path, case: str) -> tuple[Path, Path]:
    base = checkpoint.save(tiny_model(seed=1), tmp_path / "base")
    models = tmp_path / "data" / "models"
    models.mkdir(parents=True)
    broken = native_case(case, models / "finetuned_20260101_000000.safetensors")
    Registry(models).promote(broken)
    return base, broken


@pytest.mark.parametrize("case", NATIVE)
def test_promoted_checkpoint_at_start(tmp_path, case, caplog):
    base, broken = promote_broken(tmp_path, case)
    with caplog.at_level(logging.WARNING):
        engine = load_engine(config_for(tmp_path, base))
    held(engine.meta["source"] == str(base) and broken.name in caplog.text)


@pytest.mark.parametrize("case", NATIVE)
async def test_promoted_checkpoint_at_bot_start(tmp_path, case, caplog):
    """The whole start: Bot.from_config, then every plugin's startup hook (auto-fine-tune included)."""
    import inspect

    from chatcore.bot import Bot

    base, broken = promote_broken(tmp_path, case)
    (tmp_path / "bot.yaml").write_text(yaml.safe_dump({"bot": {"data_dir": str(tmp_path / "data")},
                                                       "model": {"checkpoint": str(base), "device": "cpu"}}))
    with caplog.at_level(logging.WARNING):
        bot = Bot.from_config(tmp_path / "bot.yaml")
        try:
            engine = bot.engine
            for r in bot.pm.hook.startup(bot=bot):
                if inspect.isawaitable(r):
                    await r
            ok = bot.engine is engine and engine.meta["source"] == str(base) and broken.name in caplog.text
        finally:
            await bot.close()
    held(ok, caplog.text)


# --- hot swap after a promotion: the old model keeps serving -------------------------------


@pytest.mark.parametrize("case", NATIVE)
async def test_hot_swap_refuses_broken_candidate(tmp_path, case, caplog):
    from chatcore.plugins import auto_finetune

    base = checkpoint.save(tiny_model(seed=1), tmp_path / "base")
    broken = native_case(case, tmp_path / "finetuned_20260101_000000.safetensors")
    engine = Engine(tiny_model(seed=1), device="cpu", meta={"source": str(base)})
    bot = make_bot(tmp_path, engine=engine, config={"model": {"checkpoint": str(base), "device": "cpu"}})
    result = {"status": "promoted", "candidate": str(broken), "job": "j",
              "gate": {"candidate_val_loss": 1.0, "serving_val_loss": 2.0}}
    try:
        with caplog.at_level(logging.ERROR):
            await auto_finetune.finish(bot, None, result)
        reply = await bot.generator.generate("Human: hi\n\nAssistant:", bot.params)
        held(bot.engine is engine and broken.name in caplog.text and isinstance(reply, str))
    finally:
        await bot.close()


# --- the gate: a candidate that cannot load or serve is never promoted ------------------------


@pytest.mark.parametrize("case", NATIVE)
def test_gate_rejects_broken_candidate(tmp_path, case):
    from chatcore.training.gate import judge_file

    broken = native_case(case, tmp_path / "finetuned_20260101_000000.safetensors")
    ids = Tokenizer().encode("Human: hello there\n\nAssistant: hi, how are you?\n\n" * 4)
    val = TokenData(torch.tensor(ids), torch.ones(len(ids), dtype=torch.bool), 1)
    verdict = judge_file(broken, tiny_model(seed=1), val)
    held(not verdict.promoted and "cannot serve" in verdict.reason and broken.stem in verdict.reason, verdict)
