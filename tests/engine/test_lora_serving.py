"""Many LoRA adapters in one continuous batch (chatcore.lora.AdapterPool + chatcore.batching)."""

from __future__ import annotations

import copy
import os
import time

import pytest
import torch

from chatcore import lora
from chatcore.batching import BatchScheduler
from chatcore.engine import Engine
from chatcore.model import GPT, GPTConfig
from chatcore.prefix_cache import PrefixCache
from chatcore.sampling import SamplingParams
from chatcore.tokenizer import Tokenizer

from .test_batching import PROMPTS, Collector

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12, stop_at_newline=False)


def base_model() -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=96, vocab_size=50257, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():
        model.transformer.wte.weight.normal_(0.0, 0.3)  # peaky logits: the adapters visibly change the text
    return model.eval()


def make_adapter(path, seed: int, **options):
    model = base_model()
    cfg = lora.LoRAConfig(rank=4, alpha=8, **options)
    lora.apply_lora(model, cfg)
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, m in lora.lora_layers(model):
            m.lora_B.normal_(0.0, 0.5)
    return lora.save_adapter(model, path, cfg, base_model="tiny-test"), model


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    d = tmp_path_factory.mktemp("adapters")
    return [make_adapter(d / f"finetuned_{i}.safetensors", seed=i)[0] for i in range(3)]


def scheduler(**kw) -> BatchScheduler:
    engine = Engine(base_model(), Tokenizer(), model_id="tiny", device="cpu", dtype="float32")
    return BatchScheduler(engine, **kw)


def run(sched: BatchScheduler, jobs, stagger: float = 0.0) -> list[str]:
    sinks = []
    for prompt, adapter in jobs:
        sink = Collector()
        sched.submit(prompt, GREEDY, sink, adapter=adapter)
        sinks.append(sink)
        if stagger:
            time.sleep(stagger)
    return [s.text for s in sinks]


def test_a_batch_mixing_adapters_gives_each_row_the_tokens_of_that_adapter_alone(adapters):
    choices = [None, ("a", str(adapters[0])), ("b", str(adapters[1])), ("c", str(adapters[2]))]
    jobs = [(p, choices[i % 4]) for i, p in enumerate(PROMPTS + PROMPTS[:2])]
    alone = scheduler(max_batch=1, prefix_cache=None)
    try:
        want = [run(alone, [job])[0] for job in jobs]
    finally:
        alone.close(timeout=10)
    assert want[0] != want[1] or want[1] != want[2]  # the adapters do change the replies
    mixed = scheduler(max_batch=8, prefix_cache=PrefixCache(), prefill_chunk=16)
    try:
        assert run(mixed, jobs, stagger=0.002) == want
        assert run(mixed, jobs) == want  # again, now with prefixes cached per adapter
        assert mixed.adapters.loads == 3  # each adapter loaded once, lazily
    finally:
        mixed.close(timeout=10)
    # and serving an adapter alone is the same as serving its base with the adapter merged in
    merged = Engine(lora.merge_adapter(base_model(), lora.load_adapter(adapters[1])), Tokenizer(),
                    model_id="merged", device="cpu", dtype="float32")
    assert merged.generate(jobs[2][0], GREEDY) == want[2]


