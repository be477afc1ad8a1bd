"""Helpers for the engine tests (imported explicitly; not a conftest)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from chatcore.model import GPT, GPTConfig
from chatcore.prompt import render_exchange
from chatcore.tokenizer import Tokenizer


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


def sample_corpus(path: Path) -> tuple[list[list[int]], int]:
    """The sample conversations as training documents over their own compact vocabulary (trains in seconds)."""
    tok = Tokenizer()
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    docs = [tok.encode(render_exchange(r["user"], r["assistant"])) for r in rows]
    compact = {t: i for i, t in enumerate(sorted({t for d in docs for t in d}))}
    return [[compact[t] for t in d] for d in docs], len(compact)


def trained_model(docs: Sequence[Sequence[int]], vocab: int, steps: int = 100) -> GPT:
    """A 2-layer GPT trained on `docs` (one thread, seeded): small, but it has learned something."""
    with torch_threads(1):
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=64, vocab_size=vocab, n_layer=2, n_head=4, n_embd=64))
        stream = torch.tensor([t for d in docs for t in d])
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        gen = torch.Generator().manual_seed(0)
        for _ in range(steps):
            starts = torch.randint(0, len(stream) - 65, (8,), generator=gen)
            batch = torch.stack([stream[s : s + 65] for s in starts])
            _, loss = model(batch[:, :-1].contiguous(), batch[:, 1:].contiguous())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
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
