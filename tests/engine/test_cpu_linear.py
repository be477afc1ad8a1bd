"""oneDNN-packed fp32 layers (chatcore.cpu_linear): the plain model's tokens, in every serving path.

Greedy tokens must equal the plain fp32 model's token for token: alone, in a
batch with staggered arrivals, with the context window sliding, with LoRA
adapters routed per row, with speculative decoding, after a hot swap. The
models have peaky logits (std 0.3) so float rounding cannot flip an argmax.
"""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch

from chatcore import checkpoint, cpu_linear, lora
from chatcore.batching import BatchScheduler
from chatcore.config import ConfigError, load_config
from chatcore.cpu_linear import PackedLinear, is_packed, pack_linears, packed_here
from chatcore.engine import Engine
from chatcore.plugin_manager import make_plugin_manager
from chatcore.prefix_cache import PrefixCache
from chatcore.quant import Int8Linear
from chatcore.sampling import SamplingParams
from chatcore.serving import Generator
from chatcore.speculative import PromptLookup
from chatcore.tokenizer import Tokenizer
from chatcore.weights import build_engine, load_engine

from ..engine_fixtures import tiny_model
from .test_batching import PROMPTS, Collector, _run_all
from .test_lora_serving import base_model, make_adapter

pytestmark = pytest.mark.skipif(not cpu_linear.available(), reason="this torch build has no oneDNN")

GREEDY = SamplingParams(temperature=0, max_new_tokens=24, stop_at_newline=False)
LONG = "Human: " + "word " * 80 + "\nAssistant:"  # close to block_size 96: the window slides while decoding
ECHO = "Human: the quick brown fox jumps over the lazy dog. the quick brown fox jumps over the lazy dog. the quick\nAssistant:"


def _model():
    return tiny_model(std=0.3, block_size=96)


def _engine(packed: bool) -> Engine:
    engine = Engine(_model(), Tokenizer(), model_id="tiny", device="cpu", dtype="float32")
    if packed:
        pack_linears(engine.model)
    return engine


@pytest.fixture(scope="module")
def plain() -> Engine:
    return _engine(False)


@pytest.fixture(scope="module")
def packed() -> Engine:
    return _engine(True)


def test_every_block_matrix_is_packed_and_the_head_stays_tied():
    model = pack_linears(_model())
    names = [n for n, m in model.named_modules() if isinstance(m, PackedLinear)]
    assert len(names) == 2 * 4 and all(n.startswith("transformer.h.") for n in names)
    assert not any(type(m) is torch.nn.Linear for n, m in model.named_modules() if n.startswith("transformer.h."))
    assert model.lm_head.weight is model.transformer.wte.weight
    assert is_packed(model) and not is_packed(_model())
    assert all(m.weight is None for m in model.modules() if isinstance(m, PackedLinear))  # no second copy
    head = pack_linears(_model(), head=True)
    assert isinstance(head.lm_head, PackedLinear)


