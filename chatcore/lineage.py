"""Which users' data is inside which model: ``chatcore model lineage``.

Every fine-tune writes its lineage into the checkpoint's provenance (the
safetensors header and the JSON sidecar): a content-addressed manifest of the
exchange ids it trained on and the user keys they came from
(`chatcore.training.data.lineage_manifest`, merged with the parent's when it
started from a fine-tune). Here that is read back for the serving model and every
checkpoint still on disk, and compared with the users the store now excludes
(forgotten, opted out, /learn off): such a model still carries their data until
a fine-tune from the base without them replaces it. `check_serve` is the one
check before a kept checkpoint serves again (CLI rollback, dashboard rollback and
promote); `prune_forgotten` deletes the kept ones (``chatcore model prune-forgotten``).
"""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path
from typing import Any

from .registry import CANDIDATE_PREFIX, Registry

log = logging.getLogger("chatcore.lineage")


class HoldsForgottenData(Exception):
    """A kept checkpoint would serve again although it holds data of users since forgotten or opted out."""

    def __init__(self, message: str, users: int) -> None:
        super().__init__(message)
        self.users = users


def lineage_of(checkpoint: Path) -> dict[str, Any] | None:
    """The lineage recorded in a checkpoint, or None (not a fine-tune of this loop, or unreadable)."""
    from .checkpoint import CheckpointError, read_meta

    try:
        meta = read_meta(checkpoint)
    except CheckpointError:
        return None
    return (meta.get("provenance") or {}).get("lineage")


def _created_at(checkpoint: Path) -> float:
    from .checkpoint import CheckpointError, read_meta

    try:
        stamp = (read_meta(checkpoint).get("provenance") or {}).get("created_at")
        return datetime.fromisoformat(stamp).timestamp()
    except (CheckpointError, TypeError, ValueError):
        return 0.0  # unknown: any /forget counts as after it


def flagged(lineage: dict[str, Any], created_at: float, excluded: dict[str, float],
            forgotten: dict[str, float]) -> list[str]:
    """The users in `lineage` who are excluded now, or ran /forget after the checkpoint was made."""
    return sorted(u for u in lineage.get("users", [])
                  if u in excluded or forgotten.get(u, -1.0) >= created_at)


