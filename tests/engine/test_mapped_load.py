"""Checkpoints load through a memory map: what is kept as it is in the file is not read into anonymous memory."""

from __future__ import annotations

import sys

import pytest
import torch

from chatcore import checkpoint
from chatcore.model import GPT, GPTConfig
from chatcore.weights import build_engine

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")


def mapped_file(ptr: int) -> str | None:
    """The file whose mapping holds address ``ptr`` (None: anonymous memory)."""
    for line in open("/proc/self/maps"):
        parts = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if lo <= ptr < hi:
            return parts[5].strip() if len(parts) == 6 and parts[5].startswith("/") else None
    return None


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=32))
    return checkpoint.save(model, tmp_path / "tiny"), model


def test_int8_serves_no_fp32_embedding_and_keeps_the_position_table_mapped(saved):
    path, model = saved
    engine = build_engine({"checkpoint": str(path), "device": "cpu", "quantize": "int8"})
    m = engine.model
    assert type(m.transformer.wte).__name__ == "Int8Embedding"  # the head's int8 rows (chatcore.quant)
    held = list(m.state_dict().values()) + [v for mod in m.modules() for v in vars(mod).values() if isinstance(v, torch.Tensor)]
    assert not any(t.is_floating_point() and tuple(t.shape) == (50257, 32) for t in held)
    wpe = m.transformer.wpe.weight
    assert mapped_file(wpe.data_ptr()) == str(path.resolve())  # file pages (page cache), not a copy
    torch.testing.assert_close(wpe, model.transformer.wpe.weight, rtol=0, atol=0)


def test_fp32_lays_matrices_out_in_fresh_memory_and_maps_the_rest(saved):
    path, model = saved
    engine = build_engine({"checkpoint": str(path), "device": "cpu", "quantize": "none"})
    m = engine.model
    assert mapped_file(m.transformer.h[0].attn.c_attn.weight.data_ptr()) is None  # column-major copy for decoding
    assert m.transformer.h[0].attn.c_attn.weight.stride() == (1, 96)
    assert mapped_file(m.transformer.ln_f.weight.data_ptr()) == str(path.resolve())
    for name, p in m.state_dict().items():
        torch.testing.assert_close(p, model.state_dict()[name], rtol=0, atol=0)


def test_writing_a_mapped_weight_never_changes_the_file(saved):
    path, _ = saved
    before = path.read_bytes()
    model, _ = checkpoint.load(path)
    with torch.no_grad():
        model.transformer.ln_f.weight.add_(1.0)  # what merging an adapter in place does
    assert path.read_bytes() == before
    again, _ = checkpoint.load(path)
    assert not torch.equal(again.transformer.ln_f.weight, model.transformer.ln_f.weight)


def test_a_file_truncated_after_its_header_is_refused_before_anything_is_mapped(saved):
    path, _ = saved
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(checkpoint.CheckpointError, match="truncated"):
        checkpoint.load(path)
