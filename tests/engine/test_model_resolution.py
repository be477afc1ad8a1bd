"""Which model the bot serves: a promoted fine-tune first; a damaged one never stops the bot."""

from __future__ import annotations

import torch

from chatcore import checkpoint
from chatcore.weights import load_engine
from chatcore.config import load_config
from chatcore.model import GPT, GPTConfig
from chatcore.plugin_manager import make_plugin_manager
from chatcore.registry import Registry


def _config(tmp_path, base):
    path = tmp_path / "bot.yaml"
    path.write_text(f"bot:\n  data_dir: {tmp_path}\nmodel:\n  checkpoint: {base}\n  device: cpu\n")
    return load_config(path, make_plugin_manager(entry_points=False).schema())


def _tiny(seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=1, n_head=2, n_embd=16))


def test_promoted_checkpoint_serves_and_a_corrupt_one_falls_back(tmp_path):
    base = checkpoint.save(_tiny(0), tmp_path / "base")
    models = tmp_path / "models"
    candidate = checkpoint.save(_tiny(1), models / "finetuned_20260101_000000")
    config = _config(tmp_path, base)

    assert load_engine(config).model_id.startswith("base")  # nothing promoted yet
    Registry(models).promote(candidate, {"val_loss": 1.0})
    assert load_engine(config).model_id.startswith("finetuned_20260101_000000")

    candidate.write_bytes(candidate.read_bytes()[:100])  # truncated on disk
    assert load_engine(config).model_id.startswith("base")


def test_int8_option_serves_quantized_weights(tmp_path):
    from chatcore.sampling import SamplingParams

    base = checkpoint.save(_tiny(0), tmp_path / "base")
    path = tmp_path / "bot.yaml"
    path.write_text(f"bot:\n  data_dir: {tmp_path}\nmodel:\n  checkpoint: {base}\n  device: cpu\n  quantize: int8\n")
    engine = load_engine(load_config(path, make_plugin_manager(entry_points=False).schema()))
    assert engine.model_id.endswith(" int8")
    assert type(engine.model.lm_head).__name__ == "Int8Linear"
    engine.generate("Human: hi\nAssistant:", SamplingParams(max_new_tokens=4, temperature=0))
