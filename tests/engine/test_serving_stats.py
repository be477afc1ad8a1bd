"""Generator.stats: the queue, batch and cache figures /metrics and the dashboard read."""

from __future__ import annotations

import asyncio

import torch

from chatcore.engine import Engine
from chatcore.model import GPT, GPTConfig
from chatcore.sampling import SamplingParams
from chatcore.serving import Generator
from chatcore.tokenizer import Tokenizer

GREEDY = SamplingParams(temperature=0, max_new_tokens=8, stop_at_newline=False)


async def test_stats_count_decode_rows_so_the_mean_batch_size_shows():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=96, vocab_size=50257, n_layer=2, n_head=2, n_embd=32))
    gen = Generator(Engine(model, Tokenizer(), model_id="tiny", device="cpu", dtype="float32"), max_batch=4)
    try:
        assert gen.stats()["decode_steps"] == 0
        prompts = [f"Human: question {i}\nAssistant:" for i in range(4)]
        await asyncio.gather(*(gen.generate(p, GREEDY) for p in prompts))
        await gen.generate(prompts[0] + " a", GREEDY)  # a follow-up: its prefix is cached
        stats = gen.stats()
        assert stats["decode_steps"] > 0 and stats["decode_rows"] / stats["decode_steps"] > 1
        assert stats["waiting"] == 0 and stats["running"] == 0 and stats["busy"] == 0
        assert stats["prefix_hits"] >= 1
    finally:
        await gen.close()
