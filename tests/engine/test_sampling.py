"""Sampling functions: greedy, top-k, top-p, repetition penalty, seeds, per-row params."""

from __future__ import annotations

import pytest
import torch

from chatcore.sampling import SamplingParams, apply_repetition_penalty, make_generator, sample, validate

V = 1000


def logits_row(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, V, generator=g) * 3


def draws(logits, params, n=200, seed=0):
    g = make_generator(seed)
    return [int(sample(logits, params, [g])[0]) for _ in range(n)]


def test_temperature_zero_and_top_k_one_are_greedy():
    logits = logits_row()
    best = int(logits.argmax())
    assert set(draws(logits, SamplingParams(temperature=0), 20)) == {best}
    assert set(draws(logits, SamplingParams(temperature=1.5, top_k=1), 20)) == {best}


def test_top_k_keeps_only_the_k_best():
    logits = logits_row(1)
    top5 = set(torch.topk(logits[0], 5).indices.tolist())
    got = draws(logits, SamplingParams(temperature=5.0, top_k=5), 400)
    assert set(got) == top5  # a hot temperature spreads the draws over all five, and no further


def test_top_k_at_or_above_vocab_and_top_p_one_cut_nothing():
    logits = logits_row(2)
    base = draws(logits, SamplingParams(temperature=1.0, top_k=None, top_p=1.0), 300, seed=7)
    for params in (SamplingParams(temperature=1.0, top_k=V), SamplingParams(temperature=1.0, top_k=V + 500)):
        assert draws(logits, params, 300, seed=7) == base
    assert len(set(base)) > 30  # the whole distribution really is sampled


def test_top_p_keeps_the_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05] + [0.0] * 4])
    logits = torch.log(probs.clamp_min(1e-12))
    # p = 0.7: 0.5 alone is not enough, 0.5 + 0.3 is: the nucleus is {0, 1}
    assert set(draws(logits, SamplingParams(temperature=1.0, top_k=None, top_p=0.7), 300)) == {0, 1}
    # a tiny p keeps the single most likely token
    assert set(draws(logits, SamplingParams(temperature=1.0, top_k=None, top_p=1e-6), 50)) == {0}
    # top-k and top-p together: the stricter wins
    assert set(draws(logits, SamplingParams(temperature=1.0, top_k=1, top_p=0.9), 50)) == {0}


def test_seeded_sampling_is_reproducible_and_seeds_differ():
    logits = logits_row(3)
    p = SamplingParams(temperature=1.0, top_k=None)
    assert draws(logits, p, 50, seed=42) == draws(logits, p, 50, seed=42)
    assert draws(logits, p, 50, seed=42) != draws(logits, p, 50, seed=43)
    assert make_generator(None) is None


def test_batched_rows_with_their_own_params_match_single_rows():
    logits = torch.cat([logits_row(s) for s in range(4)])
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0.7, top_k=50, seed=1),
        SamplingParams(temperature=1.2, top_k=None, top_p=0.9, seed=2),
        SamplingParams(temperature=1.0, top_k=V * 2, seed=3),
    ]
    gens = [make_generator(p.seed) for p in params]
    batched = sample(logits, params, gens).tolist()
    single = [int(sample(logits[i : i + 1], p, [make_generator(p.seed)])[0]) for i, p in enumerate(params)]
    assert batched == single


def test_rows_sharing_a_top_k_draw_what_each_would_draw_alone():
    # the batch's top-k runs in one call; ties (rounded logits) and each row's own temperature must
    # still give every row exactly its single-row candidates, and so its single-row draw
    torch.manual_seed(0)
    logits = torch.round(torch.randn(6, V) * 4)
    params = [SamplingParams(temperature=t, top_k=k, top_p=tp, seed=i)
              for i, (t, k, tp) in enumerate([(0.8, 200, 1.0), (1.3, 200, 0.9), (0.3, 200, 1.0),
                                               (0.8, 7, 1.0), (1.0, 7, 0.5), (0.8, 200, 1.0)])]
    batched = sample(logits, params, [make_generator(p.seed) for p in params]).tolist()
    single = [int(sample(logits[i : i + 1], p, [make_generator(p.seed)])[0]) for i, p in enumerate(params)]
    assert batched == single


def test_repetition_penalty_spares_exempt_tokens():
    logits = torch.tensor([[2.0, -2.0, 2.0, 1.0]])
    out = apply_repetition_penalty(logits.clone(), [[0, 1, 2, 0]], [2.0], exempt={2})
    assert out.tolist() == [[1.0, -4.0, 2.0, 1.0]]  # positive halved, negative doubled, 2 exempt, 3 unseen
    # through sample: a penalised favourite loses to the runner-up under greedy decoding
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    p = SamplingParams(temperature=0, repetition_penalty=2.0)
    assert int(sample(logits, p, previous=[[0]])[0]) == 1
    assert int(sample(logits, p, previous=[[0]], exempt={0})[0]) == 0
    assert logits.tolist() == [[3.0, 2.0, 0.0]]  # the caller's logits are left alone


def test_padded_vocab_and_low_precision_logits():
    logits = logits_row(5).to(torch.bfloat16)
    tok = int(sample(logits, SamplingParams(temperature=0.8, seed=1), [make_generator(1)])[0])
    assert 0 <= tok < V


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(temperature=-1), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(repetition_penalty=0), "repetition_penalty"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(stop="\n"), "stop"),
    ],
)
def test_validate_names_the_bad_setting(changes, match):
    with pytest.raises(ValueError, match=match):
        validate(SamplingParams(**changes))
    validate(SamplingParams())  # the defaults are fine
