"""Sampler settings (and, with the engine, the sampling functions)."""

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
