"""Learning from 👍/👎 and /retry: preference data, KTO and DPO in plain PyTorch, and preference metrics.

Data. A vote (👍/👎 reaction, /good, /bad, POST /feedback) on a stored reply is a
labelled example: the prompt as it was sent (the conversation's earlier turns, as
the bot rendered them, then the message), the reply, +1/-1, who voted and when.
Two replies to one prompt linked by /retry become a pair (chosen, rejected) once a
user rates one of them or keeps the second (`Store.preference_pairs`). Only
exchanges that the supervised guards would let train count (forgotten, opted-out
and, with consent rules, non-consenting users' rows never do), and opted-out
voters' votes count for nothing. Labels are split by conversation with the same
seed as the supervised data, so the gate's held-out labels are never trained on.

Training (after the supervised fine-tune, on the same model): KTO (Ethayarajh et
al., 2024) for unpaired labels and DPO (Rafailov et al., 2023) for pairs, against
a frozen reference: the model as the preference stage found it (the supervised
result), so what the stage may change is measured from what it was given. The
log-ratios are summed over a reply's tokens, or with `per_token` averaged over them
(the metric's scale). The
drift cap: every `eval_interval` steps the mean per-token KL(policy || reference)
over the training replies is measured; past `max_kl` the stage goes back to the
last state under the cap and stops.

Metric (used by the gate and benchmarks/learning.py): a reply's score is its mean
log-probability per token given the prompt (length-normalised, so a short reply
does not win for being short). Accuracy is the share of comparisons the model
orders right (ties count half): each pair once, and every 👍 example against
every 👎 example; margin is the mean score difference (nats per token).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.nn import functional as F

from ..prompt import TURN_SEPARATOR, clean, render_exchange, render_prompt
from .data import TokenizerLike, apply_guards, from_store, split_by_conversation
from .options import GuardConfig, PreferenceConfig
from .train import hidden_states, set_dropout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Labelled:
    """One vote as a training label."""

    prompt: str  # as rendered for the model, ending in "Assistant:"
    reply: str
    label: int  # +1 good, -1 bad
    conversation: str  # split key, as in `data.from_store`
    user: str | None = None  # who voted
    at: float | None = None
    exchange_id: int | None = None


@dataclass(frozen=True)
class Pair:
    """Two replies to one prompt; a user preferred `chosen`."""

    prompt: str
    chosen: str
    rejected: str
    conversation: str
    user: str | None = None
    at: float | None = None
    how: str = "rated"  # "rated" or "kept"


@dataclass
class Preferences:
    labelled: list[Labelled] = field(default_factory=list)
    pairs: list[Pair] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labelled) + len(self.pairs)

    def split(self, val_fraction: float, seed: int) -> tuple["Preferences", "Preferences"]:
        """By conversation, exactly like `data.split_by_conversation` splits the supervised data."""
        train_l, val_l = split_by_conversation(self.labelled, val_fraction, seed)
        train_p, val_p = split_by_conversation(self.pairs, val_fraction, seed)
        return Preferences(train_l, train_p), Preferences(val_l, val_p)

    def summary(self) -> dict[str, int]:
        return {"good": sum(e.label > 0 for e in self.labelled), "bad": sum(e.label < 0 for e in self.labelled),
                "pairs": len(self.pairs)}


# --- sources ------------------------------------------------------------------------


def prompt_for(store: Any, exchange: Any, history_turns: int = 20) -> str:
    """The prompt a stored reply answered: earlier turns of its conversation, then the message."""
    turns = store.context_before(exchange.id, limit=history_turns)
    return "".join(render_exchange(u, a) for u, a in turns) + render_prompt(exchange.user_text)


def from_store_preferences(store: Any, guards: GuardConfig | None = None) -> Preferences:
    """Votes and /retry pairs on exchanges the supervised guards allow to train on."""
    guards = guards or GuardConfig()
    # Consent, forgotten and excluded users, like the supervised data; a 👎 is a label here, not a reason to drop.
    allowed, _ = apply_guards(from_store(store), _relaxed(guards))
    by_id = {ex.id: ex for ex in allowed if ex.id is not None}
    prompts: dict[int, str] = {}

    def prompt(exchange_id: int) -> str:
        if exchange_id not in prompts:
            prompts[exchange_id] = prompt_for(store, store.get_exchange(exchange_id))
        return prompts[exchange_id]

    out = Preferences()
    for v in store.votes():
        ex = by_id.get(v["exchange_id"])
        if ex is not None:
            out.labelled.append(Labelled(prompt(ex.id), ex.assistant, 1 if v["value"] > 0 else -1, ex.conversation,
                                         v["user_key"], v["at"], ex.id))
    for p in store.preference_pairs():
        chosen, rejected = by_id.get(p["chosen_id"]), by_id.get(p["rejected_id"])
        if chosen is not None and rejected is not None:
            # Both answered the same message after the same turns; the original's prompt is the one sent.
            first = min(chosen.id, rejected.id)
            out.pairs.append(Pair(prompt(first), chosen.assistant, rejected.assistant, chosen.conversation,
                                  p["user_key"], p["at"], p["how"]))
    return out


def _relaxed(guards: GuardConfig) -> GuardConfig:
    d = asdict(guards)
    d.update(drop_bad=False, drop_exact_duplicates=False, drop_near_duplicates=False, max_user_share=None)
    return GuardConfig(**d)


def load_preference_jsonl(path: str | Path) -> Preferences:
    """Labels from a file: ``{"user", "assistant", "label": 1|-1}`` or ``{"user", "chosen", "rejected"}`` a line.

    ``user`` is the message (rendered as a one-turn prompt); ``conversation`` keys the split.
    """
    path = Path(path)
    out = Preferences()
    with path.open(encoding="utf-8") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            obj = json.loads(raw)
            conv = str(obj.get("conversation", f"{path.name}:{n}"))
            prompt = render_prompt(obj["user"])
            if "chosen" in obj:
                out.pairs.append(Pair(prompt, obj["chosen"], obj["rejected"], conv))
            elif obj.get("label") in (1, -1):
                out.labelled.append(Labelled(prompt, obj["assistant"], obj["label"], conv))
            else:
                raise ValueError(f'{path}:{n}: needs "label": 1 or -1, or "chosen" and "rejected"')
    return out


# --- scoring ------------------------------------------------------------------------


def encode(tok: TokenizerLike, prompt: str, reply: str, block: int) -> tuple[list[int], int]:
    """Token ids of prompt + reply as trained on, and where the reply starts; the prompt's start is cut to fit."""
    p = tok.encode(prompt)
    r = tok.encode(f" {clean(reply)}{TURN_SEPARATOR}")[: block // 2 + 1]
    keep = max(1, block + 1 - len(r))  # ids[:-1] are inputs: block + 1 ids fill one window
    p = p[-keep:]
    return p + r, len(p)


def _batch(items: Sequence[tuple[list[int], int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs, targets and a mask of the reply targets, right-padded."""
    width = max(len(ids) for ids, _ in items) - 1
    x = torch.zeros(len(items), width, dtype=torch.long)
    y = torch.zeros(len(items), width, dtype=torch.long)
    m = torch.zeros(len(items), width, dtype=torch.bool)
    for i, (ids, start) in enumerate(items):
        t = torch.tensor(ids)
        x[i, : len(ids) - 1] = t[:-1]
        y[i, : len(ids) - 1] = t[1:]
        m[i, start - 1: len(ids) - 1] = True
    return x, y, m


def token_logps(model: nn.Module, items: Sequence[tuple[list[int], int]]) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Per sequence: summed reply-token log-probability and reply token count; and the log-softmax at reply positions.

    The output head runs on reply positions only (the prompt's positions are never scored).
    """
    x, y, m = _batch(items)
    h = hidden_states(model, x)[m]  # [reply positions, n_embd], row-major: sequence by sequence
    logp = F.log_softmax(model.lm_head(h).float(), dim=-1)
    tok = logp.gather(-1, y[m].unsqueeze(-1)).squeeze(-1)
    row = torch.arange(len(items)).unsqueeze(1).expand_as(m)[m]
    return torch.zeros(len(items)).index_add(0, row, tok), m.sum(1), logp


@torch.no_grad()
def scores(model: nn.Module, tok: TokenizerLike, items: Sequence[tuple[str, str]], block: int = 128,
           batch_size: int = 8) -> list[float]:
    """Mean log-probability per reply token of each (prompt, reply)."""
    was = model.training
    model.eval()
    enc = [encode(tok, p, r, min(block, model.config.block_size)) for p, r in items]
    out: list[float] = []
    for i in range(0, len(enc), batch_size):
        s, n, _ = token_logps(model, enc[i:i + batch_size])
        out += (s / n.clamp(min=1)).tolist()
    model.train(was)
    return out


def preference_metrics(model: nn.Module, tok: TokenizerLike, prefs: Preferences, block: int = 128) -> dict[str, Any]:
    """Accuracy (share of comparisons ordered right), mean margin (nats/token) and the number of comparisons."""
    items = [(e.prompt, e.reply) for e in prefs.labelled]
    items += [(p.prompt, p.chosen) for p in prefs.pairs] + [(p.prompt, p.rejected) for p in prefs.pairs]
    s = scores(model, tok, items, block) if items else []
    n = len(prefs.labelled)
    good = [s[i] for i, e in enumerate(prefs.labelled) if e.label > 0]
    bad = [s[i] for i, e in enumerate(prefs.labelled) if e.label < 0]
    diffs = [g - b for g in good for b in bad]
    diffs += [s[n + i] - s[n + len(prefs.pairs) + i] for i in range(len(prefs.pairs))]
    if not diffs:
        return {"accuracy": None, "margin": None, "comparisons": 0, "samples": 0}
    right = sum(1.0 if d > 0 else 0.5 if d == 0 else 0.0 for d in diffs)
    # every 👍 is compared with every 👎, so comparisons are not independent: the accuracy is known about
    # as well as from min(👍, 👎) independent ones, plus one per pair
    samples = len(prefs.pairs) + min(len(good), len(bad))
    return {"accuracy": right / len(diffs), "margin": sum(diffs) / len(diffs), "comparisons": len(diffs),
            "samples": samples}


def accuracy_noise(candidate: dict[str, Any], serving: dict[str, Any], z: float = 1.645) -> float:
    """How far two preference accuracies on the same held-out labels may differ by chance alone:
    `z` standard errors of the difference of two proportions (1.645: one-sided 95%), at their mean accuracy."""
    n = serving.get("samples") or candidate.get("samples") or 0
    if n <= 0:
        return 0.0
    p = (candidate["accuracy"] + serving["accuracy"]) / 2
    return z * math.sqrt(2 * p * (1 - p) / n)


# --- losses -------------------------------------------------------------------------


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """DPO: -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), averaged; inputs are summed log-probs."""
    return -F.logsigmoid(beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))).mean()


def kto_loss(policy: torch.Tensor, ref: torch.Tensor, labels: torch.Tensor, kl: torch.Tensor | float,
             beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    """KTO: lambda_D (1 - sigma(beta (r - z0))) for 👍, lambda_U (1 - sigma(beta (z0 - r))) for 👎, averaged.

    r = policy - ref (summed log-probs); z0 = the reference point, max(0, KL estimate), not differentiated.
    """
    z0 = torch.as_tensor(kl, dtype=policy.dtype).detach().clamp(min=0)
    r = policy - ref
    good = labels > 0
    loss = torch.where(good, desirable_weight * (1 - torch.sigmoid(beta * (r - z0))),
                       undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r))))
    return loss.mean()


