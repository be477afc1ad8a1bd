"""On a CPU the bot serves int8 unless told otherwise, and the int8 it serves keeps fp32's quality."""

from __future__ import annotations

import json

import torch

from chatcore import checkpoint
from chatcore.config import load_config
from chatcore.model import GPT, GPTConfig
from chatcore.plugin_manager import make_plugin_manager
from chatcore.prompt import render_exchange
from chatcore.hf import load_any
from chatcore.quant import Int8Linear, Int8Loader, quality
from chatcore.sampling import SamplingParams
from chatcore.tokenizer import Tokenizer
from chatcore.weights import load_engine

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
    tok = Tokenizer()
    rows = [json.loads(line) for line in sample_conversations.read_text(encoding="utf-8").splitlines() if line.strip()]
    docs = [tok.encode(render_exchange(r["user"], r["assistant"])) for r in rows]
    compact = {t: i for i, t in enumerate(sorted({t for d in docs for t in d}))}  # the corpus' own tokens: trains fast
    docs = [[compact[t] for t in d] for d in docs]
    train, held_out = docs[:300], docs[300:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains fastest on one thread
    try:
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=64, vocab_size=len(compact), n_layer=2, n_head=4, n_embd=64))
        stream = torch.tensor([t for d in train for t in d])
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        gen = torch.Generator().manual_seed(0)
        for _ in range(100):
            starts = torch.randint(0, len(stream) - 65, (8,), generator=gen)
            batch = torch.stack([stream[s : s + 65] for s in starts])
            _, loss = model(batch[:, :-1].contiguous(), batch[:, 1:].contiguous())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        path = checkpoint.save(model.eval(), tmp_path / "trained")
        # the weights as the bot loads them: quantized while reading (its small vocabulary could not serve chat)
        loader = Int8Loader()
        fp32 = load_any(path)[0]
        int8 = loader.finish(load_any(path, transform=loader)[0])
        q = quality(fp32, int8, held_out)
    finally:
        torch.set_num_threads(threads)
    assert q.reference_ppl < len(compact) / 4  # it learned something, so agreement means something
    assert abs(q.ppl_change) <= PPL_TOLERANCE, q
    assert q.top1_agreement >= MIN_AGREEMENT, q
