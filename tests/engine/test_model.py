"""The GPT: nanoGPT layout, training forward, and the batch-ready KV cache."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from chatcore.model import GPT, GPTConfig, KVCache
from tests.engine_fixtures import greedy_no_cache, tiny_model

TOL = 1e-4


def nanogpt_keys(n_layer: int, bias: bool) -> set[str]:
    """The state-dict keys of nanoGPT's model.py (flash attention build: no mask buffer)."""
    keys = {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "lm_head.weight"}
    if bias:
        keys.add("transformer.ln_f.bias")
    for i in range(n_layer):
        for part in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            keys.add(f"transformer.h.{i}.{part}.weight")
            if bias:
                keys.add(f"transformer.h.{i}.{part}.bias")
    return keys


@pytest.mark.parametrize("bias", [True, False])
def test_state_dict_keys_are_nanogpts(bias):
    model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=3, n_head=2, n_embd=8, bias=bias))
    assert set(model.state_dict()) == nanogpt_keys(3, bias)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_config_rejects_heads_that_do_not_divide():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=30, n_head=4)


def test_forward_returns_logits_and_loss_like_nanogpt():
    model = tiny_model()
    idx = torch.randint(0, 50257, (2, 10))
    targets = torch.randint(0, 50257, (2, 10))
    targets[0, :3] = -1  # ignored positions
    logits, loss = model(idx, targets)
    assert logits.shape == (2, 10, 50257)
    mask = targets.view(-1) != -1
    expected = F.cross_entropy(logits.view(-1, 50257)[mask], targets.view(-1)[mask])
    assert torch.allclose(loss, expected, atol=1e-6)
    logits2, none = model(idx)
    assert none is None and torch.allclose(logits, logits2)
    loss.backward()  # trainable end to end
    assert model.transformer.h[0].attn.c_attn.weight.grad is not None


def test_forward_refuses_sequences_longer_than_block():
    model = tiny_model()
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_gelu_is_the_tanh_approximation():
    x = torch.linspace(-4, 4, 101)
    mlp = tiny_model().transformer.h[0].mlp
    assert torch.allclose(mlp.gelu(x), F.gelu(x, approximate="tanh"))
    assert not torch.allclose(mlp.gelu(x), F.gelu(x), atol=1e-5)


def test_manual_attention_equals_sdpa():
    model = tiny_model()
    idx = torch.randint(0, 50257, (2, 12))
    fast, _ = model(idx)
    cache = model.new_cache(2)
    fast_cached = model.forward_cached(idx[:, :7], cache, last_only=False)
    for block in model.transformer.h:
        block.attn.use_sdpa = False
    slow, _ = model(idx)
    cache = model.new_cache(2)
    slow_cached = model.forward_cached(idx[:, :7], cache, last_only=False)
    assert (fast - slow).abs().max() < TOL
    assert (fast_cached - slow_cached).abs().max() < TOL


@torch.no_grad()
def test_cache_equals_no_cache_logits_and_greedy_tokens():
    model = tiny_model(std=0.3)
    idx = torch.randint(0, 50257, (1, 40))
    full, _ = model(idx)
    cache = model.new_cache(1)
    # prefill 25, then one token at a time, then a chunk of 5 (extending a warm cache)
    steps = [model.forward_cached(idx[:, :25], cache, last_only=False)]
    for t in range(25, 35):
        steps.append(model.forward_cached(idx[:, t : t + 1], cache, last_only=False))
    steps.append(model.forward_cached(idx[:, 35:40], cache, last_only=False))
    cached = torch.cat(steps, dim=1)
    assert (cached - full).abs().max() < TOL
    assert cache.length(0) == 40

    prompt = idx[0, :10].tolist()
    reference = greedy_no_cache(model, prompt, 30)
    out = model.generate(torch.tensor([prompt]), 30, temperature=1e-9)[0, 10:].tolist()
    assert out == reference
    assert len(set(reference)) > 3  # a real test: the greedy text is not one token repeated


@torch.no_grad()
def test_ragged_batch_rows_match_single_sequences():
    """Rows at different lengths, named out of order, with different numbers of new tokens."""
    model = tiny_model(std=0.2)
    seqs = [torch.randint(0, 50257, (30,)) for _ in range(3)]
    full = [model(s[None])[0][0] for s in seqs]
    cache = model.new_cache(max_batch=5, max_len=40)
    rows = [4, 0, 2]
    lens = [5, 12, 1]
    idx = torch.zeros(3, 12, dtype=torch.long)
    for b, (s, n) in enumerate(zip(seqs, lens)):
        idx[b, :n] = s[:n]
    out = model.forward_cached(idx, cache, rows=rows, n_new=lens, last_only=False)
    for b, n in enumerate(lens):
        assert (out[b, :n] - full[b][:n]).abs().max() < TOL
    assert [cache.length(r) for r in rows] == lens and cache.length(1) == 0
    # one decode step for all three together, then a step for just two of them
    step = torch.stack([seqs[b][lens[b]] for b in range(3)])[:, None]
    last = model.forward_cached(step, cache, rows=rows)
    for b, n in enumerate(lens):
        assert (last[b] - full[b][n]).abs().max() < TOL
    step2 = torch.stack([seqs[2][lens[2] + 1], seqs[0][lens[0] + 1]])[:, None]
    last2 = model.forward_cached(step2, cache, rows=[2, 4])
    assert (last2[0] - full[2][lens[2] + 1]).abs().max() < TOL
    assert (last2[1] - full[0][lens[0] + 1]).abs().max() < TOL
    assert cache.lengths.tolist() == [13, 0, 3, 0, 7]