def chosen_nll(logp: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood per token of the preferred replies (summed log-probs and token counts).

    Added to DPO/KTO with `sft_weight` (as RPO does): the preference losses alone can lower the
    likelihood of both replies, the preferred one too, and the model forgets how to talk."""
    return -logp.sum() / count.sum().clamp(min=1)


# --- the stage ----------------------------------------------------------------------


@dataclass
class PreferenceOutcome:
    steps: int
    stopped: str  # "max_steps", "drift_cap" or "too_few_labels"
    kl: float  # mean per-token KL to the reference at the kept state
    seconds: float
    labels: dict[str, int]
    history: list[dict[str, float]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def mean_kl(model: nn.Module, reference: nn.Module, items: Sequence[tuple[list[int], int]], batch: int = 8) -> float:
    """Mean over reply positions of KL(model || reference), in nats per token."""
    total, count = 0.0, 0
    for i in range(0, len(items), batch):
        _, _, lp = token_logps(model, items[i:i + batch])
        _, _, lq = token_logps(reference, items[i:i + batch])
        total += float((lp.exp() * (lp - lq)).sum())
        count += lp.size(0)
    return total / count if count else 0.0


def train_preferences(model: nn.Module, tok: TokenizerLike, prefs: Preferences, cfg: PreferenceConfig, *,
                      reference: nn.Module | None = None,
                      should_stop: Callable[[], bool] | None = None) -> PreferenceOutcome:
    """KTO on the labelled examples plus DPO on the pairs, in place; `reference` defaults to a frozen copy of `model`."""
    t0 = time.perf_counter()
    if len(prefs) < cfg.min_labels:
        return PreferenceOutcome(0, "too_few_labels", 0.0, 0.0, prefs.summary())
    block = min(cfg.block_size, model.config.block_size)
    reference = copy.deepcopy(model) if reference is None else reference
    reference.eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    singles = [(encode(tok, e.prompt, e.reply, block), e.label) for e in prefs.labelled]
    pairs = [(encode(tok, p.prompt, p.chosen, block), encode(tok, p.prompt, p.rejected, block)) for p in prefs.pairs]
    # Mismatched completions for KTO's KL estimate: prompt i with the reply of example i + 1.
    mismatched = [encode(tok, e.prompt, prefs.labelled[(i + 1) % len(prefs.labelled)].reply, block)
                  for i, e in enumerate(prefs.labelled)]
    drift_items = [s for s, _ in singles][:32] + [c for c, _ in pairs][: max(0, 32 - len(singles))]

    def per(logp: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """Summed log-probabilities as the losses see them: per reply token with `per_token`."""
        return logp / count.clamp(min=1) if cfg.per_token else logp

    set_dropout(model, 0.0)  # the log-ratios must compare like with like
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    kept_state = copy.deepcopy(model.state_dict())
    kept_kl, stopped, step = 0.0, "max_steps", 0
    history: list[dict[str, float]] = []
    for step in range(1, cfg.max_steps + 1):
        if should_stop is not None and should_stop():
            from .train import Cancelled

            raise Cancelled(f"cancelled at preference step {step}")
        loss = torch.zeros(())
        if singles:
            ix = torch.randint(len(singles), (min(cfg.batch_size, len(singles)),), generator=gen).tolist()
            items = [singles[i][0] for i in ix]
            labels = torch.tensor([singles[i][1] for i in ix])
            pol, count, _ = token_logps(model, items)
            with torch.no_grad():
                ref, _, _ = token_logps(reference, items)
                mis = [mismatched[i] for i in ix]
                pol_mis, count_mis, _ = token_logps(model, mis)
                kl = (per(pol_mis, count_mis) - per(token_logps(reference, mis)[0], count_mis)).mean()
            loss = loss + kto_loss(per(pol, count), per(ref, count), labels, kl, cfg.beta, cfg.desirable_weight,
                                   cfg.undesirable_weight)
            if cfg.sft_weight and bool((labels > 0).any()):
                loss = loss + cfg.sft_weight * chosen_nll(pol[labels > 0], count[labels > 0])
        if pairs:
            ix = torch.randint(len(pairs), (min(cfg.batch_size, len(pairs)),), generator=gen).tolist()
            items = [pairs[i][0] for i in ix] + [pairs[i][1] for i in ix]
            pol, count, _ = token_logps(model, items)
            with torch.no_grad():
                ref, _, _ = token_logps(reference, items)
            k = len(ix)
            pol_n, ref_n = per(pol, count), per(ref, count)
            loss = loss + dpo_loss(pol_n[:k], pol_n[k:], ref_n[:k], ref_n[k:], cfg.beta)
            if cfg.sft_weight:
                loss = loss + cfg.sft_weight * chosen_nll(pol[:k], count[:k])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        if step % cfg.eval_interval == 0 or step == cfg.max_steps:
            drift = mean_kl(model, reference, drift_items)
            history.append({"step": step, "loss": loss.item(), "kl": drift})
            log.info("preference step %d: loss %.4f, KL to reference %.4f", step, loss.item(), drift)
            if drift > cfg.max_kl:
                model.load_state_dict(kept_state)
                stopped = "drift_cap"
                break
            kept_state, kept_kl = copy.deepcopy(model.state_dict()), drift
    model.eval()
    return PreferenceOutcome(step, stopped, kept_kl, time.perf_counter() - t0, prefs.summary(), history)
