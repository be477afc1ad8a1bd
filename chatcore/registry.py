"""Which promoted checkpoint serves, and the promotion history (``<models>/registry.json``).

Checkpoints are native ``finetuned_YYYYMMDD_HHMMSS.safetensors`` files with
their JSON sidecars. The registry keeps the last `keep` promoted checkpoints
(and the last `keep_rejected` rejected ones) and deletes older ones; `rollback`
returns to the previous promotion, or to the configured base model. Writes are
atomic (temp file + rename) and serialised by a file lock, so the bot and the
``chatcore model`` commands never see half a registry. The gate
(`chatcore.training.gate`) judges; this module only records. It imports nothing
from chatcore, so anything may ask it which checkpoint serves.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CANDIDATE_PREFIX = "finetuned_"


class RegistryError(RuntimeError):
    """registry.json cannot be read or is not a registry; the message says which file and how to fix it."""


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
            raise RegistryError(f"{self.path} is unreadable ({exc}); fix or remove it") from exc
        if not isinstance(data, dict):
            raise RegistryError(f"{self.path} is not a registry (a JSON {type(data).__name__}, "
                                "expected an object); fix or remove it")
        data.setdefault("serving", None)
        data.setdefault("promoted", [])
        data.setdefault("rejected", [])
        if data["serving"] is not None and not isinstance(data["serving"], str):
            raise RegistryError(f"{self.path}: \"serving\" must be a file name or null; fix or remove it")
        for key in ("promoted", "rejected"):
            entries = data[key]
            if not isinstance(entries, list) or not all(
                    isinstance(e, dict) and isinstance(e.get("name"), str) for e in entries):
                raise RegistryError(f"{self.path}: \"{key}\" must be a list of {{\"name\": ...}} entries; "
                                    "fix or remove it")
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

    def rollback(self, check: Callable[[Path | None], Any] | None = None) -> Path | None:
        """Serve the previous promoted checkpoint (None: back to the base model); LookupError when none serves.

        `check(target)` runs under the lock before anything changes; whatever it raises cancels the rollback.
        """
        with self._locked() as data:
            if not data["promoted"]:
                rolled_back = [e["name"] for e in data["rejected"] if "rolled_back_at" in e]
                if rolled_back:
                    raise LookupError(f"nothing to roll back: the configured base model already serves "
                                      f"({rolled_back[-1]} was rolled back)")
                raise LookupError("nothing to roll back: no fine-tuned model was ever promoted")
            gone = data["promoted"].pop()
            gone["rolled_back_at"] = time.time()
            data["rejected"].append(gone)
            # Skip promotions whose files were pruned or removed by hand.
            while data["promoted"] and not (self.dir / data["promoted"][-1]["name"]).is_file():
                data["promoted"].pop()
            data["serving"] = data["promoted"][-1]["name"] if data["promoted"] else None
            if check is not None:  # raising here leaves registry.json as it was
                check(self.dir / data["serving"] if data["serving"] else None)
            self._prune(data)
            serving = data["serving"]
        log.info("rolled back from %s to %s", gone["name"], serving or "the base model")
        return self.dir / serving if serving else None

    def delete(self, name: str) -> None:
        """Delete a kept checkpoint this loop wrote (with its sidecar) and its entries; never the serving one."""
        with self._locked() as data:
            if not name.startswith(CANDIDATE_PREFIX) or "/" in name or name == data["serving"]:
                raise ValueError(f"{name} is serving or not a fine-tune of this loop: not deleted")
            for key in ("promoted", "rejected"):
                data[key] = [e for e in data[key] if e["name"] != name]
            (self.dir / name).unlink(missing_ok=True)
            (self.dir / name).with_suffix(".json").unlink(missing_ok=True)
        log.info("deleted %s", name)

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
    """The promoted checkpoint to serve, or None to serve the configured model (a bad registry is logged)."""
    try:
        current = Registry(models_dir).current()
    except RegistryError as exc:
        log.warning("%s; serving the configured model", exc)
        return None
    return current if current is not None and current.is_file() else None
