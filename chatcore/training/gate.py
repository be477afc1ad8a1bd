"""The promotion gate, and the registry of which checkpoint serves.

A candidate is promoted only if its loss on a validation split that no fine-tune
ever trained on (the split is stable by conversation, see `data.split_by_conversation`)
beats the serving model's on the same split, and, when a general-text set is
configured, it is no more than `max_general_regression` worse there (so learning
a community's chat does not cost the model its English), and, when held-out 👍/👎
labels or /retry pairs exist, it orders them at least as well as the serving model
(`chatcore.training.preference`). A rejected candidate
stays on disk for inspection.

`Registry` keeps ``<models>/registry.json``: the serving checkpoint and the
history of promotions and rejections (checkpoints are native
``finetuned_YYYYMMDD_HHMMSS.safetensors`` files with their JSON sidecars). It keeps the last `keep` promoted
checkpoints (and the last `keep_rejected` rejected ones) and deletes older ones;
`rollback` returns to the previous promotion, or to the configured base model.
Writes are atomic (temp file + rename) and serialised by a file lock, so the bot
and the ``chatcore model rollback`` command never see half a registry.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch.nn as nn

from .data import TokenData
from .train import evaluate

log = logging.getLogger(__name__)

CANDIDATE_PREFIX = "finetuned_"


@dataclass
class GateConfig:
    min_improvement: float = 0.0  # the candidate must beat serving by more than this
    general_text: str | None = None  # JSONL exchanges or plain text; None: no general check
    max_general_regression: float = 0.05  # allowed loss increase on the general text
    keep: int = 3  # promoted checkpoints kept (the serving one always is)
    keep_rejected: int = 3
    eval_block_size: int = 128
    eval_max_batches: int | None = None
    preference_check: bool = True  # held-out 👍/👎 and pairs: the candidate must order them at least as well
    max_preference_regression: float = 0.0  # allowed drop in preference accuracy (0: at least as well)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "GateConfig":
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown gate option(s): {', '.join(sorted(unknown))}")
        return cls(**d)


@dataclass
class GateResult:
    promoted: bool
    reason: str
    candidate_val_loss: float
    serving_val_loss: float
    candidate_general_loss: float | None = None
    serving_general_loss: float | None = None
    # on held-out labels (chatcore.training.preference): {"accuracy", "margin", "comparisons"}
    candidate_preference: dict[str, Any] | None = None
    serving_preference: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def judge(candidate: nn.Module, serving: nn.Module, val: TokenData, cfg: GateConfig | None = None,
          general: TokenData | None = None, preferences: Callable[[nn.Module], dict[str, Any]] | None = None
          ) -> GateResult:
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
    if preferences is not None and cfg.preference_check:
        # `preferences(model)` scores held-out labels (preference.preference_metrics); none: nothing to judge
        c_pref, s_pref = preferences(candidate), preferences(serving)
        result.candidate_preference, result.serving_preference = c_pref, s_pref
        if c_pref["comparisons"] and c_pref["accuracy"] < s_pref["accuracy"] - cfg.max_preference_regression:
            result.reason = (f"preference accuracy {c_pref['accuracy']:.3f} on held-out labels is below serving's "
                             f"{s_pref['accuracy']:.3f} (margin {c_pref['margin']:+.3f} vs {s_pref['margin']:+.3f})")
            return result
    result.promoted = True
    result.reason = f"validation loss {c_val:.4f} beats serving {s_val:.4f}"
    return result


# --- registry ----------------------------------------------------------------------


class Registry:
    """Which checkpoint serves, and the promotion history, in ``<models_dir>/registry.json``."""

    def __init__(self, models_dir: str | os.PathLike, *, keep: int = 3, keep_rejected: int = 3) -> None:
        self.dir = Path(models_dir)
        self.path = self.dir / "registry.json"
        self.keep = max(1, keep)
        self.keep_rejected = max(0, keep_rejected)

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            data = {}
        except (OSError, ValueError) as exc:
            raise RuntimeError(f"{self.path} is unreadable ({exc}); fix or remove it") from exc
        data.setdefault("serving", None)
        data.setdefault("promoted", [])
        data.setdefault("rejected", [])
        return data

    def _write(self, data: dict[str, Any]) -> None:
        tmp = self.path.with_name(f".registry.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
        os.replace(tmp, self.path)

    @contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".registry.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                data = self._read()
                yield data
                self._write(data)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def current(self) -> Path | None:
        """The promoted checkpoint that serves, or None for the configured base model."""
        name = self._read()["serving"]
        return self.dir / name if name else None

    def history(self) -> dict[str, Any]:
        return self._read()

    def promote(self, checkpoint: str | os.PathLike, metrics: dict[str, Any] | None = None) -> Path:
        path = self._inside(checkpoint)
        with self._locked() as data:
            data["promoted"].append({"name": path.name, "at": time.time(), "metrics": metrics or {}})
            data["serving"] = path.name
            self._prune(data)
        log.info("promoted %s", path.name)
        return path

    def reject(self, checkpoint: str | os.PathLike, metrics: dict[str, Any] | None = None) -> None:
        path = self._inside(checkpoint)
        with self._locked() as data:
            data["rejected"].append({"name": path.name, "at": time.time(), "metrics": metrics or {}})
            self._prune(data)
        log.info("rejected %s (kept for inspection)", path.name)

    def rollback(self) -> Path | None:
        """Serve the previous promoted checkpoint (None: back to the base model)."""
        with self._locked() as data:
            if not data["promoted"]:
                raise LookupError("nothing to roll back: no fine-tuned model was ever promoted")
            gone = data["promoted"].pop()
            gone["rolled_back_at"] = time.time()
            data["rejected"].append(gone)
            # Skip promotions whose files were pruned or removed by hand.
            while data["promoted"] and not (self.dir / data["promoted"][-1]["name"]).is_file():
                data["promoted"].pop()
            data["serving"] = data["promoted"][-1]["name"] if data["promoted"] else None
            self._prune(data)
            serving = data["serving"]
        log.info("rolled back from %s to %s", gone["name"], serving or "the base model")
        return self.dir / serving if serving else None

    def _inside(self, checkpoint: str | os.PathLike) -> Path:
        path = Path(checkpoint).resolve()
        if path.parent != self.dir.resolve() or not path.is_file() or path.suffix != ".safetensors":
            raise ValueError(f"{checkpoint} is not a .safetensors checkpoint in {self.dir}")
        return path

    def _prune(self, data: dict[str, Any]) -> None:
        # Only checkpoints this loop wrote (finetuned_*) are ever deleted, with their sidecars.
        def remove(names: list[str]) -> None:
            for name in names:
                p = self.dir / name
                if name.startswith(CANDIDATE_PREFIX) and name != data["serving"]:
                    p.unlink(missing_ok=True)
                    p.with_suffix(".json").unlink(missing_ok=True)

        old = data["promoted"][:-self.keep]
        data["promoted"] = data["promoted"][-self.keep:]
        remove([e["name"] for e in old])
        cut = len(data["rejected"]) - self.keep_rejected
        if cut > 0:
            old_rejected, data["rejected"] = data["rejected"][:cut], data["rejected"][cut:]
            keep_names = {e["name"] for e in data["promoted"]}
            remove([e["name"] for e in old_rejected if e["name"] not in keep_names])


def serving_checkpoint(models_dir: str | os.PathLike) -> Path | None:
    """For `Engine.from_config`: the promoted checkpoint to serve, or None to use the configured one."""
    try:
        current = Registry(models_dir).current()
    except RuntimeError as exc:
        log.warning("%s; serving the configured model", exc)
        return None
    return current if current is not None and current.is_file() else None
