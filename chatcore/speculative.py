"""Speculative decoding for a lone conversation: a cheap drafter guesses k tokens, the model checks them in one forward.

One decode step reads every weight of the model to produce one token; checking
k guessed tokens costs about the same read, so each guess the model agrees
with is a token for free. `chatcore.batching` uses it when a single
conversation is decoding (a batch already shares its weight reads).

Who guesses (``model.speculative.draft``):

- ``prompt_lookup``: the tokens that followed the last occurrence of the
  context's final n-gram (n = 3, 2, 1) earlier in the context. No model, no
  memory; chat replies often repeat names and phrases from the conversation.
- a checkpoint path: a small GPT of the same tokenizer (e.g. the starter model)
  run greedily or sampled with the request's settings, on its own KV cache.

Which guesses stand (`accept_or_resample`):

- greedy: the model's own pick at each position decides, so the reply is the
  one plain greedy decoding gives, token for token (up to float rounding of a
  k-token forward against k one-token forwards; int8 weights quantize the
  activations once per call, so there the k tokens checked together get
  logits close to, not identical with, one-at-a-time decoding: see
  `chatcore.quant`'s batching note);
- sampling: the standard rule (Leviathan et al. 2023; Chen et al. 2023): keep
  a guess x with probability min(1, p(x)/q(x)), else draw from
  norm(max(0, p - q)); every emitted token is then distributed exactly as p.
  A deterministic drafter (prompt lookup) has q = a point mass at x. Seeded
  replies stay reproducible, but differ from the same seed without speculation.

Whether it pays: checking k+1 tokens must cost little more than one step. With
int8 weights it does; torch's fp32 matrix products of a few rows run several
times slower than its one-row product on a small CPU (measured: a k=4 check
cost ~3 plain steps), so fp32 loses unless most guesses stand. Off by default.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import torch

from .params import SamplingParams
from .sampling import apply_repetition_penalty, sample

PROMPT_LOOKUP = "prompt_lookup"


def is_greedy(params: SamplingParams) -> bool:
    return params.temperature == 0 or params.top_k == 1


def distribution(logits: torch.Tensor, params: SamplingParams, previous: Sequence[int],
                 exempt: Collection[int] = ()) -> torch.Tensor:
    """The probabilities ``sample`` draws one row's next token from (penalty, temperature, top-k, top-p): ``[V]``."""
    row = logits.float().reshape(1, -1).clone()
    if params.repetition_penalty != 1.0:
        row = apply_repetition_penalty(row, [previous], [params.repetition_penalty], exempt)
    row = row[0] / params.temperature
    V = row.numel()
    k = V if params.top_k is None else min(params.top_k, V)
    vals, ids = torch.topk(row, k) if k < V else torch.sort(row, descending=True)
    probs = torch.softmax(vals, dim=-1)
    if params.top_p < 1:
        before = torch.cumsum(probs, dim=-1) - probs
        probs = probs.masked_fill(before >= params.top_p, 0.0)
    out = torch.zeros(V, dtype=probs.dtype, device=probs.device).scatter_(0, ids, probs)
    return out / out.sum()


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One index with probability proportional to ``probs`` (inverse CDF, as the sampler does)."""
    cdf = torch.cumsum(probs, dim=0)
    u = torch.rand(1, generator=generator, device=probs.device, dtype=cdf.dtype) * cdf[-1]
    return int(torch.searchsorted(cdf, u, right=True).clamp_(max=probs.numel() - 1)[0])


def accept_or_resample(x: int, p: torch.Tensor, q: torch.Tensor | None, generator: torch.Generator | None) -> int:
    """The verdict on guess ``x``: ``x`` itself with probability min(1, p(x)/q(x)), else a draw from
    norm(max(0, p - q)) (never ``x``). ``q`` None: a deterministic guess (a point mass at ``x``)."""
    qx = 1.0 if q is None else float(q[x])
    u = float(torch.rand(1, generator=generator, dtype=torch.float64)[0])
    if qx > 0 and u * qx < float(p[x]):  # u < p(x)/q(x), without dividing
        return x
    residual = p.clone()
    if q is None:
        residual[x] = 0.0
    else:
        residual = (residual - q).clamp_(min=0.0)
    if float(residual.sum()) <= 0:  # p == q up to rounding: the guess was as good as any draw from p
        return x
    return draw(residual, generator)


def lookup(tokens: Sequence[int], k: int, max_ngram: int = 3) -> list[int]:
    """Up to ``k`` tokens that followed the latest earlier occurrence of the context's last n-gram (longest n first)."""
    n_tok = len(tokens)
    for n in range(min(max_ngram, n_tok - 1), 0, -1):
        tail = list(tokens[-n:])
        for start in range(n_tok - n - 1, -1, -1):
            if list(tokens[start:start + n]) == tail:
                return list(tokens[start + n:start + n + k])
    return []


