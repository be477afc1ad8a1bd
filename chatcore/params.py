"""Sampler settings: how to pick each next token and when to stop (torch-free, so adapters can build them)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop. Defaults are the seed's."""

    temperature: float = 0.8  # 0 means greedy
    top_k: int | None = 200  # None or >= vocab size: no top-k cut
    top_p: float = 1.0  # 1.0: no nucleus cut
    repetition_penalty: float = 1.0  # 1.0: off; applied to reply tokens only, turn markers exempt
    max_new_tokens: int = 150
    stop_at_newline: bool = True
    stop: tuple[str, ...] = field(default_factory=tuple)  # matched on decoded text
    seed: int | None = None  # per-request seed for reproducible sampling

    def updated(self, **changes) -> "SamplingParams":
        known = {f.name for f in fields(self)}
        return replace(self, **{k: v for k, v in changes.items() if k in known and v is not None})


def validate(params: SamplingParams) -> SamplingParams:
    """Raise ValueError naming the bad setting; return ``params`` unchanged otherwise."""
    for name in ("temperature", "top_p", "repetition_penalty"):
        if isinstance(getattr(params, name), bool) or not isinstance(getattr(params, name), (int, float)):
            raise ValueError(f"{name} must be a number, got {getattr(params, name)!r}")
    if params.top_k is not None and not _is_int(params.top_k):
        raise ValueError(f"top_k must be an integer or None, got {params.top_k!r}")
    if not _is_int(params.max_new_tokens):
        raise ValueError(f"max_new_tokens must be an integer, got {params.max_new_tokens!r}")
    if not params.temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {params.temperature}")
    if params.top_k is not None and params.top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {params.top_k}")
    if not 0 < params.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {params.top_p}")
    if not params.repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0 (1.0 is off), got {params.repetition_penalty}")
    if params.max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {params.max_new_tokens}")
    if isinstance(params.stop, str) or not all(isinstance(s, str) for s in params.stop):
        raise ValueError(f"stop must be a sequence of strings, got {params.stop!r}")
    if params.seed is not None and (not _is_int(params.seed) or not SEED_MIN <= params.seed <= SEED_MAX):
        raise ValueError(f"seed must be an integer from {SEED_MIN} to {SEED_MAX}, got {params.seed!r}")
    return params


SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