@torch.no_grad()
def test_logits_and_state_dict_equal_the_plain_model():
    ref = _model()
    got = pack_linears(copy.deepcopy(ref), head=True)
    idx = torch.randint(0, 50257, (3, 40), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(got(idx)[0], ref(idx)[0], rtol=1e-4, atol=1e-4)
    c1, c2 = ref.new_cache(3), got.new_cache(3)
    torch.testing.assert_close(got.forward_cached(idx[:, :30], c2), ref.forward_cached(idx[:, :30], c1), rtol=1e-4, atol=1e-4)
    for t in range(30, 40):  # decode steps on the KV cache
        torch.testing.assert_close(got.forward_cached(idx[:, t : t + 1], c2), ref.forward_cached(idx[:, t : t + 1], c1),
                                   rtol=1e-4, atol=1e-4)
    want, have = ref.state_dict(), got.state_dict()
    assert list(have) == list(want)
    for k in want:
        assert torch.equal(have[k], want[k]), k
    assert lora.fingerprint(got) == lora.fingerprint(ref)  # an adapter's base check still recognises it
    again = copy.deepcopy(got)  # an opaque oneDNN tensor has no storage: it is repacked
    torch.testing.assert_close(again(idx)[0], got(idx)[0], rtol=0, atol=0)


def test_greedy_tokens_equal_the_plain_model_alone_and_with_the_window_sliding(plain, packed):
    for prompt in (PROMPTS[0], PROMPTS[2], PROMPTS[5], LONG):
        ids = plain.tokenizer.encode(prompt)
        params = GREEDY.updated(max_new_tokens=40)
        want = list(plain.tokens(ids, params))
        assert list(packed.tokens(ids, params)) == want
    assert len(plain.tokenizer.encode(LONG)) + 40 > plain.block_size  # it did slide


def test_batched_with_staggered_arrivals_equals_the_plain_model_alone(plain, packed):
    jobs = [(p, GREEDY.updated(max_new_tokens=10 + 4 * i)) for i, p in enumerate(PROMPTS + [LONG])]
    expected = [plain.generate(p, params) for p, params in jobs]
    sched = BatchScheduler(packed, max_batch=4, prefill_chunk=16)
    try:
        assert _run_all(sched, jobs, stagger=0.002) == expected
        assert _run_all(sched, jobs) == expected
    finally:
        sched.close(timeout=10)


def test_lora_adapters_route_through_packed_layers(tmp_path):
    paths = [make_adapter(tmp_path / f"finetuned_{i}.safetensors", seed=i)[0] for i in range(2)]

    def engine(pack: bool) -> Engine:
        e = Engine(base_model(), Tokenizer(), model_id="tiny", device="cpu", dtype="float32")
        if pack:
            pack_linears(e.model)
        return e

    jobs = [(p, [None, ("a", str(paths[0])), ("b", str(paths[1]))][i % 3]) for i, p in enumerate(PROMPTS)]
    outs = []
    for pack in (False, True):
        sched = BatchScheduler(engine(pack), max_batch=4, prefix_cache=PrefixCache(), prefill_chunk=16)
        try:
            got = []
            for prompt, adapter in jobs:  # all in flight together, each row with its own adapter
                sink = Collector()
                sched.submit(prompt, GREEDY, sink, adapter=adapter)
                got.append(sink)
            outs.append([s.text for s in got])
            assert sched.adapters.loads == 2  # the base check (fingerprint) accepted both adapters
            assert all(isinstance(m, PackedLinear) == pack for n, m in lora.lora_layers(sched.model))
        finally:
            sched.close(timeout=10)
    assert outs[0] == outs[1]
    assert outs[0][1] != outs[0][0] or outs[0][2] != outs[0][0]  # the adapters did change the replies


def test_speculative_decoding_keeps_the_plain_greedy_tokens(plain, packed):
    jobs = [(ECHO, GREEDY.updated(max_new_tokens=30)), (LONG, GREEDY)]
    expected = [plain.generate(p, params) for p, params in jobs]
    packed.speculator = PromptLookup(k=4)
    sched = BatchScheduler(packed, max_batch=2)
    try:
        assert [_run_all(sched, [job])[0] for job in jobs] == expected
        assert sched.drafted > 0
    finally:
        sched.close(timeout=10)
        packed.speculator = None


def test_a_hot_swap_to_a_packed_engine_serves_the_same_replies(plain, packed):
    async def go():
        gen = Generator(plain, max_batch=2)
        before = await gen.generate(PROMPTS[2], GREEDY)
        gen.swap(packed)
        after = await gen.generate(PROMPTS[2], GREEDY)
        await gen.close()
        return before, after

    before, after = asyncio.run(go())
    assert before == after == plain.generate(PROMPTS[2], GREEDY)


def test_the_option_validates_and_applies_only_to_fp32_on_a_cpu(monkeypatch):
    monkeypatch.setattr(cpu_linear, "packed_by_default", lambda: True)
    cpu, f32 = torch.device("cpu"), torch.float32
    assert packed_here("auto", cpu, f32) and packed_here("packed", cpu, f32)
    assert not packed_here("plain", cpu, f32) and not packed_here(None, cpu, f32)
    assert not packed_here("auto", torch.device("cuda"), torch.bfloat16)  # off where it does not apply
    assert not packed_here("auto", torch.device("mps"), torch.float16)
    assert not packed_here("auto", cpu, torch.bfloat16)
    assert not packed_here("auto", cpu, f32, quantized=True) and not packed_here("packed", cpu, f32, quantized=True)
    with pytest.raises(ValueError, match="cpu_layout.*packed applies to float32 weights on the CPU"):
        packed_here("packed", torch.device("cuda"), torch.bfloat16)
    with pytest.raises(ValueError, match="model.cpu_layout must be one of auto, packed, plain"):
        packed_here("onednn", cpu, f32)
    with pytest.raises(ValueError, match="float32 on the CPU"):
        pack_linears(_model().to(torch.bfloat16))
    monkeypatch.setattr(cpu_linear, "packed_by_default", lambda: False)  # a CPU where torch's layout was faster
    assert not packed_here("auto", cpu, f32) and packed_here("packed", cpu, f32)


def test_the_bot_serves_fp32_packed_where_auto_packs_unless_told_plain(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_linear, "packed_by_default", lambda: True)
    base = checkpoint.save(tiny_model(n_layer=1), tmp_path / "base")

    def engine(extra: str):
        path = tmp_path / "bot.yaml"
        path.write_text(f"bot:\n  data_dir: {tmp_path}\nmodel:\n  checkpoint: {base}\n  device: cpu\n{extra}")
        return load_engine(load_config(path, make_plugin_manager(entry_points=False).schema()))

    assert isinstance(engine("  quantize: none\n").model.transformer.h[0].mlp.c_fc, PackedLinear)  # auto
    assert type(engine("  quantize: none\n  cpu_layout: plain\n").model.transformer.h[0].mlp.c_fc) is torch.nn.Linear
    assert isinstance(engine("").model.transformer.h[0].mlp.c_fc, Int8Linear)  # int8 (the CPU default) keeps its own
    assert isinstance(engine("  cpu_layout: packed\n").model.transformer.h[0].mlp.c_fc, Int8Linear)
    with pytest.raises(ConfigError, match="cpu_layout"):
        engine("  quantize: none\n  cpu_layout: fast\n")
    draft = build_engine({"checkpoint": str(base), "device": "cpu", "quantize": "none",
                          "speculative": {"draft": str(base), "k": 3}})
    assert is_packed(draft.model) and is_packed(draft.speculator.model)  # the draft loads like the served model
    monkeypatch.setattr(cpu_linear, "packed_by_default", lambda: False)
    assert type(engine("  quantize: none\n").model.transformer.h[0].mlp.c_fc) is torch.nn.Linear
    assert isinstance(engine("  quantize: none\n  cpu_layout: packed\n").model.transformer.h[0].mlp.c_fc, PackedLinear)
