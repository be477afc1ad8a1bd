"""Helpers for the engine tests (imported explicitly; not a conftest)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from chatcore.model import GPT, GPTConfig

@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with `n` torch threads, then restore: tiny models train fastest on one, and two oversubscribe a busy CI."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tiny_config(**overrides) -> GPTConfig:
    cfg = dict(block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True)
    cfg.update(overrides)
    return GPTConfig(**cfg)


def tiny_model(seed: int = 0, std: float | None = None, **overrides) -> GPT:
    """A small random GPT; a larger ``std`` gives peakier logits (less repetitive greedy text)."""
    torch.manual_seed(seed)
    model = GPT(tiny_config(**overrides))
    if std is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, std)
    return model.eval()


def greedy_no_cache(model: GPT, ids: Sequence[int], n: int) -> list[int]:
    """Reference decoding: the whole context through the plain forward for every token."""
    idx = torch.tensor([list(ids)])
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(idx[:, -model.config.block_size :])
            tok = int(logits[0, -1].argmax())
            out.append(tok)
            idx = torch.cat([idx, torch.tensor([[tok]])], dim=1)
    return out


class ScriptedGPT(GPT):
    """A real (tiny) GPT whose next token is dictated by a script, for stop-rule tests.

    The cache still runs for real; only the logits are replaced: the script's next
    token gets a huge logit, so any sampler (greedy or not) picks it.
    """

    def __init__(self, script: Sequence[int], **overrides):
        super().__init__(tiny_config(**overrides))
        self.script = list(script)
        self.emitted = 0
        self.prompts: list[list[int]] = []

    def forward_cached(self, idx, cache, *args, **kwargs):
        if cache.length(0) == 0:
            self.prompts.append(idx[0].tolist())
        logits = super().forward_cached(idx, cache, *args, **kwargs)
        logits = torch.full_like(logits, -1e4)
        tok = self.script[self.emitted] if self.emitted < len(self.script) else 50256
        logits[:, tok] = 1e4
        self.emitted += 1
        return logits