class PromptLookup:
    """Guesses from the context itself (see the module docstring)."""

    def __init__(self, k: int = 4, max_ngram: int = 3) -> None:
        self.k, self.max_ngram = k, max_ngram

    def propose(self, tokens: Sequence[int], k: int, params: SamplingParams, previous: Sequence[int],
                generator: torch.Generator | None, exempt: Collection[int] = ()) -> tuple[list[int], None]:
        return lookup(tokens, k, self.max_ngram), None


class DraftModel:
    """Guesses from a small GPT of the same tokenizer, on its own one-row KV cache."""

    def __init__(self, model: Any, vocab: int, k: int = 4) -> None:
        self.model, self.vocab, self.k = model, vocab, k
        self.cache = model.new_cache(1, max_len=model.config.block_size)
        self.fed: list[int] = []  # the tokens in the draft's cache, in order

    def propose(self, tokens: Sequence[int], k: int, params: SamplingParams, previous: Sequence[int],
                generator: torch.Generator | None, exempt: Collection[int] = ()) -> tuple[list[int], torch.Tensor | None]:
        """``k`` guesses after ``tokens``, and (when sampling) the distribution each was drawn from: ``[k, V]``."""
        tokens = list(tokens)
        if len(tokens) + k > self.cache.max_len:  # past the draft's window: guess from the recent context only
            tokens = tokens[-(self.cache.max_len - k):]
            self.cache.reset()
            self.fed = []
        common = 0
        for a, b in zip(self.fed, tokens[:-1]):  # keep at least the last token to run
            if a != b:
                break
            common += 1
        self.cache.truncate(0, common)
        self.fed = tokens[:common]
        guesses: list[int] = []
        dists: list[torch.Tensor] = []
        todo = tokens[common:]
        with torch.inference_mode():
            for i in range(k):
                idx = torch.tensor([todo], dtype=torch.long, device=self.model.device)
                logits = self.model.forward_cached(idx, self.cache)[:, : self.vocab]
                self.fed.extend(todo)
                seen = list(previous) + guesses
                if is_greedy(params):
                    tok = int(sample(logits, params, [None], [seen], exempt)[0])
                else:
                    q = distribution(logits[0], params, seen, exempt)
                    tok = draw(q, generator)
                    dists.append(q)
                guesses.append(tok)
                todo = [tok]
        return guesses, (torch.stack(dists) if dists else None)


def make_speculator(spec: dict | None, load_draft: Any = None) -> PromptLookup | DraftModel | None:
    """The drafter a ``model.speculative`` section asks for (None: off). ``load_draft(path)`` -> (model, vocab)."""
    spec = spec or {}
    draft = spec.get("draft")
    if draft in (None, "", "none"):
        return None
    k = int(spec.get("k", 4))
    if k < 1:
        raise ValueError(f"model.speculative.k must be >= 1; got {k}")
    if draft == PROMPT_LOOKUP:
        return PromptLookup(k)
    if load_draft is None:
        raise ValueError("a draft model needs a loader")
    model, vocab = load_draft(str(draft))
    return DraftModel(model, vocab, k)
