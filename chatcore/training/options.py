"""The learning loop's options (``plugins.auto_finetune.training``, ``.guards``, ``.gate``, ``.preference``).

Torch-free, so validating a config (`chatcore config check`) never loads torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any


RECIPE_WIDTH = 96  # n_embd of the offline starter, on which the default learning rate was measured


@dataclass
class TrainConfig:
    # The default recipe, measured with benchmarks/learning.py on the offline starter model
    # (a few hundred exchanges; the runs table is in its docstring): a higher peak than the
    # seed's 3e-4 with a short warm-up, the loss on the whole text, replayed general text.
    # Unset, the peak is 1e-3 on a model as wide as the starter and shrinks as 1/width on
    # wider ones (`for_width`: Adam moves every weight by about lr, so a layer's output moves
    # with its fan-in; muP's rule): 1.25e-4 on GPT-2 small, a usual rate for fine-tuning it.
    learning_rate: float | None = None
    min_lr: float | None = None  # cosine floor; unset: 10% of the peak
    batch_size: int = 2
    block_size: int = 128
    max_iters: int = 400
    warmup_iters: int = 20
    dropout: float = 0.1
    eval_interval: int = 50
    eval_max_batches: int | None = None  # None: the whole validation split
    patience: int = 3  # evaluations without an improvement of at least min_delta
    min_delta: float = 0.001
    grad_clip: float = 1.0  # 0: off
    weight_decay: float = 0.01  # torch's AdamW default, as the seed used
    beta1: float = 0.9
    beta2: float = 0.999
    seed: int = 1337
    loss_on: str = "all"  # or "assistant" (reply tokens only); validation is always on replies
    fused: bool | None = None  # None: fused AdamW where this torch has it
    head_on_targets_only: bool = True  # skip the output head where nothing is trained on
    # Wall-clock budget in seconds (None: none). Training, evaluations included, stops
    # within it whatever the machine's load, and the cosine runs over the budget's time
    # instead of over max_iters (which then only caps the iterations).
    max_seconds: float | None = None
    # Replay: general chit-chat exchanges (`replay_source`, a seed-format JSONL; None: the starter
    # corpus) mixed into the training side only, as a multiple of the training exchanges. It
    # guards against forgetting and, on a small base, is extra text to learn from (benchmarks/learning.py).
    replay: float = 2.0
    replay_source: str | None = None
    method: str = "full"  # or "lora": train a low-rank adapter (chatcore.lora), the base stays frozen
    lora: dict[str, Any] = field(default_factory=dict)  # rank, alpha, dropout, targets, layers (chatcore.lora.LoRAConfig)
    # Processes training together under torchrun with DistributedDataParallel (chatcore.training.distributed):
    # each takes its rows of the same global batch_size, so the other options mean the same at any count.
    nproc: int = 1

    def for_width(self, n_embd: int) -> "TrainConfig":
        """These options with the unset learning rates filled in for a model `n_embd` wide."""
        lr = self.learning_rate if self.learning_rate is not None else 1e-3 * min(1.0, RECIPE_WIDTH / n_embd)
        return replace(self, learning_rate=lr, min_lr=self.min_lr if self.min_lr is not None else lr / 10)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "TrainConfig":
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown training option(s): {', '.join(sorted(unknown))}")
        cfg = cls(**{k: v for k, v in d.items() if v is not None or k in ("fused", "eval_max_batches")})
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.loss_on not in ("assistant", "all"):
            raise ValueError(f'training.loss_on must be "assistant" or "all", not {self.loss_on!r}')
        if self.method not in ("full", "lora"):
            raise ValueError(f'training.method must be "full" or "lora", not {self.method!r}')
        if not isinstance(self.lora, dict):
            raise ValueError("training.lora must be a mapping (rank, alpha, dropout, targets, layers)")
        for name in ("batch_size", "block_size", "max_iters", "eval_interval", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"training.{name} must be at least 1")
        if self.learning_rate is not None and self.learning_rate <= 0:
            raise ValueError("training.learning_rate must be positive")
        if self.min_lr is not None and not 0 <= self.min_lr <= (self.learning_rate or self.min_lr):
            raise ValueError("training.min_lr must lie between 0 and learning_rate")
        if not 0 <= self.dropout < 1:
            raise ValueError("training.dropout must lie in [0, 1)")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise ValueError("training.max_seconds must be positive")
        if self.replay < 0:
            raise ValueError("training.replay must be 0 or more (a multiple of the training exchanges)")
        if not isinstance(self.nproc, int) or self.nproc < 1:
            raise ValueError("training.nproc must be a whole number of at least 1")
        if self.nproc > self.batch_size:
            raise ValueError(f"training.nproc ({self.nproc}) may not exceed training.batch_size ({self.batch_size}): "
                             "each process trains on its rows of one global batch")


@dataclass
class GuardConfig:
    """Each guard can be switched off; forgotten/opted-out users are excluded always."""

    drop_exact_duplicates: bool = True
    drop_near_duplicates: bool = True  # same text after case, punctuation and whitespace folding
    min_user_chars: int = 1
    min_assistant_chars: int = 2
    max_user_share: float | None = 0.5  # of the kept exchanges, when at least two users contributed
    drop_bad: bool = True
    excluded_users: frozenset[str] = field(default_factory=frozenset)  # forgotten / opted out
    # Poisoning and brigading defences (docs/privacy.md):
    max_per_user_per_day: int | None = 50  # trainable exchanges one user adds per UTC day; the rest wait out
    quarantine_days: float = 0.0  # users first seen less than this long ago do not train yet
    brigade_min_users: int | None = 3  # this many users sending near-identical text: it counts once

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "GuardConfig":
        d = dict(d or {})
        if "excluded_users" in d:
            d["excluded_users"] = frozenset(d["excluded_users"])
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown guard option(s): {', '.join(sorted(unknown))}")
        return cls(**d)


@dataclass
class GateConfig:
    min_improvement: float = 0.0  # the candidate must beat serving by more than this
    general_text: str | None = None  # JSONL exchanges or plain text; None: no general check
    max_general_regression: float = 0.05  # allowed loss increase on the general text
    keep: int = 3  # promoted checkpoints kept (the serving one always is)
    keep_rejected: int = 3
    eval_block_size: int = 128
    eval_max_batches: int | None = None
    canary_check: bool = True  # judge the canary prompts (a poisoned candidate forgets how to answer them)
    canaries: str | None = None  # operator's canary file (seed-format JSONL); None: the built-in set
    max_canary_regression: float = 0.25  # allowed reply-token loss increase on the canaries
    preference_check: bool = True  # held-out 👍/👎 and pairs: the candidate must order them at least as well
    # allowed drop in preference accuracy; None: 1.645 standard errors of the difference on the held-out
    # labels (about 9 points on 170 of them), since with the old 0 half of all unchanged candidates failed
    max_preference_regression: float | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "GateConfig":
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown gate option(s): {', '.join(sorted(unknown))}")
        return cls(**d)


@dataclass
class PreferenceConfig:
    """``plugins.auto_finetune.preference``: off by default, and off until `min_labels` training labels exist."""

    enabled: bool = False
    min_labels: int = 100  # labels (votes + pairs) in the training split before the stage runs
    # Defaults measured with benchmarks/learning.py (the runs table is in its docstring): DPO on
    # ~1,200 synthetic pairs from the starter. Per-token log-ratios beat summed ones at equal
    # steps (0.529 vs 0.503 preference accuracy at 100 steps), with beta scaled up to match
    # (per token, beta 0.1 would never saturate). At lr 5e-4 accuracy peaks near 100 steps
    # and then wanders while general text degrades (+11% by 300 steps); sft_weight 0.3 keeps
    # general text lower (+3.9% every token, where 0.1 gives +4.9%) for +3.7 points instead of
    # +4.9; the gate's general check still rejected both jobs on the starter (+5.1%, +5.5% on
    # its reply-token measure). The best trade measured, not a gain the gate passes: no setting
    # reached +10 points (the table says why). The drift cap does not bind at these settings
    # (KL 0.3-0.6): it stops a runaway, not the usual run.
    beta: float = 2.0  # KTO/DPO temperature on the log-ratio to the reference
    learning_rate: float = 5e-4
    max_steps: int = 100
    batch_size: int = 8
    max_kl: float = 1.0  # drift cap: mean per-token KL(policy || reference), nats
    eval_interval: int = 10  # steps between drift checks
    desirable_weight: float = 1.0  # KTO's lambda_D
    undesirable_weight: float = 1.0  # KTO's lambda_U
    sft_weight: float = 0.3  # weight of the preferred replies' own NLL per token (RPO-style), against forgetting
    # Log-ratios to the reference per reply token (as the metric and the gate score replies) rather
    # than summed over the reply: summed, a long reply's ratio outweighs a short one's, and the
    # stage can win pairs by what the per-token score does not see. Per token, ratios are ~1/length
    # as large, so `beta` wants to be larger (SimPO's range: 1-10).
    per_token: bool = True
    block_size: int = 128
    grad_clip: float = 1.0
    seed: int = 1337

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "PreferenceConfig":
        d = {k: v for k, v in dict(d or {}).items() if v is not None}
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown preference option(s): {', '.join(sorted(unknown))}")
        cfg = cls(**d)
        if cfg.beta <= 0 or cfg.learning_rate <= 0 or cfg.max_kl <= 0:
            raise ValueError("preference.beta, learning_rate and max_kl must be positive")
        if min(cfg.max_steps, cfg.batch_size, cfg.eval_interval, cfg.block_size) < 1:
            raise ValueError("preference.max_steps, batch_size, eval_interval and block_size must be at least 1")
        return cfg
