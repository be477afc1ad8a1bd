"""int8 weights: same interface, logits close to fp32, and quality on the sample conversations.

The quality check needs a model that has learned something (random weights have
near-uniform logits whose argmax is noise), so the test trains a small one on the
sample conversations first, over a compact vocabulary (only the GPT-2 tokens the
corpus uses) to keep it fast, and evaluates on held-out conversations.
"""

import copy

import pytest
import torch

from chatcore.model import GPT, GPTConfig
from chatcore.quant import Int8Embedding, Int8Linear, is_quantized, quality, quantize_int8, quantize_rows, quantize_weight
from tests.engine_fixtures import sample_corpus, torch_threads, trained_model


# Stated tolerance (also in the benchmark's report): held-out perplexity within 2%
# of fp32, and the greedy next token the same as fp32's at >= 95% of positions.
PPL_TOLERANCE = 0.02
MIN_AGREEMENT = 0.95


def _tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """Every tensor a served model holds: its state, and what its int8 modules keep as attributes."""
    out = list(model.state_dict().values())
    for m in model.modules():
        out += [v for v in vars(m).values() if isinstance(v, torch.Tensor)]
    return out


def _tiny(vocab: int = 97, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=64, vocab_size=vocab, n_layer=2, n_head=2, n_embd=64)).eval()


@torch.no_grad()
def test_every_linear_becomes_int8_and_logits_stay_close():
    fp32 = _tiny()
    int8 = quantize_int8(copy.deepcopy(fp32))
    assert is_quantized(int8) and not is_quantized(fp32)
    assert isinstance(int8.lm_head, Int8Linear)
    assert sum(isinstance(m, torch.nn.Linear) for m in int8.modules()) == 0
    # the token embedding is served from the head's int8 rows: no fp32 copy of the tied matrix remains
    assert isinstance(int8.transformer.wte, Int8Embedding)
    assert not any(t.shape == (97, 64) and t.is_floating_point() for t in _tensors(int8))
    idx = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(3))
    ref, _ = fp32(idx)
    got, _ = int8(idx)
    assert got.shape == ref.shape
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()


@torch.no_grad()
def test_int8_model_decodes_with_the_kv_cache():
    int8 = quantize_int8(_tiny())
    idx = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(4))
    cache = int8.new_cache(max_batch=1)
    logits = int8.forward_cached(idx[:, :8], cache)
    for t in range(8, 12):
        logits = int8.forward_cached(idx[:, t : t + 1], cache)
    full, _ = int8(idx)
    # one activation scale per call: cached and full runs quantize slightly differently
    assert (logits[0] - full[0, -1]).abs().max() < 0.02 * full.abs().max() + 1e-3


def test_refuses_what_it_cannot_quantize():
    with pytest.raises(ValueError, match="fp32"):
        quantize_int8(_tiny().to(torch.bfloat16))
    with pytest.raises(TypeError, match="float32"):
        Int8Linear(torch.nn.Linear(4, 4))(torch.zeros(1, 4, dtype=torch.bfloat16))


def test_quality_on_sample_conversations_within_tolerance(sample_conversations):
    docs, vocab = sample_corpus(sample_conversations)
    train, held_out = docs[:300], docs[300:]
    model = trained_model(train, vocab)
    with torch_threads(1):
        q = quality(model, quantize_int8(copy.deepcopy(model)), held_out)
    assert q.reference_ppl < vocab / 4  # it learned something, so agreement means something
    assert abs(q.ppl_change) <= PPL_TOLERANCE, q
    assert q.top1_agreement >= MIN_AGREEMENT, q


@torch.no_grad()
def test_embedding_lookups_are_the_dequantized_rows_of_the_int8_head():
    fp32 = _tiny()
    int8 = quantize_int8(copy.deepcopy(fp32))
    head = torch.ops.quantized.linear_unpack(int8.lm_head._packed)[0]  # the int8 weight the head multiplies by
    idx = torch.tensor([[0, 5, 96, 5], [3, 3, 1, 2]])
    got = int8.transformer.wte(idx)
    assert got.dtype == torch.float32 and got.shape == (2, 4, 64)
    torch.testing.assert_close(got, head.dequantize()[idx], rtol=0, atol=0)
    # and those rows are fp32's within half a quantization step
    step = fp32.transformer.wte.weight.abs().amax(1) / 127
    assert ((got - fp32.transformer.wte.weight[idx]).abs() <= step[idx, None] / 2 + 1e-7).all()


def test_row_quantization_is_torch_per_channel_quantization_bit_for_bit():
    torch.manual_seed(0)
    w = torch.randn(3000, 96) * 0.02  # more rows than one block
    w[5] = 0.0  # an all-zero row (the starter's unused vocabulary)
    w[7, :4] = torch.tensor([127.0, -127.0, 63.5, -0.5])  # ties at the rounding midpoint
    w[8] = (torch.randint(-254, 255, (96,)) / 2).float()  # many ties
    lo, hi = torch.aminmax(w, dim=1)
    scale = (torch.maximum(hi, lo.neg()) / 127.0).clamp(min=1e-12)
    want = torch.quantize_per_channel(w, scale.double(), torch.zeros(len(scale), dtype=torch.long), 0, torch.qint8)
    q, s = quantize_rows(w)
    assert torch.equal(q, want.int_repr()) and torch.equal(s.double(), want.q_per_channel_scales())
    got = quantize_weight(w)
    assert torch.equal(got.int_repr(), want.int_repr()) and torch.equal(got.q_per_channel_scales(), want.q_per_channel_scales())
