"""The learning loop's commands: ``chatcore finetune`` and ``chatcore model {rollback,status,starter}``.

`add_commands(sub, config_arg)` is what `chatcore.cli` calls to add them.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import sys
from pathlib import Path
from typing import Any


def add_commands(sub: Any, config_arg: Any) -> None:
    p = sub.add_parser("finetune", help="fine-tune now on the new conversations, then gate and promote",
                       description="Fine-tune a candidate on the history (and any JSONL given), judge it against "
                                   "the serving model on held-out conversations, and promote it only if it is "
                                   "better. A running bot picks a promotion up at its next start.")
    config_arg(p)
    p.add_argument("--jsonl", action="append", type=Path, default=[],
                   help="also train on this seed-format chat_history.jsonl (repeatable)")
    p.add_argument("--no-store", action="store_true", help="train on the --jsonl files only")
    p.add_argument("--max-iters", type=int, help="override training.max_iters")
    p.add_argument("--threads", type=int, help="training threads (default: the config's, else all cores but one)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(run=cmd_finetune)

    model = sub.add_parser("model", help="which model serves: rollback, status, starter",
                           description="Manage the fine-tuned checkpoints.")
    msub = model.add_subparsers(title="model commands", metavar="ACTION", required=True)
    p = msub.add_parser("rollback", help="serve the previous checkpoint again",
                        description="Return to the previously promoted checkpoint (or the configured base model).")
    config_arg(p)
    p.set_defaults(run=cmd_rollback)
    p = msub.add_parser("status", help="print the registry (serving, promoted, rejected) as JSON",
                        description="Print which checkpoint serves and the promotion history.")
    config_arg(p)
    p.set_defaults(run=cmd_model_status)
    p = msub.add_parser("starter", help="build the offline starter model now",
                        description="Train the small offline starter model (cached; used when no GPT-2 is available).")
    config_arg(p)
    p.add_argument("--corpus", type=Path, help="seed-format JSONL to train on (default: the chitchat-dataset corpus)")
    p.add_argument("--minutes", type=float, help="training time budget (default 4)")
    p.add_argument("--force", action="store_true", help="rebuild even if a starter model is cached")
    p.set_defaults(run=cmd_starter)


def _config(path: Path | None):
    from ..cli import load

    return load(path)[1]


def _fail(message: str) -> Exception:
    from ..cli import Failure

    return Failure(message)


def finetune(config: Any, *, jsonl: list[Path] = (), use_store: bool = True, max_iters: int | None = None,
             threads: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Run one fine-tune job in this process (holding the same lock as the bot's scheduler)."""
    from ..bot import starter_for
    from ..engine import resolve_model
    from .gate import serving_checkpoint
    from .job import run_job, spec_from_config
    from .scheduler import LOCK_NAME

    for f in jsonl:
        if not Path(f).is_file():
            raise _fail(f"{f}: no such file")
    _, meta, _ = resolve_model(dict(config["model"]), starter_for(config))
    base = meta.get("source")
    if not base:
        raise _fail("the configured model has no checkpoint on disk to fine-tune from")
    models_dir = Path(config.data_dir) / "models"
    promoted = serving_checkpoint(models_dir)
    spec = spec_from_config(config, base, str(promoted) if promoted else base, progress=progress,
                            jsonl=[str(f) for f in jsonl])
    if not use_store:
        spec.store = None
    if max_iters:
        spec.train["max_iters"] = max_iters
    if threads:
        spec.threads = threads
    models_dir.mkdir(parents=True, exist_ok=True)
    with open(models_dir / LOCK_NAME, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _fail("a fine-tune job is already running (the bot's, or another chatcore finetune)") from None
        return run_job(spec)


def cmd_finetune(args: argparse.Namespace) -> int:
    import logging

    logging.getLogger("chatcore.training").setLevel(logging.INFO)
    config = _config(args.config)
    try:
        result = finetune(config, jsonl=args.jsonl, use_store=not args.no_store, max_iters=args.max_iters,
                          threads=args.threads, progress=sys.stderr.isatty())
    except ValueError as exc:  # not enough data, bad training options
        raise _fail(str(exc)) from None
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        g = result["gate"]
        print(f"{result['status']}: {Path(result['candidate']).name} - {g['reason']}")
        d = result["data"]
        print(f"data: {d['train_exchanges']} training / {d['val_exchanges']} validation exchanges; "
              f"guards removed {sum(d['guards'].values())} ({', '.join(f'{k} {v}' for k, v in d['guards'].items() if v) or 'none'})")
        if result["status"] == "promoted":
            print("A running bot serves it from its next start (or after /finetune in the bot).")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from .gate import Registry

    config = _config(args.config)
    gate = config.get("plugins.auto_finetune.gate") or {}
    registry = Registry(Path(config.data_dir) / "models", keep=gate.get("keep") or 3,
                        keep_rejected=gate.get("keep_rejected") or 3)
    try:
        serving = registry.rollback()
    except LookupError as exc:  # nothing to roll back
        raise _fail(str(exc)) from None
    print(f"now serving {serving.name if serving else 'the configured base model'}; "
          "restart the bot to load it")
    return 0


def cmd_model_status(args: argparse.Namespace) -> int:
    from .gate import Registry

    config = _config(args.config)
    print(json.dumps(Registry(Path(config.data_dir) / "models").history(), indent=2))
    return 0


def cmd_starter(args: argparse.Namespace) -> int:
    from .starter import StarterConfig, build_starter, starter_path

    config = _config(args.config)
    path = starter_path(config)
    if path.is_file() and not args.force:
        print(f"{path} exists (use --force to rebuild)")
        return 0
    if args.corpus is not None and not args.corpus.is_file():
        raise _fail(f"{args.corpus}: no such file")
    cfg = StarterConfig()
    if args.minutes:
        cfg.minutes = args.minutes
    import logging

    logging.getLogger("chatcore.training").setLevel(logging.INFO)
    try:
        out = build_starter(path, corpus=args.corpus, cfg=cfg, threads=config.get("model.threads"))
    except (RuntimeError, ValueError) as exc:
        raise _fail(str(exc)) from None
    print(f"starter model written to {out}")
    return 0
