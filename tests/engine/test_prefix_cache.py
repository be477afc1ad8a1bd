"""PrefixCache: longest shared token prefix, byte budget, LRU, and logits equal to a fresh run."""

import pytest
import torch

from chatcore.model import GPT, GPTConfig
from chatcore.prefix_cache import PrefixCache


def _state(n: int, fill: float = 0.0, layers: int = 2, heads: int = 2, hd: int = 4):
    k = torch.full((layers, heads, n, hd), fill)
    return k, k.clone()


def _bytes(n: int) -> int:
    k, v = _state(n)
    return k.element_size() * (k.numel() + v.numel())


def test_longest_shared_prefix_wins_and_is_capped():
    cache = PrefixCache(budget_bytes=10**6)
    cache.store([1, 2, 3], *_state(3, 1.0))
    cache.store([7, 8, 9, 10, 11], *_state(5, 2.0))
    cache.store([7, 8, 5], *_state(3, 3.0))
    hit = cache.lookup([7, 8, 9, 10, 99, 100])
    assert hit.length == 4 and hit.k.shape[2] == 4 and float(hit.k[0, 0, 0, 0]) == 2.0
    # a prompt equal to a cached state must still feed its last token: the caller caps the hit
    assert cache.lookup([7, 8, 9, 10, 11], max_length=4).length == 4
    assert cache.lookup([42, 43]) is None
    assert (cache.hits, cache.misses) == (2, 1)


def test_min_shared_avoids_trivial_hits():
    cache = PrefixCache(budget_bytes=10**6, min_shared=3)
    cache.store([1, 2, 3, 4], *_state(4))
    assert cache.lookup([1, 2, 9]) is None
    assert cache.lookup([1, 2, 3, 9]).length == 3


def test_budget_evicts_least_recently_used():
    cache = PrefixCache(budget_bytes=2 * _bytes(10))
    cache.store(list(range(0, 10)), *_state(10))
    cache.store(list(range(100, 110)), *_state(10))
    assert cache.lookup(list(range(0, 10)) + [5]) is not None  # touch the first: the second is now LRU
    cache.store(list(range(200, 210)), *_state(10))
    assert len(cache) == 2 and cache.nbytes <= cache.budget_bytes
    assert cache.lookup(list(range(100, 110))) is None
    assert cache.lookup(list(range(0, 10))) is not None
    assert cache.lookup(list(range(200, 210))) is not None


def test_state_over_budget_is_not_kept():
    cache = PrefixCache(budget_bytes=_bytes(10))
    assert cache.store(list(range(11)), *_state(11)) is False
    assert len(cache) == 0 and cache.nbytes == 0


def test_newer_turn_supersedes_older_state_of_same_conversation():
    cache = PrefixCache(budget_bytes=10**6)
    turn1 = list(range(50))
    cache.store(turn1, *_state(50))
    other = [1000, 1001] + list(range(60))  # another conversation: shares nothing at the start
    cache.store(other, *_state(62))
    turn2 = turn1[:-1] + [999] + list(range(500, 520))  # last token re-rendered differently
    cache.store(turn2, *_state(len(turn2)))
    assert len(cache) == 2
    assert cache.lookup(turn2 + [1]).length == len(turn2)
    assert cache.lookup(other).length == len(other)


def test_shapes_are_checked():
    cache = PrefixCache()
    k, v = _state(3)
    with pytest.raises(ValueError):
        cache.store([1, 2], k, v)


@torch.no_grad()
def test_reused_prefix_gives_the_logits_of_a_fresh_run():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=128, vocab_size=97, n_layer=2, n_head=2, n_embd=32)).eval()
    gen = torch.Generator().manual_seed(1)
    turn1 = torch.randint(0, 97, (40,), generator=gen).tolist()
    reply = torch.randint(0, 97, (12,), generator=gen).tolist()
    follow_up = torch.randint(0, 97, (25,), generator=gen).tolist()

    # serve turn 1 in row 1 of a batch cache, decoding the reply token by token
    cache = model.new_cache(max_batch=3)
    model.forward_cached(torch.tensor([turn1]), cache, rows=[1])
    for t in reply:
        model.forward_cached(torch.tensor([[t]]), cache, rows=[1])
    prefixes = PrefixCache()
    prefixes.store(turn1 + reply, *cache.snapshot(1))

    prompt2 = turn1 + reply + follow_up
    hit = prefixes.lookup(prompt2, max_length=len(prompt2) - 1)
    assert hit.length == len(turn1) + len(reply)
    cache.reset()
    cache.restore(2, hit.k, hit.v)
    reused = model.forward_cached(torch.tensor([prompt2[hit.length :]]), cache, rows=[2])

    fresh, _ = model(torch.tensor([prompt2]))
    torch.testing.assert_close(reused[0], fresh[0, -1], atol=1e-4, rtol=0)
