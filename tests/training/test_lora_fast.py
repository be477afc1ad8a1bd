"""LoRA's fast paths (chatcore/lora.py): the fused training forward and the batched per-row adapter update."""

from __future__ import annotations

import copy

import pytest
import torch

from chatcore import lora
from chatcore.training.train import TrainConfig, loss_sum, make_optimizer
from tests.engine_fixtures import tiny_model, torch_threads


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads(1):
        yield


def adapter(model, seed: int, rank: int = 4, targets=lora.TARGETS) -> lora.LoRAAdapter:
    """A random adapter for `model` (B non-zero, so it changes the output)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, m in model.named_modules():
        if name.startswith("transformer.h.") and name.endswith(tuple(targets)):
            state[f"{name}.lora_A"] = torch.randn(rank, m.in_features, generator=g) * 0.3
            state[f"{name}.lora_B"] = torch.randn(m.out_features, rank, generator=g) * 0.3
    cfg = lora.LoRAConfig(rank=rank, alpha=2.0 * rank, targets=list(targets))
    return lora.LoRAAdapter(state, cfg, {})


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_the_training_forward_is_base_plus_scaled_update_with_dropout_on_the_update_only(dropout):
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 40)
    base.requires_grad_(False)
    layer = lora.LoRALinear(base, lora.LoRAConfig(rank=4, alpha=12, dropout=dropout)).train()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 5, 24, requires_grad=True)
    torch.manual_seed(7)
    y = layer(x)
    y.square().sum().backward()
    got = (y.detach(), x.grad, layer.lora_A.grad, layer.lora_B.grad)
    a, b = (p.detach().clone().requires_grad_() for p in (layer.lora_A, layer.lora_B))
    x2 = x.detach().clone().requires_grad_()
    torch.manual_seed(7)  # the same dropout mask
    h = torch.nn.functional.dropout(x2, dropout, True)
    want_y = base(x2) + 3.0 * (h @ a.t()) @ b.t()
    want_y.square().sum().backward()
    for g, w in zip(got, (want_y.detach(), x2.grad, a.grad, b.grad)):
        # the same sums in another order: fp32 rounding, relative to the tensor's scale (gradients reach ~1e3)
        assert (g - w).abs().max() <= 1e-5 * w.abs().max(), (g - w).abs().max()


def test_a_lora_step_gives_no_gradient_or_optimizer_state_to_the_frozen_base():
    model = tiny_model(0, block_size=64).train()
    params = lora.apply_lora(model, lora.LoRAConfig(rank=4, alpha=8))
    opt = make_optimizer(model, TrainConfig(fused=False))
    x = torch.randint(0, 50257, (2, 32))
    y = x.clone()
    y[:, :8] = -1
    s, n = loss_sum(model, x, y)
    (s / n).backward()
    opt.step()
    ids = {id(p) for p in params}
    assert {id(p) for g in opt.param_groups for p in g["params"]} == ids  # only A and B are optimised
    frozen = [p for p in model.parameters() if id(p) not in ids]
    assert frozen and all(p.grad is None and not p.requires_grad for p in frozen)
    assert model.lm_head.weight is model.transformer.wte.weight  # the tied head stays tied (and frozen)
    assert all(p.grad is not None for p in params)


def reference(model, adapters, keys, idx):
    """Each row's logits from a copy of the model with that row's adapter merged (None: the base)."""
    rows = []
    for r, key in enumerate(keys):
        m = copy.deepcopy(model)
        if key is not None:
            lora.merge_adapter(m, adapters[key])
        with torch.no_grad():
            rows.append(m(idx[r : r + 1])[0])
    return torch.cat(rows)


@pytest.mark.parametrize("keys", [
    ("a", "a", "a", "a"),  # one adapter, every row: added in place, no gather
    ("a", "b", "c", "b"),  # every row, three adapters of two ranks and two target sets
    ("b", "a", None, None),  # the leading rows
    (None, "c", None, "a"),  # scattered rows: gathered and scattered back
    (None, None, None, None),
])
def test_routed_rows_each_add_their_own_adapter(keys):
    base = tiny_model(0, std=0.1, block_size=64)
    adapters = {"a": adapter(base, 1), "b": adapter(base, 2, rank=2),
                "c": adapter(base, 3, targets=("attn.c_attn", "mlp.c_proj"))}
    model = copy.deepcopy(base)
    for key, ad in adapters.items():
        lora.attach(model, key, ad)
    idx = torch.randint(0, 50257, (4, 12), generator=torch.Generator().manual_seed(0))
    groups = [(k, [r for r, key in enumerate(keys) if key == k]) for k in ("a", "b", "c")]
    with torch.no_grad():
        plain, _ = model(idx)
        for _ in range(2):  # the second forward reuses the stacked adapters
            with lora.route(model, [g for g in groups if g[1]]):
                got, _ = model(idx)
            assert torch.allclose(got, reference(base, adapters, keys, idx), atol=1e-4)
    assert torch.equal(plain, reference(base, adapters, (None,) * 4, idx))  # nothing routed: the base
    if any(keys):
        assert not torch.allclose(got, plain, atol=1e-3)


def test_a_new_mix_of_adapters_is_stacked_again():
    base = tiny_model(0, std=0.1, block_size=64)
    adapters = {"a": adapter(base, 1), "b": adapter(base, 2)}
    model = copy.deepcopy(base)
    for key, ad in adapters.items():
        lora.attach(model, key, ad)
    idx = torch.randint(0, 50257, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for keys in (("a", "b"), ("b", "a"), ("b", "b")):  # same rows, other adapters
            with lora.route(model, [(k, [r for r, key in enumerate(keys) if key == k]) for k in set(keys)]):
                got, _ = model(idx)
            assert torch.allclose(got, reference(base, adapters, keys, idx), atol=1e-4)