@torch.no_grad()
@pytest.mark.parametrize("last_only", [True, False])
def test_ragged_rows_run_only_their_real_tokens_through_the_layers(last_only):
    """Prompts of 10, 3 and 6 tokens arriving together: the matrix products see 19 tokens, not 3 x 10,
    and the logits and cache are exactly those of the padded layout (which per-row adapters keep)."""
    model = tiny_model(std=0.2)
    history = _filled(model, 5)  # a row with history: its new tokens start at position 5
    seen = []
    hook = model.transformer.h[0].mlp.c_fc.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[:-1].numel()))
    idx, lens, rows = torch.randint(0, 50257, (3, 10)), [10, 3, 6], [3, 0, 1]
    results = []
    for pack in (True, False):
        cache = model.new_cache(max_batch=4, max_len=40)
        cache.restore(1, *history)
        results.append((model.forward_cached(idx, cache, rows=rows, n_new=lens, last_only=last_only, pack=pack), cache))
    hook.remove()
    assert seen == [19, 30]
    (packed, c1), (padded, c2) = results
    if not last_only:  # the padding's logits are not defined
        packed, padded = [torch.cat([t[b, :n] for b, n in enumerate(lens)]) for t in (packed, padded)]
    assert torch.equal(packed, padded)
    assert torch.equal(c1.k, c2.k) and torch.equal(c1.v, c2.v) and torch.equal(c1.lengths, c2.lengths)


def _filled(model: GPT, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values of ``n`` random tokens (a conversation's history, for `KVCache.restore`)."""
    cache = model.new_cache(max_batch=1, max_len=n)
    model.forward_cached(torch.randint(0, 50257, (1, n)), cache)
    return cache.snapshot(0)


@torch.no_grad()
def test_explicit_positions_allow_left_padding_style_offsets():
    """Cache slots and positions are independent: a row can start at any position."""
    model = tiny_model(std=0.2)
    seq = torch.randint(0, 50257, (1, 8))
    cache = model.new_cache(1)
    pos = torch.arange(3, 11)[None]
    got = model.forward_cached(seq, cache, pos=pos, last_only=False)
    # reference: the same tokens at positions 3..10 through the plain blocks
    x = model.transformer.wte(seq) + model.transformer.wpe(pos)
    for block in model.transformer.h:
        x = block(x)
    ref = model.lm_head(model.transformer.ln_f(x))
    assert (got - ref).abs().max() < TOL


@torch.no_grad()
def test_rows_can_be_copied_snapshotted_restored_truncated_and_dropped():
    model = tiny_model(std=0.2)
    a = torch.randint(0, 50257, (1, 20))
    b = torch.randint(0, 50257, (1, 6))
    cache = model.new_cache(max_batch=3)
    model.forward_cached(a[:, :12], cache, rows=[0])
    # prefix reuse: row 1 shares a's first 8 tokens, then continues differently
    cache.copy_row(0, 1, length=8)
    out = model.forward_cached(b, cache, rows=[1], last_only=False)
    ref, _ = model(torch.cat([a[:, :8], b], dim=1))
    assert (out[0] - ref[0, 8:]).abs().max() < TOL
    # snapshot row 0, restore into a fresh cache, continue there
    k, v = cache.snapshot(0)
    other = KVCache(model.config, max_batch=2)
    other.restore(1, k, v)
    cont = model.forward_cached(a[:, 12:20], other, rows=[1], last_only=False)
    full, _ = model(a)
    assert (cont[0] - full[0, 12:20]).abs().max() < TOL
    # truncate back to 5 tokens and continue from there
    cache.truncate(0, 5)
    again = model.forward_cached(a[:, 5:9], cache, rows=[0], last_only=False)
    assert (again[0] - full[0, 5:9]).abs().max() < TOL
    cache.reset([0])
    assert cache.length(0) == 0 and cache.length(1) == 14
    cache.reset()
    assert cache.lengths.tolist() == [0, 0, 0]


def test_cache_refuses_bad_requests():
    model = tiny_model()
    cache = model.new_cache(max_batch=2, max_len=8)
    with pytest.raises(ValueError, match="overflow"):
        model.forward_cached(torch.zeros(1, 9, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="distinct"):
        model.forward_cached(torch.zeros(2, 1, dtype=torch.long), cache, rows=[1, 1])
    with pytest.raises(ValueError, match="positions"):
        model.forward_cached(torch.zeros(1, 2, dtype=torch.long), cache, pos=torch.tensor([[63, 64]]))
    with pytest.raises(ValueError, match="n_new"):
        model.forward_cached(torch.zeros(2, 2, dtype=torch.long), cache, n_new=[0, 2])
    with pytest.raises(ValueError):
        cache.truncate(0, 3)  # row 0 is empty
    with pytest.raises(ValueError):
        cache.restore(0, torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))
    assert cache.lengths.tolist() == [0, 0]  # nothing was half-applied


def test_generate_and_training_helpers():
    model = tiny_model()
    out = model.generate(torch.randint(0, 50257, (2, 5)), 7, temperature=0.8, top_k=20)
    assert out.shape == (2, 12)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    decayed, plain = opt.param_groups
    assert all(p.dim() >= 2 for p in decayed["params"]) and all(p.dim() < 2 for p in plain["params"])
    model.crop_block_size(32)
    assert model.config.block_size == 32 and model.transformer.wpe.weight.shape[0] == 32
