"""serving.max_batch / max_queue: auto sizes them from the memory available and the model's shape."""

from __future__ import annotations

import pytest

from chatcore.config import load_config
from chatcore.engine import Engine
from chatcore.model import GPT, GPTConfig
from chatcore.plugin_manager import make_plugin_manager
from chatcore.serving import MAX_AUTO_BATCH, Generator, batch_limits
from chatcore.tokenizer import Tokenizer

MiB = 2**20
GPT2 = GPTConfig(block_size=1024, vocab_size=50257, n_layer=12, n_head=12, n_embd=768)
ROW = 2 * 12 * 1024 * 768 * 4  # one full-context fp32 KV row of GPT-2 124M: 72 MiB


class Shape:
    config, dtype = GPT2, None


def test_auto_batch_is_half_the_available_memory_in_full_context_rows_capped():
    import torch

    Shape.dtype = torch.float32
    assert ROW == 72 * MiB
    assert batch_limits("auto", "auto", Shape, available=2 * 10 * ROW) == (10, 40)
    assert batch_limits("auto", "auto", Shape, available=ROW) == (1, 4)  # never 0
    assert batch_limits("auto", 7, Shape, available=10**15) == (MAX_AUTO_BATCH, 7)
    assert batch_limits(3, "auto", Shape, available=1) == (3, 12)  # a number is the operator's call
    Shape.dtype = torch.bfloat16  # half the bytes per value: twice the rows
    assert batch_limits("auto", 0, Shape, available=2 * 10 * ROW) == (20, 0)


async def test_the_default_config_sizes_the_scheduler_from_memory(monkeypatch):
    import chatcore.serving as serving

    config = load_config(None, make_plugin_manager(entry_points=False).schema())
    assert config["serving"]["max_batch"] == "auto" and config["serving"]["max_queue"] == "auto"
    monkeypatch.setattr(serving, "available_memory", lambda device=None: 2 * 5 * 2 * 64 * 64 * 2 * 4)  # 5 full rows of the model below
    model = GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=64))
    gen = Generator(Engine(model, Tokenizer(), device="cpu", dtype="float32"),
                    max_batch=config["serving"]["max_batch"], max_queue=config["serving"]["max_queue"])
    try:
        assert (gen.backend.max_batch, gen.backend.max_queue) == (5, 20)
        assert gen.backend.cache.max_batch == 5
    finally:
        await gen.close()


@pytest.mark.parametrize("raw, expected", [("16", 16), ("auto", "auto")])
def test_max_batch_from_the_environment(tmp_path, raw, expected):
    path = tmp_path / "bot.yaml"
    path.write_text("serving:\n  max_batch: ${MAX_BATCH}\n")
    config = load_config(path, make_plugin_manager(entry_points=False).schema(), environ={"MAX_BATCH": raw})
    assert config["serving"]["max_batch"] == expected
