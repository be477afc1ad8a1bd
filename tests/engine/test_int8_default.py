"""On a CPU the bot serves int8 unless told otherwise, and the int8 it serves keeps fp32's quality."""

from __future__ import annotations

import torch

from chatcore import checkpoint
from chatcore.config import load_config
from chatcore.model import GPT, GPTConfig
from chatcore.plugin_manager import make_plugin_manager
from chatcore.hf import load_any
from chatcore.quant import Int8Linear, Int8Loader, quality
from chatcore.sampling import SamplingParams
from chatcore.weights import load_engine
from tests.engine_fixtures import sample_corpus, torch_threads, trained_model

PPL_TOLERANCE, MIN_AGREEMENT = 0.02, 0.95


def _engine(tmp_path, base, extra: str = ""):
    path = tmp_path / "bot.yaml"
    path.write_text(f"bot:\n  data_dir: {tmp_path}\nmodel:\n  checkpoint: {base}\n  device: cpu\n{extra}")
    return load_engine(load_config(path, make_plugin_manager(entry_points=False).schema()))


def test_cpu_serves_int8_by_default_and_none_turns_it_off(tmp_path):
    torch.manual_seed(0)
    base = checkpoint.save(GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=1, n_head=2, n_embd=16)), tmp_path / "base")
    engine = _engine(tmp_path, base)  # no model.quantize: the default, auto
    assert engine.model_id == "base int8"
    assert isinstance(engine.model.lm_head, Int8Linear) and isinstance(engine.model.transformer.h[0].mlp.c_fc, Int8Linear)
    assert engine.generate("Human: hi\nAssistant:", SamplingParams(max_new_tokens=4, temperature=0)) is not None

    fp32 = _engine(tmp_path, base, "  quantize: none\n")
    assert fp32.model_id == "base"
    assert isinstance(fp32.model.lm_head, torch.nn.Linear)


def test_auto_stays_fp32_where_scopes_serve_their_own_adapters(tmp_path):
    """Per-row LoRA updates ride on fp32 Linear layers: with fine-tuning scopes, auto means fp32."""
    torch.manual_seed(0)
    base = checkpoint.save(GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=1, n_head=2, n_embd=16)), tmp_path / "base")
    scopes = "scopes:\n  - {name: team, adapter: discord, workspace: '1'}\n"
    assert _engine(tmp_path, base, scopes).model_id == "base"
    no_training = "scopes:\n  - {name: team, adapter: discord, workspace: '1', finetune: false}\n"
    assert _engine(tmp_path, base, no_training).model_id == "base int8"


def test_served_int8_keeps_quality_of_a_trained_model(tmp_path, sample_conversations):
    docs, vocab = sample_corpus(sample_conversations)
    train, held_out = docs[:300], docs[300:]
    model = trained_model(train, vocab)
    with torch_threads(1):
        path = checkpoint.save(model, tmp_path / "trained")
        # the weights as the bot loads them: quantized while reading (its small vocabulary could not serve chat)
        loader = Int8Loader()
        fp32 = load_any(path)[0]
        int8 = loader.finish(load_any(path, transform=loader)[0])
        q = quality(fp32, int8, held_out)
    assert q.reference_ppl < vocab / 4  # it learned something, so agreement means something
    assert abs(q.ppl_change) <= PPL_TOLERANCE, q
    assert q.top1_agreement >= MIN_AGREEMENT, q
