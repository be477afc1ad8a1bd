"""Parity with transformers' GPT2LMHeadModel: imported weights give the same logits and greedy text."""

from __future__ import annotations

import os

import pytest
import torch

from chatcore import hf
from chatcore.checkpoint import CheckpointError
from chatcore.engine import Engine
from chatcore.sampling import SamplingParams
from chatcore.tokenizer import Tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

TOL = 1e-4


def hf_model(seed: int = 0):
    torch.manual_seed(seed)
    # a larger init makes logits peaky, so greedy text is varied rather than one token repeated
    cfg = transformers.GPT2Config(n_positions=128, n_embd=64, n_layer=2, n_head=4, vocab_size=50257,
                                  initializer_range=0.2)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = hf_model()
    d = tmp_path_factory.mktemp("hf")
    model.save_pretrained(d)
    assert (d / "model.safetensors").is_file()
    return model, d


def test_logits_match_transformers(saved):
    ref, d = saved
    ours, meta = hf.load_hf_dir(d)
    assert meta["format"] == "huggingface"
    idx = torch.randint(0, 50257, (2, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(idx).logits
        got, _ = ours(idx)
    assert (got - expected).abs().max() < TOL


def test_greedy_generation_matches_transformers(saved):
    ref, d = saved
    tok = Tokenizer()
    ids = tok.encode("Human: what is your favourite colour?\nAssistant:")
    with torch.no_grad():
        out = ref.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           do_sample=False, max_new_tokens=40, min_new_tokens=40, pad_token_id=50256)
    expected = out[0, len(ids):].tolist()
    assert len(set(expected)) > 5
    ours, _ = hf.load_hf_dir(d)
    engine = Engine(ours, tok, device="cpu")
    got = list(engine.tokens(ids, SamplingParams(temperature=0, max_new_tokens=40, stop_at_newline=False)))
    assert got == expected


def test_pytorch_model_bin_export_loads_safely(tmp_path):
    ref = hf_model(seed=3)
    # the legacy export (transformers 5 writes only safetensors): config.json + a pickled state dict
    ref.config.save_pretrained(tmp_path)
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
    ours, _ = hf.load_hf_dir(tmp_path)
    idx = torch.randint(0, 50257, (1, 20))
    with torch.no_grad():
        assert (ours(idx)[0] - ref(idx).logits).abs().max() < TOL


def test_old_exports_with_mask_buffers_and_bare_gpt2model_keys():
    ref = hf_model(seed=4)
    state = {k.removeprefix("transformer."): v for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    for i in range(2):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 128, 128))
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    from chatcore.checkpoint import build_model

    ours = build_model(hf.config_from_hf(ref.config.to_dict()), hf.convert_hf_state_dict(state))
    idx = torch.randint(0, 50257, (1, 20))
    with torch.no_grad():
        assert (ours(idx)[0] - ref(idx).logits).abs().max() < TOL


def test_export_back_to_transformers():
    ref = hf_model(seed=5)
    from chatcore.checkpoint import build_model

    ours = build_model(hf.config_from_hf(ref.config.to_dict()), hf.convert_hf_state_dict(ref.state_dict()))
    other = hf_model(seed=6)
    other.load_state_dict(hf.to_hf_state_dict(ours), strict=False)
    idx = torch.randint(0, 50257, (1, 20))
    with torch.no_grad():
        assert (other(idx).logits - ref(idx).logits).abs().max() < TOL


@pytest.mark.parametrize("name", sorted(hf.GPT2_SIZES))
def test_gpt2_family_shapes(name):
    n_layer, n_head, n_embd = hf.GPT2_SIZES[name]
    cfg = hf.config_from_hf(dict(model_type="gpt2", n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                                 n_positions=1024, vocab_size=50257, activation_function="gelu_new"))
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.bias) == (n_layer, n_head, n_embd, 1024, True)


@pytest.mark.parametrize("bad", [dict(activation_function="relu"), dict(model_type="llama"), dict(n_inner=100)])
def test_unsupported_variants_are_refused(bad):
    with pytest.raises(CheckpointError):
        hf.config_from_hf({"model_type": "gpt2", **bad})


def test_hub_lookup_offline_does_not_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(Exception):
        hf.load_hf("gpt2", cache_dir=tmp_path, local_files_only=False)
    assert not any(tmp_path.rglob("*.safetensors"))
