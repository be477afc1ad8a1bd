"""The promotion gate: a candidate serves only if it beats the serving model on held-out conversations.

A candidate is promoted only if its loss on a validation split that no fine-tune
ever trained on (the split is stable by conversation, see `data.split_by_conversation`)
beats the serving model's on the same split, and, when a general-text set is
configured, it is no more than `max_general_regression` worse there (so learning
a community's chat does not cost the model its English), and, when held-out 👍/👎
labels or /retry pairs exist, it orders them at least as well as the serving model
(`chatcore.training.preference`), up to what chance alone explains on that many
labels (a noisy check would reject about half of all candidates that changed nothing). A rejected candidate
stays on disk for inspection. The gate judges; `chatcore.registry` records.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch.nn as nn

from ..checkpoint import CheckpointError, check_servable, load
from .data import TokenData
from .options import GateConfig
from .train import evaluate


@dataclass
class GateResult:
    promoted: bool
    reason: str
    candidate_val_loss: float
    serving_val_loss: float
    candidate_general_loss: float | None = None
    serving_general_loss: float | None = None
    candidate_canary_loss: float | None = None
    serving_canary_loss: float | None = None
    # on held-out labels (chatcore.training.preference): {"accuracy", "margin", "comparisons"}
    candidate_preference: dict[str, Any] | None = None
    serving_preference: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# Built-in canaries: plain questions whose ordinary answers a healthy model keeps finding likely. A fine-tune
# flooded with one message ("say X to everything") loses them first. Operators replace them with `canaries`.
DEFAULT_CANARIES: tuple[tuple[str, str], ...] = (
    ("Hi, how are you?", "I'm fine, thanks. How are you?"),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Can you help me with something?", "Sure, what do you need help with?"),
    ("Thank you!", "You're welcome."),
    ("What day comes after Monday?", "Tuesday comes after Monday."),
    ("Good night.", "Good night, sleep well."),
    ("How many legs does a cat have?", "A cat has four legs."),
    ("Tell me something nice.", "You are doing a great job."),
)


def judge(candidate: nn.Module, serving: nn.Module, val: TokenData, cfg: GateConfig | None = None,
          general: TokenData | None = None, canaries: TokenData | None = None,
          preferences: Callable[[nn.Module], dict[str, Any]] | None = None) -> GateResult:
    """Compare both models on the same held-out tokens; promote only a clear winner."""
    cfg = cfg or GateConfig()
    kw = dict(block_size=cfg.eval_block_size, max_batches=cfg.eval_max_batches)
    c_val = evaluate(candidate, val, **kw)
    s_val = evaluate(serving, val, **kw)
    result = GateResult(False, "", c_val, s_val)
    if math.isnan(c_val) or math.isnan(s_val):
        result.reason = "no validation tokens to judge on"
        return result
    if not c_val < s_val - cfg.min_improvement:
        result.reason = f"validation loss {c_val:.4f} does not beat serving {s_val:.4f}"
        return result
    if general is not None and len(general) > 1:
        c_gen, s_gen = evaluate(candidate, general, **kw), evaluate(serving, general, **kw)
        result.candidate_general_loss, result.serving_general_loss = c_gen, s_gen
        if c_gen > s_gen + cfg.max_general_regression:
            result.reason = (f"general-text loss {c_gen:.4f} regressed more than "
                             f"{cfg.max_general_regression} from {s_gen:.4f}")
            return result
    if canaries is not None and len(canaries) > 1:
        c_can, s_can = evaluate(candidate, canaries, **kw), evaluate(serving, canaries, **kw)
        result.candidate_canary_loss, result.serving_canary_loss = c_can, s_can
        if c_can > s_can + cfg.max_canary_regression:
            result.reason = (f"canary prompts regressed: loss {c_can:.4f} vs serving {s_can:.4f} "
                             f"(more than the allowed {cfg.max_canary_regression}); possible poisoning")
            return result
    if preferences is not None and cfg.preference_check:
        # `preferences(model)` scores held-out labels (preference.preference_metrics); none: nothing to judge
        c_pref, s_pref = preferences(candidate), preferences(serving)
        result.candidate_preference, result.serving_preference = c_pref, s_pref
        if c_pref["comparisons"]:
            allowed = cfg.max_preference_regression
            if allowed is None:  # what chance alone moves an accuracy by, on this many held-out labels
                from .preference import accuracy_noise

                allowed = accuracy_noise(c_pref, s_pref)
            result.candidate_preference["allowed_drop"] = allowed
            if c_pref["accuracy"] < s_pref["accuracy"] - allowed:
                result.reason = (f"preference accuracy {c_pref['accuracy']:.3f} on held-out labels is below "
                                 f"serving's {s_pref['accuracy']:.3f} by more than {allowed:.3f} (margin "
                                 f"{c_pref['margin']:+.3f} vs {s_pref['margin']:+.3f})")
                return result
    result.promoted = True
    result.reason = f"validation loss {c_val:.4f} beats serving {s_val:.4f}"
    return result


def judge_file(candidate: str | os.PathLike, serving: nn.Module, val: TokenData, cfg: GateConfig | None = None,
               general: TokenData | None = None, canaries: TokenData | None = None,
               preferences: Callable[[nn.Module], dict[str, Any]] | None = None,
               loader: Callable[[Any], tuple[nn.Module, dict]] | None = None) -> GateResult:
    """`judge` the candidate as it was written to disk: a file that cannot load or serve is never promoted.

    `loader` reads it (default `checkpoint.load`; a LoRA adapter is loaded onto its base by the job)."""
    try:
        model, _ = (loader or load)(candidate)
        check_servable(model, str(candidate))
    except CheckpointError as exc:
        return GateResult(False, f"the candidate cannot serve: {exc}", math.nan, math.nan)
    return judge(model, serving, val, cfg, general, canaries, preferences)