def test_a_top_layers_adapter_serves_as_its_merged_weights_and_leaves_the_lower_blocks_alone(adapters, tmp_path):
    top, trained = make_adapter(tmp_path / "finetuned_top.safetensors", seed=7, layers=1)
    assert {k.rsplit(".", 1)[0] for k in lora.load_adapter(top).state} == {
        f"transformer.h.1.{t}" for t in lora.TARGETS}  # keyed by module name: the top block's only
    key = (str(top.resolve()), top.stat().st_mtime_ns)
    sched = scheduler(max_batch=4, prefix_cache=None)
    try:
        alone = run(sched, [(PROMPTS[0], ("t", str(top)))])[0]
        assert not list(lora.lora_layers(sched.model.transformer.h[0]))  # attached only where the file has tensors
        # in a batch with an every-block adapter: block 0 adds that one's update only
        got = run(sched, [(PROMPTS[0], ("t", str(top))), (PROMPTS[1], ("a", str(adapters[0]))), (PROMPTS[2], None)])
        assert all(key not in m.served for _, m in lora.lora_layers(sched.model.transformer.h[0]))
        assert all(key in m.served for _, m in lora.lora_layers(sched.model.transformer.h[1]))
        base_reply = run(sched, [(PROMPTS[0], None)])[0]
    finally:
        sched.close(timeout=10)
    assert got[0] == alone != base_reply  # the adapter changes the reply, whatever the batch holds
    merged = Engine(lora.merge_adapter(base_model(), lora.load_adapter(top)), Tokenizer(),
                    model_id="merged", device="cpu", dtype="float32")
    assert alone == merged.generate(PROMPTS[0], GREEDY)
    with torch.no_grad():  # and the merged weights are the trained model's
        idx = torch.randint(0, 50257, (1, 8), generator=torch.Generator().manual_seed(0))
        assert torch.allclose(merged.model(idx)[0], trained.eval()(idx)[0], atol=1e-4)


def test_an_adapter_hot_swap_drops_no_request(adapters, tmp_path):
    old = tmp_path / "finetuned_old.safetensors"
    old.write_bytes(adapters[0].read_bytes())
    new = tmp_path / "finetuned_new.safetensors"
    new.write_bytes(adapters[1].read_bytes())
    sched = scheduler(max_batch=4, prefix_cache=PrefixCache())
    try:
        want_old, want_new = run(sched, [(PROMPTS[2], ("s", str(old))), (PROMPTS[2], ("s", str(new)))])
        long = SamplingParams(temperature=0.0, max_new_tokens=40, stop_at_newline=False)
        first = Collector()
        sched.submit(PROMPTS[2], long, first, adapter=("s", str(old)))
        assert first.first.wait(30)
        # the scope's adapter is replaced while a request still decodes with the old one
        second = Collector()
        sched.submit(PROMPTS[2], GREEDY, second, adapter=("s", str(new)))
        assert second.text == want_new
        assert first.text.startswith(want_old) and first.error is None
        key_old = (str(old.resolve()), old.stat().st_mtime_ns)
        time.sleep(0.05)
        assert key_old not in sched.adapters.loaded  # unloaded once its last request ended
        ids = Tokenizer().encode(PROMPTS[2])
        key_new = (str(new.resolve()), new.stat().st_mtime_ns)
        assert sched.prefix_cache.lookup(ids, namespace=key_old) is None  # flushed with the old version
        assert sched.prefix_cache.lookup(ids, namespace=key_new) is not None
    finally:
        sched.close(timeout=10)


def test_adapters_stay_within_their_memory_budget_least_recently_used_first(adapters):
    size = lora.load_adapter(adapters[0]).nbytes()
    sched = scheduler(max_batch=2, prefix_cache=None, adapter_budget_mb=2.5 * size / 2**20)
    try:
        for a in [adapters[0], adapters[1], adapters[0], adapters[2], adapters[0]]:
            run(sched, [(PROMPTS[0], (None, str(a)))])
        assert len(sched.adapters.loaded) <= 2
        assert sched.adapters.loads == 3  # adapters[0] stayed (recently used); adapters[1] went for [2]
    finally:
        sched.close(timeout=10)


def test_an_unusable_adapter_serves_the_request_on_the_base(tmp_path):
    bad = tmp_path / "finetuned_bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    sched = scheduler(max_batch=2, prefix_cache=None)
    try:
        assert run(sched, [(PROMPTS[0], ("x", str(bad)))]) == run(sched, [(PROMPTS[0], None)])
    finally:
        sched.close(timeout=10)
