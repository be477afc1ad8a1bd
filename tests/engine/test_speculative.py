"""Speculative decoding: greedy replies equal plain greedy decoding token for token, whatever the drafter
guesses; the sampling rule leaves every emitted token distributed as the model's own distribution."""

from __future__ import annotations

import pytest
import torch

from chatcore import checkpoint
from chatcore.batching import BatchScheduler
from chatcore.engine import Engine
from chatcore.sampling import SamplingParams
from chatcore.speculative import DraftModel, PromptLookup, accept_or_resample, distribution, lookup
from chatcore.tokenizer import Tokenizer
from chatcore.weights import build_engine

from ..engine_fixtures import tiny_model
from .test_batching import PROMPTS, _run_all

# a prompt whose reply can copy from it, so prompt lookup has guesses to offer
ECHO = "Human: the quick brown fox jumps over the lazy dog. the quick brown fox jumps over the lazy dog. the quick\nAssistant:"


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(tiny_model(std=0.3, block_size=96), Tokenizer(), model_id="tiny", device="cpu", dtype="float32")


def drafters(engine):
    vocab = engine.tokenizer.n_vocab
    return {
        "perfect": DraftModel(engine.model, vocab, k=4),  # the model itself: every guess stands
        "bad": DraftModel(tiny_model(seed=7, std=0.3, n_layer=1, block_size=96), vocab, k=3),  # another random model
        "lookup": PromptLookup(k=5),
    }


def _serve(engine, speculator, jobs):
    engine.speculator = speculator
    sched = BatchScheduler(engine, max_batch=2)
    try:
        out = [_run_all(sched, [job])[0] for job in jobs]  # one at a time: each conversation decodes alone
    finally:
        sched.close(timeout=5)
        engine.speculator = None
    return out, sched


def test_greedy_replies_equal_plain_greedy_decoding_token_for_token(engine):
    base = SamplingParams(temperature=0, max_new_tokens=30, stop_at_newline=False)
    free = engine.generate(ECHO, base)
    stop = free[len(free) // 2 : len(free) // 2 + 3]  # met inside a proposal: nothing after it may come out
    jobs = [(p, base) for p in (ECHO, PROMPTS[1], PROMPTS[2])]
    jobs += [(ECHO, base.updated(stop=(stop,))), (ECHO, base.updated(stop_at_newline=True, repetition_penalty=1.3))]
    jobs += [(ECHO, base.updated(max_new_tokens=n)) for n in (1, 2, 3, 5, 7)]  # the last token inside a proposal
    jobs += [("Human: " + "word " * 80 + "\nAssistant:", base)]  # the window slides while guessing
    expected = [engine.generate(p, params) for p, params in jobs]
    assert stop not in expected[3] and len(expected[3]) < len(free)
    for name, speculator in drafters(engine).items():
        got, sched = _serve(engine, speculator, jobs)
        assert got == expected, name
        assert sched.drafted > 0, name
        if name == "perfect":
            assert sched.accepted == sched.drafted
        if name == "bad":
            assert sched.accepted < sched.drafted


def test_sampled_replies_follow_the_request_and_its_seed(engine):
    params = SamplingParams(temperature=0.9, top_k=50, max_new_tokens=25, seed=3, stop_at_newline=False)
    for speculator in drafters(engine).values():
        a, sched = _serve(engine, speculator, [(ECHO, params), (ECHO, params)])
        assert a[0] == a[1] and a[0]  # seeded: reproducible
        assert sched.drafted > 0


def _toy(V=6):
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(V, generator=g) * 1.5, 0).double()
    q = torch.softmax(torch.randn(V, generator=g) * 1.5, 0).double()
    return p, q


@pytest.mark.parametrize("point_mass", [False, True])
def test_the_acceptance_rule_emits_tokens_distributed_as_the_target(point_mass):
    p, q = _toy()
    g = torch.Generator().manual_seed(1)
    n, counts = 20000, torch.zeros(p.numel(), dtype=torch.float64)
    xs = torch.multinomial(q, n, replacement=True, generator=g).tolist()
    for x in xs:
        if point_mass:
            x = 2  # a deterministic guess (prompt lookup): q is a point mass at x
        counts[accept_or_resample(x, p, None if point_mass else q, g)] += 1
    assert torch.allclose(counts / n, p, atol=0.015), (counts / n, p)


def test_the_acceptance_rule_exactly():
    # P(emit y) = q(y) min(1, p(y)/q(y)) + P(reject) * norm(max(0, p - q))(y) = p(y)
    p, q = _toy()
    keep = torch.minimum(q, p)
    residual = (p - q).clamp(min=0)
    emitted = keep + (1 - keep.sum()) * residual / residual.sum()
    assert torch.allclose(emitted, p, atol=1e-12)
    # and the rule takes its guesses that way: a guess the target likes more than the drafter always stands
    x = int(torch.argmax(p / q))
    assert all(accept_or_resample(x, p, q, torch.Generator().manual_seed(s)) == x for s in range(50))


def test_distribution_is_what_the_sampler_draws_from():
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=0.7, top_k=10, top_p=0.8, repetition_penalty=1.2)
    p = distribution(logits[0], params, [3, 4])
    assert abs(float(p.sum()) - 1) < 1e-6 and int((p > 0).sum()) <= 10
    from chatcore.sampling import sample

    draws = {int(sample(logits, params, [torch.Generator().manual_seed(s)], [[3, 4]])[0]) for s in range(300)}
    assert draws <= set(torch.nonzero(p).flatten().tolist())


def test_prompt_lookup_guesses_what_followed_the_last_ngram():
    assert lookup([1, 2, 3, 4, 5, 9, 2, 3], 2) == [4, 5]
    assert lookup([1, 2, 3, 4, 5, 9, 7, 3], 3) == [4, 5, 9]  # falls back to a shorter n-gram
    assert lookup([1, 2, 3], 4) == []


def test_config_turns_it_on(tmp_path):
    path = checkpoint.save(tiny_model(block_size=96), tmp_path / "tiny.safetensors", base_model="random")
    cfg = {"checkpoint": str(path), "device": "cpu", "dtype": "float32", "quantize": "none"}
    assert build_engine(cfg).speculator is None
    assert isinstance(build_engine({**cfg, "speculative": {"draft": "prompt_lookup", "k": 3}}).speculator, PromptLookup)
    drafter = build_engine({**cfg, "speculative": {"draft": str(path), "k": 2}}).speculator
    assert isinstance(drafter, DraftModel) and drafter.k == 2
    with pytest.raises(ValueError):
        build_engine({**cfg, "speculative": {"draft": "prompt_lookup", "k": 0}})


def test_a_conversation_that_is_joined_and_left_mid_reply_keeps_its_greedy_tokens(engine):
    base = SamplingParams(temperature=0, stop_at_newline=False)
    jobs = [(ECHO, base.updated(max_new_tokens=40)), (PROMPTS[1], base.updated(max_new_tokens=6)),
            (PROMPTS[3], base.updated(max_new_tokens=12))]
    expected = [engine.generate(p, params) for p, params in jobs]
    for name, speculator in drafters(engine).items():
        engine.speculator = speculator
        sched = BatchScheduler(engine, max_batch=4)
        try:
            got = _run_all(sched, jobs, stagger=0.05)  # the first guesses alone, is joined, then alone again
        finally:
            sched.close(timeout=5)
            engine.speculator = None
        assert got == expected, name
