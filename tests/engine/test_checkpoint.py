"""Checkpoints: native round trip, atomic writes, the seed's .pt formats, refusing pickles."""

from __future__ import annotations

import json
import os
import sys
import types
from dataclasses import dataclass

import pytest
import torch

from chatcore import checkpoint as ckpt
from chatcore.checkpoint import CheckpointError
from tests.engine_fixtures import tiny_model


def same_logits(a, b) -> bool:
    idx = torch.randint(0, 50257, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.allclose(a(idx)[0], b(idx)[0], atol=1e-6)


def test_native_round_trip_with_provenance(tmp_path):
    model = tiny_model(std=0.1)
    path = ckpt.save(model, tmp_path / "ckpt", base_model="gpt2", iteration=120, train_loss=2.5,
                     val_loss=torch.tensor(2.75).item(), data_hash="abc", note="hello")
    assert path.name == "ckpt.safetensors"
    loaded, meta = ckpt.load(path)
    assert same_logits(model, loaded)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert loaded.config == model.config
    prov = meta["provenance"]
    assert (prov["base_model"], prov["iteration"], prov["train_loss"], prov["val_loss"], prov["data_hash"], prov["note"]) == (
        "gpt2", 120, 2.5, 2.75, "abc", "hello")
    assert prov["created_at"].endswith("+00:00")
    sidecar = json.loads((tmp_path / "ckpt.json").read_text())
    assert sidecar == ckpt.read_meta(path) and sidecar["format"] == ckpt.FORMAT
    assert sorted(os.listdir(tmp_path)) == ["ckpt.json", "ckpt.safetensors"]  # no temp files left


def test_the_weights_file_alone_is_enough(tmp_path):
    model = tiny_model()
    path = ckpt.save(model, tmp_path / "a.safetensors")
    (tmp_path / "a.json").unlink()
    loaded, _ = ckpt.load(path)
    assert same_logits(model, loaded)


def test_a_failed_write_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    old = tiny_model(seed=1)
    path = ckpt.save(old, tmp_path / "m.safetensors", iteration=1)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save(tiny_model(seed=2), path, iteration=2)
    loaded, meta = ckpt.load(path)
    assert same_logits(old, loaded) and meta["provenance"]["iteration"] == 1
    assert sorted(os.listdir(tmp_path)) == ["m.json", "m.safetensors"]


def test_corrupt_and_truncated_files_are_refused(tmp_path):
    path = ckpt.save(tiny_model(), tmp_path / "m.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        ckpt.load(path)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(1000))
    with pytest.raises(CheckpointError):
        ckpt.load(junk)
    pt = tmp_path / "trunc.pt"
    torch.save(tiny_model().state_dict(), pt)
    pt.write_bytes(pt.read_bytes()[:5000])
    with pytest.raises(CheckpointError):
        ckpt.load(pt)
    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt.load(tmp_path / "missing.pt")


def test_weights_that_do_not_fit_are_refused(tmp_path):
    state = tiny_model(n_embd=64, n_head=1).state_dict()
    del state["transformer.h.1.mlp.c_fc.weight"]
    path = tmp_path / "partial.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="missing"):
        ckpt.load(path)


def test_seed_plain_state_dict(tmp_path):
    """models/gpt2_nano.pt: a bare state dict, possibly from a compiled model, with mask buffers."""
    model = tiny_model(std=0.1, n_embd=64, n_head=1)  # 64-dimensional heads, as in GPT-2
    state = {"_orig_mod." + k: v for k, v in model.state_dict().items()}
    for i in range(model.config.n_layer):
        state[f"_orig_mod.transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    path = tmp_path / "gpt2_nano.pt"
    torch.save(state, path)
    loaded, meta = ckpt.load(path)
    assert loaded.config == model.config and meta["format"] == "state-dict"
    assert same_logits(model, loaded)


@pytest.fixture
def seed_model_module():
    """A module named `model` holding the seed's GPTConfig dataclass, present only while saving."""
    mod = types.ModuleType("model")

    @dataclass
    class GPTConfig:
        block_size: int = 1024
        vocab_size: int = 50304
        n_layer: int = 12
        n_head: int = 12
        n_embd: int = 768
        dropout: float = 0.0
        bias: bool = True

    GPTConfig.__module__ = "model"
    GPTConfig.__qualname__ = "GPTConfig"
    mod.GPTConfig = GPTConfig
    saved = sys.modules.get("model")
    sys.modules["model"] = mod
    yield mod
    sys.modules.pop("model", None)
    if saved is not None:
        sys.modules["model"] = saved


def test_seed_finetune_dict_with_pickled_config(tmp_path, seed_model_module):
    model = tiny_model(std=0.1)
    c = model.config
    cfg = seed_model_module.GPTConfig(block_size=c.block_size, vocab_size=c.vocab_size, n_layer=c.n_layer,
                                      n_head=c.n_head, n_embd=c.n_embd, dropout=0.1, bias=True)
    path = tmp_path / "finetuned.pt"
    torch.save({"model_state_dict": model.state_dict(), "config": cfg, "iter": 500,
                "train_loss": 1.25, "val_loss": torch.tensor(1.5)}, path)
    del sys.modules["model"]  # loading must not need the seed's module (no unpickling shim)
    loaded, meta = ckpt.load(path)
    assert same_logits(model, loaded)
    assert loaded.config.dropout == 0.1 and loaded.config.n_layer == 2
    assert meta["format"] == "seed-finetune"
    assert meta["provenance"] == {"iteration": 500, "train_loss": 1.25, "val_loss": 1.5}


def test_nanogpt_ckpt_format(tmp_path):
    model = tiny_model()
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "model_args": dict(vars(model.config)), "iter_num": 7,
                "best_val_loss": torch.tensor(3.0), "optimizer": {"state": {}}}, path)
    loaded, meta = ckpt.load(path)
    assert same_logits(model, loaded) and meta["provenance"]["iteration"] == 7


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"model_state_dict": tiny_model().state_dict(), "config": Evil()}, path)
    with pytest.raises(CheckpointError, match="refused"):
        ckpt.load(path)
    assert not marker.exists()


def test_a_forged_config_with_bad_values_is_refused(tmp_path, seed_model_module):
    cfg = seed_model_module.GPTConfig(n_layer="2")  # a string where an int belongs
    path = tmp_path / "forged.pt"
    torch.save({"model_state_dict": tiny_model().state_dict(), "config": cfg}, path)
    del sys.modules["model"]
    with pytest.raises(CheckpointError, match="n_layer"):
        ckpt.load(path)