def report(models_dir: str | Path, excluded: dict[str, float],
           forgotten: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """One row per model: the serving one first, then every kept checkpoint, newest first."""
    models_dir = Path(models_dir)
    serving = Registry(models_dir).current()
    on_disk = sorted(models_dir.glob(f"{CANDIDATE_PREFIX}*.safetensors"), reverse=True)
    rows = []
    if serving is None or not serving.is_file():
        rows.append({"name": "base", "role": "serving", "manifest": None, "exchanges": 0, "users": 0,
                     "forgotten_users": [], "note": "the configured base model: no chat data"})
    for path in ([serving] if serving is not None and serving.is_file() else []) + [
            p for p in on_disk if serving is None or p.name != serving.name]:
        lin = lineage_of(path)
        row = {"name": path.name, "role": "serving" if serving is not None and path.name == serving.name else "kept"}
        if lin is None:
            rows.append({**row, "manifest": None, "exchanges": None, "users": None, "forgotten_users": [],
                         "note": "no lineage recorded (trained before lineage existed): treat as containing anyone"})
            continue
        rows.append({**row, "manifest": lin.get("manifest"), "exchanges": len(lin.get("exchange_ids", [])),
                     "users": len(lin.get("users", [])),
                     "forgotten_users": flagged(lin, _created_at(path), excluded, forgotten or {}),
                     "inherited_from": lin.get("inherited_from")})
    return rows


def contains_any(checkpoint: Path | None, users: set[str]) -> bool:
    """Whether `checkpoint` (None: the base) holds data of any of `users`; unknown lineage counts as yes."""
    if not users or checkpoint is None or not Path(checkpoint).name.startswith(CANDIDATE_PREFIX):
        return False
    lin = lineage_of(Path(checkpoint))
    return lin is None or bool(users & set(lin.get("users", [])))


def holds_forgotten(checkpoint: Path, excluded: dict[str, float], forgotten: dict[str, float]) -> list[str]:
    """The users since forgotten or opted out whose data `checkpoint` may hold (unknown lineage: any of them)."""
    if not checkpoint.name.startswith(CANDIDATE_PREFIX):
        return []  # the configured base model: no chat data
    lin = lineage_of(checkpoint)
    if lin is None:  # trained before lineage existed: it may hold anyone's data
        lin = {"users": set(excluded) | set(forgotten)}
    return flagged(lin, _created_at(checkpoint), excluded, forgotten)


def check_serve(checkpoint: Path | None, excluded: dict[str, float], forgotten: dict[str, float], *,
                force: bool = False, override: str = "--force") -> int:
    """Before a kept checkpoint serves again (rollback, promote): refuse if it holds forgotten users' data.

    Raises HoldsForgottenData naming how many such users it holds, unless `force`
    (`override` is how the operator says so, for the message); a forced return is
    logged. Returns that count. None (the base model) holds no chat data.
    """
    gone = [] if checkpoint is None else holds_forgotten(Path(checkpoint), excluded, forgotten)
    if not gone:
        return 0
    name = Path(checkpoint).name
    what = (f"{name} holds data of {len(gone)} user(s) since forgotten or opted out"
            if lineage_of(Path(checkpoint)) is not None else
            f"{name} has no recorded lineage and may hold data of {len(gone)} user(s) since forgotten or opted out")
    if not force:
        log.warning("refused to serve %s: %s", name, what)
        raise HoldsForgottenData(f"{what}; serving it would bring their data back. Run a fresh fine-tune "
                                 f"(`chatcore finetune`) instead, or pass {override} to serve it anyway.", len(gone))
    log.warning("serving %s although %s (forced with %s)", name, what, override)
    return len(gone)


def prune_forgotten(models_dir: str | Path, excluded: dict[str, float], forgotten: dict[str, float], *,
                    apply: bool = False) -> list[tuple[str, int]]:
    """Kept checkpoints holding data of users since forgotten or opted out, with how many; `apply` deletes them.

    The serving model is never deleted (a fine-tune without them replaces it).
    """
    registry = Registry(models_dir)
    serving = registry.current()
    found = []
    for path in sorted(Path(models_dir).glob(f"{CANDIDATE_PREFIX}*.safetensors")):
        if serving is not None and path.name == serving.name:
            continue
        gone = holds_forgotten(path, excluded, forgotten)
        if gone:
            found.append((path.name, len(gone)))
            if apply:
                registry.delete(path.name)
                log.warning("deleted %s: it held data of %d user(s) since forgotten or opted out", path.name, len(gone))
    return found


def gate_reference(serving: str | None, base: str, gone: set[str]) -> str:
    """What a candidate must beat: the serving model, or the base when serving holds data of users in `gone`.

    A model that must be replaced is no yardstick: a fine-tune without the forgotten
    users' data would rarely beat the model that still has it.
    """
    if serving and serving != base and contains_any(Path(serving), gone):
        return base
    return serving or base


def format_report(rows: list[dict[str, Any]]) -> str:
    lines = []
    for r in rows:
        head = f"{r['role']:<8} {r['name']}"
        if r["manifest"] is None:
            lines.append(f"{head}  {r['note']}")
            continue
        body = f"{r['exchanges']} exchange(s) from {r['users']} user(s), manifest {r['manifest'][:19]}"
        if r.get("inherited_from"):
            body += f" (includes {r['inherited_from']})"
        gone = r["forgotten_users"]
        flag = (f"CONTAINS DATA OF {len(gone)} USER(S) SINCE FORGOTTEN/OPTED OUT: {', '.join(gone)}"
                if gone else "clean")
        lines.append(f"{head}  {body}  {flag}")
    return "\n".join(lines)
