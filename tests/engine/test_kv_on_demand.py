"""The CPU KV cache takes memory as tokens are written and returns it when a row is reset,
and decoding through it gives the same tokens as the old fully allocated cache."""

from __future__ import annotations

import mmap
import os
import sys

import pytest
import torch

from chatcore.batching import BatchScheduler
from chatcore.engine import Engine
from chatcore.model import GPT, GPTConfig, KVCache
from chatcore.sampling import SamplingParams
from chatcore.tokenizer import Tokenizer

from .test_batching import PROMPTS, _run_all

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or not os.access("/proc/self/pagemap", os.R_OK), reason="counts pages in /proc/self/pagemap"
)


def resident_bytes(cache) -> int:
    """Bytes of the cache's reserved span that are backed by memory now (present bit of each page)."""
    start, size = cache.k.data_ptr(), cache.nbytes()
    first, n = start // mmap.PAGESIZE, -(-size // mmap.PAGESIZE)
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(first * 8)
        entries = memoryview(f.read(n * 8)).cast("Q")
    return sum(1 for e in entries if e >> 63) * mmap.PAGESIZE


def test_a_short_conversation_holds_only_its_pages():
    # head_dim 64 in float32: one page holds 16 tokens of one (layer, row, head)
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=1024, vocab_size=300, n_layer=2, n_head=2, n_embd=128)
    model = GPT(cfg).eval()
    cache = model.new_cache(max_batch=8)
    per_16_tokens = 2 * cfg.n_layer * cfg.n_head * mmap.PAGESIZE  # k and v, every layer and head
    assert cache.nbytes() >= 8 * 1024 * 2 * cfg.n_layer * cfg.n_embd * 4
    assert resident_bytes(cache) == 0
    with torch.inference_mode():
        model.forward_cached(torch.randint(0, 300, (1, 20)), cache, rows=[3])  # 20 tokens: 2 pages per head
        assert resident_bytes(cache) == 2 * per_16_tokens
        model.forward_cached(torch.randint(0, 300, (1, 40)), cache, rows=[0])  # 40 more: 3 pages per head
        assert resident_bytes(cache) == 5 * per_16_tokens
        for _ in range(12):  # row 3 decodes to 32 tokens: still 2 pages per head
            model.forward_cached(torch.randint(0, 300, (1, 1)), cache, rows=[3])
        assert resident_bytes(cache) == 5 * per_16_tokens
        cache.reset(3)
        assert resident_bytes(cache) == 3 * per_16_tokens
        cache.reset()
        assert resident_bytes(cache) == 0
        # a reset row reads as zeros and decodes exactly like a fresh cache
        idx = torch.randint(0, 300, (1, 9))
        again = model.forward_cached(idx, cache, rows=[3])
        fresh = model.forward_cached(idx, model.new_cache(max_batch=8, on_demand=False), rows=[3])
    assert torch.equal(again, fresh)
    assert cache.k[:, 3, :, 9:].abs().sum() == 0


@pytest.fixture(scope="module")
def engine() -> Engine:
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=96, vocab_size=50257, n_layer=2, n_head=2, n_embd=32))
    return Engine(model, Tokenizer(), model_id="tiny", device="cpu", dtype="float32")


def test_batched_decoding_matches_the_fully_allocated_cache_token_for_token(engine):
    jobs = [(p, SamplingParams(temperature=0, max_new_tokens=10 + 7 * i)) for i, p in enumerate(PROMPTS)]
    results = {}
    for on_demand in (False, True):
        sched = BatchScheduler(engine, max_batch=4, prefill_chunk=16)
        sched.cache = engine.model.new_cache(4, max_len=engine.block_size, on_demand=on_demand)
        try:
            results[on_demand] = _run_all(sched, jobs, stagger=0.002)
            if on_demand:
                assert resident_bytes(sched.cache) == 0  # every row was handed back when its request finished
        finally:
            sched.close(timeout=5)
    assert results[True] == results[False]
    assert any(results[True])


def test_the_scheduler_cache_starts_empty(engine):
    sched = BatchScheduler(engine, max_batch=8)
    try:
        assert sched.cache.nbytes() >= 8 * engine.block_size * 2 * 2 * 32 * 4
        assert resident_bytes(sched.cache) == 0
    finally:
        sched.close(timeout=5)


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="resets the peak RSS through /proc/self/clear_refs")
def test_moving_a_row_into_the_prefix_cache_never_holds_it_twice():
    """`take` (what a finished conversation's state goes to the prefix cache with) copies one layer
    at a time and hands each layer's pages back: the process never holds the row twice. A snapshot
    followed by a reset peaks a whole row higher, at the moment a long prompt has just finished."""
    cfg = GPTConfig(block_size=1024, vocab_size=300, n_layer=8, n_head=8, n_embd=512)
    cache = KVCache(cfg, max_batch=2)
    row_mib = 2 * cfg.n_layer * 1024 * cfg.n_embd * 4 / 2**20  # k and v of 1024 tokens: 32 MiB
    k = torch.randn(cfg.n_layer, cfg.n_head, 1024, cfg.n_embd // cfg.n_head)
    cache.restore(1, k, k * 2)
    before = _status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak resident set starts again from now
    taken_k, taken_v = cache.take(1)
    peak = _status_mib("VmHWM")
    assert peak - before < 0.25 * row_mib, f"moving a {row_mib:.0f} MiB row peaked {peak - before:.1f} MiB higher"
    assert torch.equal(taken_k, k) and torch.equal(taken_v, k * 2)
    assert cache.length(1) == 0 and resident_bytes(cache) == 0
