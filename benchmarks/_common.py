"""Measurement helpers shared by the benchmark scripts (run as `python benchmarks/<name>.py`)."""

from __future__ import annotations

import contextlib
import resource
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path


def peak_rss_mb() -> float:
    """This process's peak RSS in MiB.

    VmHWM, not getrusage's ru_maxrss: on Linux the latter carries over the
    high-water mark of the forked copy of the parent from before exec.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB elsewhere (macOS: bytes)


@contextlib.contextmanager
def busy_processes(n: int) -> Iterator[None]:
    """`n` processes that spin on a core each until the block ends: another program on the machine (``--busy``)."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def first_token_timer():
    """A transformers streamer that records when `generate` produced its first new token."""
    from transformers.generation.streamers import BaseStreamer

    class FirstTokenTimer(BaseStreamer):
        def __init__(self) -> None:
            self.calls, self.first = 0, None

        def put(self, value) -> None:
            self.calls += 1
            if self.calls == 2:  # the first put() is the prompt
                self.first = time.perf_counter()

        def end(self) -> None:
            pass

    return FirstTokenTimer()


def build_model():
    """GPT-2 124M shapes with cheap deterministic random weights (the same in every benchmark and process)."""
    import torch

    from chatcore.model import GPT, GPTConfig

    with torch.device("meta"):
        model = GPT(GPTConfig())
    model.to_empty(device="cpu")
    for name, p in model.named_parameters():
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        if name.endswith("weight") and p.dim() == 1:
            p.data.fill_(1.0)  # LayerNorm gains
        else:
            p.data.normal_(0.0, 0.02, generator=g)
    model.transformer.wte.weight = model.lm_head.weight
    return model.eval()


def ct2_batch(gen, batch: list[list[str]], new_tokens: int, top_k: int, temperature: float) -> dict:
    """CTranslate2's static batch of all prompts at once (``gen``: a ``ctranslate2.Generator``; ``batch``: its tokens).

    Time to first token comes from a run with a per-step callback; tokens/s from one without it: the callback
    hands every step to Python and cost CTranslate2 about a third of its tokens/s (a batch stopped after one
    token, max_length=1, took longer than the whole first step here).
    """
    gen.generate_batch(batch, max_length=4, sampling_topk=top_k, include_prompt_in_result=False)  # warm-up, batch shapes
    first: list[float] = []
    t0 = time.perf_counter()
    gen.generate_batch(batch, max_length=new_tokens, min_length=new_tokens, sampling_topk=top_k,
                       sampling_temperature=temperature, include_prompt_in_result=False,
                       callback=lambda step: first.append(time.perf_counter()) if not first else None)
    ttft = first[0] - t0 if first else None
    t0 = time.perf_counter()
    res = gen.generate_batch(batch, max_length=new_tokens, min_length=new_tokens, sampling_topk=top_k,
                             sampling_temperature=temperature, include_prompt_in_result=False)
    seconds = time.perf_counter() - t0
    tokens = sum(len(r.sequences_ids[0]) for r in res)
    return dict(tokens=tokens, seconds=seconds, tok_s=tokens / seconds, ttft_p50_s=ttft)
