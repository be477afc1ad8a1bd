"""The sampling functions: temperature, top-k, top-p and the repetition penalty on a batch of logits.

Their settings, `SamplingParams`, live in the torch-free `chatcore.params`."""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from .params import SamplingParams, validate

__all__ = ["SamplingParams", "apply_repetition_penalty", "make_generator", "sample", "validate"]


# --- sampling functions -------------------------------------------------------------
#
# They work on a batch of logits ``[B, V]`` with one SamplingParams per row, so a
# single request (B = 1) and a continuous batch share the same code.


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A per-request random generator (None: use torch's global one)."""
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


def apply_repetition_penalty(
    logits: torch.Tensor,
    previous: Sequence[Sequence[int]],
    penalties: Sequence[float],
    exempt: Collection[int] = (),
) -> torch.Tensor:
    """CTRL-style penalty (positive logits divided, negative multiplied) on each row's
    ``previous`` tokens, except the ``exempt`` ones (turn markers: penalising them
    makes it harder for the model to end its turn). Works in place and returns ``logits``."""
    for b, (ids, penalty) in enumerate(zip(previous, penalties)):
        if penalty == 1.0 or not ids:
            continue
        uniq = sorted(set(ids) - set(exempt))
        if not uniq:
            continue
        idx = torch.tensor(uniq, dtype=torch.long, device=logits.device)
        row = logits[b, idx]
        logits[b, idx] = torch.where(row > 0, row / penalty, row * penalty)
    return logits


def sample(
    logits: torch.Tensor,
    params: SamplingParams | Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None] | None = None,
    previous: Sequence[Sequence[int]] | None = None,
    exempt: Collection[int] = (),
) -> torch.Tensor:
    """Pick the next token of every row of ``logits`` ``[B, V]``; returns ``[B]`` token ids.

    ``params`` is one SamplingParams for all rows or one per row; ``generators``
    one per row (None entries use torch's global generator); ``previous`` the
    tokens each row generated so far (for the repetition penalty).
    """
    B, V = logits.shape
    plist = [params] * B if isinstance(params, SamplingParams) else list(params)
    gens = list(generators) if generators is not None else [None] * B
    if len(plist) != B or len(gens) != B:
        raise ValueError(f"need one SamplingParams and one generator per row ({B})")
    logits = logits.float()  # a copy for low-precision logits; the penalty writes in place
    if previous is not None and any(p.repetition_penalty != 1.0 for p in plist):
        logits = apply_repetition_penalty(logits.clone(), previous, [p.repetition_penalty for p in plist], exempt)
    out = torch.empty(B, dtype=torch.long, device=logits.device)
    greedy = [b for b, p in enumerate(plist) if p.temperature == 0 or p.top_k == 1]
    if greedy:
        out[greedy] = logits[greedy].argmax(dim=-1)
    rest = sorted(set(range(B)) - set(greedy))
    # The top-k of every row with the same k in one call (one pass over the batch's logits, not one
    # call per row: ~9 -> ~5 ms for 30 rows of GPT-2's vocabulary); each row's top-k is the same either way
    by_k: dict[int, list[int]] = {}
    for b in rest:
        k = V if plist[b].top_k is None else min(plist[b].top_k, V)
        if k < V:
            by_k.setdefault(k, []).append(b)
    top: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for k, rows in by_k.items():
        temps = torch.tensor([plist[b].temperature for b in rows], dtype=logits.dtype, device=logits.device)
        vals, ids = torch.topk(logits[rows] / temps[:, None], k)
        top.update((b, (vals[i], ids[i])) for i, b in enumerate(rows))
    # The draws row by row, so a row's draw never depends on which other rows share its batch.
    for b in rest:
        p = plist[b]
        if b in top:
            vals, ids = top[b]
        else:
            row = logits[b] / p.temperature
            if p.top_p >= 1:
                out[b] = _draw(torch.softmax(row, dim=-1), gens[b])  # nothing to cut: no sort
                continue
            vals, ids = torch.sort(row, descending=True)
        # in sorted order the top-k cut is a prefix, and so is the nucleus
        probs = torch.softmax(vals, dim=-1)
        if p.top_p < 1:
            # drop a token when the tokens ranked above it already reach top_p (the first always stays)
            before = torch.cumsum(probs, dim=-1) - probs
            probs = probs.masked_fill(before >= p.top_p, 0.0)
        out[b] = ids[_draw(probs, gens[b])]
    return out


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index drawn with probability proportional to ``probs`` (1-D, unnormalised is fine).

    Inverse-CDF sampling: one uniform number and a binary search. torch.multinomial
    does the same job but costs ~20 ms over GPT-2's 50257 entries on a small CPU.
    """
    cdf = torch.cumsum(probs, dim=0)
    u = torch.rand(1, generator=generator, device=probs.device, dtype=cdf.dtype) * cdf[-1]
    # right=True skips zero-probability entries: the first cdf value strictly above u
    return torch.searchsorted(cdf, u, right=True).clamp_(max=probs.numel() - 1)[0]
