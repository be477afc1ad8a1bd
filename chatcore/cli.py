"""The `chatcore` command: chatting, the history, configs, fine-tuning and which model serves.

Commands import what they need when they run, so ``--help``, ``config`` and
``history`` start without torch.

Exit codes: 0 success; 1 a runtime failure (model, store, adapter); 2 bad usage
or an invalid config; 130 interrupted (Ctrl-C; every finished exchange is saved).
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import gc
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from . import __version__, lineage
from .config import ConfigError
from .consent import check_config

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what the shell reports for `cat` when its reader goes


class Failure(Exception):
    """An error the user can act on: printed as one line, exit code 1."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return EXIT_USAGE
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args) or EXIT_OK
    except ConfigError as exc:
        print(f"chatcore: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\nchatcore: interrupted; finished exchanges are saved.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader stopped early (`chatcore history export | head`): end quietly, as `cat` would.
        # stdout goes to /dev/null so the interpreter's final flush cannot raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except Exception as exc:  # one readable line, not a traceback, for what users cause
        if not _is_user_error(exc):
            raise
        print(f"chatcore: {exc}", file=sys.stderr)
        return EXIT_FAILURE


# Errors a user causes and can fix, by module: one line, no traceback. Anything else is a bug and keeps it.
USER_ERRORS = {"chatcore.adapter": "AdapterError", "chatcore.checkpoint": "CheckpointError",
               "chatcore.registry": "RegistryError", "chatcore.store": "StoreError", "chatcore.weights": "ModelNotFound"}


def _is_user_error(exc: Exception) -> bool:
    # A module that was never imported cannot have raised: looking its class up must not import torch.
    types = [getattr(sys.modules[m], name) for m, name in USER_ERRORS.items() if m in sys.modules]
    return isinstance(exc, (Failure, *types))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatcore", description="A self-hosted chatbot that owns its model and learns from its conversations.")
    parser.add_argument("--version", action="version", version=f"chatcore {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    def config_arg(p: argparse.ArgumentParser, required: bool = False) -> None:
        p.add_argument("-c", "--config", type=Path, required=required,
                       help="YAML config file (default: built-in defaults)")

    p = sub.add_parser("run", help="run every adapter enabled in the config", description="Run every adapter enabled in the config, until Ctrl-C.")
    config_arg(p, required=True)
    p.add_argument("--adapter", action="append", help="run only this adapter (repeatable)")
    p.set_defaults(run=cmd_run)

    p = sub.add_parser("chat", help="chat in this terminal (or answer piped lines)", description="Chat on stdin/stdout. Piped input: one reply per line, exit at end of input.")
    config_arg(p)
    p.set_defaults(run=cmd_chat)

    history = sub.add_parser("history", help="export, import or count the conversation history", description="Work with the history store.")
    hsub = history.add_subparsers(title="history commands", metavar="ACTION", required=True)
    p = hsub.add_parser("export", help="write chat_history.jsonl ({user, assistant} per line)", description="Export every exchange as JSONL; with --user, everything stored about one user as JSON (what /mydata gives them).")
    config_arg(p)
    p.add_argument("-o", "--output", default="-", help="output file (default: stdout)")
    p.add_argument("--user", help='one user\'s data as JSON, e.g. "discord:1234" (their user key)')
    p.set_defaults(run=cmd_history_export)
    p = hsub.add_parser("relabel", help="apply a training policy to already stored exchanges (dry run by default)",
                        description="Policy changes are never retroactive; this is the explicit way. It re-decides "
                                    "whether matching exchanges may train the bot under --policy, from the consent "
                                    "each user had when they said them, and says how many rows change.")
    config_arg(p)
    p.add_argument("--adapter", required=True)
    p.add_argument("--workspace", help="only this Discord guild / Slack workspace id")
    p.add_argument("--channel", help="only this channel id")
    p.add_argument("--policy", required=True, choices=("off", "opt_in", "opt_out"))
    p.add_argument("--yes", action="store_true", help="apply the change (without it: only count)")
    p.set_defaults(run=cmd_history_relabel)
    p = hsub.add_parser("import", help="read chat_history.jsonl into the store", description="Import a JSONL file in one transaction; bad lines are skipped and reported.")
    config_arg(p)
    p.add_argument("file", type=Path)
    p.set_defaults(run=cmd_history_import)
    p = hsub.add_parser("stats", help="print counts as JSON", description="Print history statistics as JSON.")
    config_arg(p)
    p.set_defaults(run=cmd_history_stats)
    p = hsub.add_parser("migrate", help="copy the whole history to another database (e.g. SQLite to PostgreSQL)",
                        description="Copy every row to an empty database, ids kept, in one transaction; "
                                    "prints rows per table and a content hash of both sides. Stop the bots first.")
    config_arg(p)
    p.add_argument("--from", dest="source", metavar="URL",
                   help="sqlite:///path, a file path or postgresql://... (default: the config's history)")
    p.add_argument("--to", dest="target", metavar="URL", required=True,
                   help="postgresql://user@host:port/db or sqlite:///path; must hold no history yet")
    p.set_defaults(run=cmd_history_migrate)

    cfg = sub.add_parser("config", help="check a config file", description="Work with config files.")
    csub = cfg.add_subparsers(title="config commands", metavar="ACTION", required=True)
    p = csub.add_parser("check", help="validate a config file (secrets are never printed)", description="Validate a config file and print it with secrets redacted.")
    p.add_argument("file", type=Path)
    p.set_defaults(run=cmd_config_check)
    p = csub.add_parser("defaults", help="print every key with its default (config/default.yaml)", description="Print the full default config, commented.")
    p.set_defaults(run=cmd_config_defaults)

    p = sub.add_parser("finetune", help="fine-tune now on the new conversations, then gate and promote",
                       description="Fine-tune a candidate on the history (and any JSONL given), judge it against "
                                   "the serving model on held-out conversations, and promote it only if it is "
                                   "better. A running bot picks a promotion up within seconds.")
    config_arg(p)
    p.add_argument("--jsonl", action="append", type=Path, default=[],
                   help="also train on this seed-format chat_history.jsonl (repeatable)")
    p.add_argument("--no-store", action="store_true", help="train on the --jsonl files only")
    p.add_argument("--max-iters", type=int, help="override training.max_iters")
    p.add_argument("--threads", type=int, help="training threads (default: the config's, else all cores but one)")
    p.add_argument("--nproc", type=int, help="train in this many processes under torchrun with DistributedDataParallel "
                                             "(one GPU each on CUDA; default: training.nproc, 1)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(run=cmd_finetune)

    model = sub.add_parser("model", help="which model serves: rollback, status, starter",
                           description="Manage the fine-tuned checkpoints.")
    msub = model.add_subparsers(title="model commands", metavar="ACTION", required=True)
    p = msub.add_parser("rollback", help="serve the previous checkpoint again",
                        description="Return to the previously promoted checkpoint (or the configured base model). "
                                    "Refused when that checkpoint holds data of users since forgotten or opted out.")
    config_arg(p)
    p.add_argument("--force", action="store_true",
                   help="serve it even if it holds data of users since forgotten or opted out (logged)")
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
    p = msub.add_parser("lineage", help="which models contain data of users since forgotten",
                        description="For the serving model and each kept checkpoint: the exchanges and users it "
                                    "was trained on, and whether any of them has since been forgotten or opted out.")
    config_arg(p)
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(run=cmd_lineage)
    p = msub.add_parser("prune-forgotten", help="delete kept checkpoints holding data of users since forgotten",
                        description="List (dry run) or, with --yes, delete the kept checkpoints that hold data of "
                                    "users since forgotten or opted out (or have no recorded lineage while such "
                                    "users exist). The serving model is never deleted.")
    config_arg(p)
    p.add_argument("--yes", action="store_true", help="delete them (without it: only list)")
    p.set_defaults(run=cmd_prune_forgotten)
    return parser


# --- helpers -----------------------------------------------------------------


def load(config_path: Path | None):
    """The plugin manager and the validated config (no model, no store)."""
    from .config import load_config
    from .plugin_manager import make_plugin_manager

    pm = make_plugin_manager()
    config = load_config(config_path, pm.schema())
    pm.disable(config["plugins"]["disabled"])
    check_config(config)
    for name, adapter in pm.adapters().items():
        section = config["adapters"].get(name)
        if isinstance(section, dict) and section.get("enabled"):
            adapter.check_config(section)
    logging.getLogger("chatcore").setLevel(config["bot"]["log_level"])
    return pm, config


def open_store(config_path: Path | None, *, read_only: bool = False):
    from .store import Store

    _, config = load(config_path)
    return Store(config.store_url, read_only=read_only, timeout=config["store"]["busy_timeout_s"])


def import_bot() -> type:
    """`chatcore.bot.Bot`, imported (with torch and the engine) by a process that serves: once, at its start."""
    # Importing torch makes ~10^6 objects that live as long as the process, and the collector's full
    # scans, triggered as they accumulate, walked them all again (~0.3 s of every start). So no scans
    # while importing; then they are frozen: left out of every later scan, at start and while serving.
    gc.disable()
    try:
        from .bot import Bot
    finally:
        gc.enable()
    gc.freeze()
    return Bot


def build_bot(config_path: Path | None):
    Bot = import_bot()
    pm, config = load(config_path)
    return Bot.from_config(config, pm=pm)


# --- commands ----------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    bot = build_bot(args.config)
    return _serve(bot, args.adapter)


def cmd_chat(args: argparse.Namespace) -> int:
    bot = build_bot(args.config)
    return _serve(bot, ["stdin"])


def _serve(bot: Any, adapters: list[str] | None) -> int:
    async def go() -> None:
        # SIGTERM (containers, systemd) stops like the end of input: adapters finish or refuse what is
        # in flight (within their grace period), shutdown hooks run, exit 0.
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGTERM, bot.stop)
        except (NotImplementedError, RuntimeError):  # Windows, or not the main thread
            pass
        try:
            await bot.run(adapters)
        finally:
            await bot.close()

    asyncio.run(go())
    return EXIT_OK


def cmd_history_export(args: argparse.Namespace) -> int:
    store = open_store(args.config, read_only=True)
    try:
        if args.user is not None:
            data = json.dumps(store.user_data(args.user), indent=2, ensure_ascii=False) + "\n"
            if args.output == "-":
                sys.stdout.write(data)
            else:
                Path(args.output).write_text(data, encoding="utf-8")
            count = len(json.loads(data)["exchanges"])
        elif args.output == "-":
            count = store.export_jsonl(sys.stdout)
        else:
            count = store.export_jsonl(Path(args.output))
    finally:
        store.close()
    print(f"exported {count} exchange(s)", file=sys.stderr)
    return EXIT_OK


def cmd_history_import(args: argparse.Namespace) -> int:
    if not args.file.exists():
        raise Failure(f"{args.file}: no such file")
    store = open_store(args.config)
    try:
        report = store.import_jsonl(args.file)
    finally:
        store.close()
    for line, reason in report.skipped:
        print(f"{args.file}:{line}: skipped: {reason}", file=sys.stderr)
    print(f"imported {report.imported} exchange(s), skipped {len(report.skipped)} line(s)")
    return EXIT_OK


def cmd_history_relabel(args: argparse.Namespace) -> int:
    from .config import PERMISSION_KEYS

    _, config = load(args.config)
    ack = PERMISSION_KEYS.get(args.adapter)
    if ack and args.policy != "off" and not config.get(f"adapters.{args.adapter}.training.{ack}"):
        raise Failure(f"{args.adapter}: training needs adapters.{args.adapter}.training.{ack}: true in the "
                      "config (the platform's permission; see docs/privacy.md)")
    store = open_store(args.config)
    try:
        counts = store.relabel(adapter=args.adapter, workspace=args.workspace, channel=args.channel,
                               policy=args.policy, apply=args.yes)
    finally:
        store.close()
    verb = "relabelled" if args.yes else "would relabel"
    print(f"{verb} {counts['matched']} exchange(s) as {args.policy}: {counts['become_trainable']} "
          f"become trainable, {counts['stop_trainable']} stop being trainable"
          + ("" if args.yes else "; run again with --yes to apply"))
    return EXIT_OK


def cmd_history_stats(args: argparse.Namespace) -> int:
    store = open_store(args.config, read_only=True)
    try:
        print(json.dumps(store.stats(), indent=2, default=str))
    finally:
        store.close()
    return EXIT_OK


def cmd_history_migrate(args: argparse.Namespace) -> int:
    from .store import Store, copy_history

    _, config = load(args.config)
    timeout = config["store"]["busy_timeout_s"]
    source = Store(args.source or config.store_url, read_only=True, timeout=timeout)
    try:
        target = Store(args.target, timeout=timeout)
        try:
            copy_history(source, target)
            (before, source_hash), (after, target_hash) = source.digest(), target.digest()
        finally:
            target.close()
    finally:
        source.close()
    for table, count in before.items():
        print(f"{table}: {count} -> {after.get(table)}")
    print(f"content sha256: {source_hash} ({source.path})")
    print(f"content sha256: {target_hash} ({target.path})")
    if (before, source_hash) != (after, target_hash):
        raise Failure("the copy differs from the source: do not switch the bots to it")
    print(f"migrated losslessly: {before.get('exchanges', 0)} exchange(s)")
    return EXIT_OK


def cmd_config_check(args: argparse.Namespace) -> int:
    import yaml

    _, config = load(args.file)
    enabled = [name for name, section in config["adapters"].items() if section.get("enabled")]
    print(f"{args.file}: OK (adapters enabled: {', '.join(enabled) or 'none'})")
    for line in check_config(config):
        print(line)
    if config["model"]["remote"]:
        from .remote import front_end_note

        print(f"model: {front_end_note(config)}")
    print(yaml.safe_dump(config.redacted(), sort_keys=False), end="")
    return EXIT_OK


def cmd_config_defaults(args: argparse.Namespace) -> int:
    from .config import render_defaults
    from .plugin_manager import make_plugin_manager

    print(render_defaults(make_plugin_manager().schema()), end="")
    return EXIT_OK


# --- fine-tuning and the serving model ----------------------------------------


def finetune(config: Any, *, jsonl: list[Path] = (), use_store: bool = True, max_iters: int | None = None,
             threads: int | None = None, progress: bool = True, nproc: int | None = None) -> dict[str, Any]:
    """Run one fine-tune job in this process (holding the same lock as the bot's scheduler), or under torchrun."""
    from .registry import serving_checkpoint
    from .training.job import run_job, spec_from_config
    from .training.scheduler import LOCK_NAME, clean_leftovers
    from .weights import models_dir as models_folder
    from .weights import resolve_model, starter_for

    for f in jsonl:
        if not Path(f).is_file():
            raise Failure(f"{f}: no such file")
    _, meta, _ = resolve_model(dict(config["model"]), starter_for(config))
    base = meta.get("source")
    if not base:
        raise Failure("the configured model has no checkpoint on disk to fine-tune from")
    models_dir = models_folder(config)
    promoted = serving_checkpoint(models_dir)
    gone: set[str] = set()
    if use_store:
        from .store import Store

        with Store(config.store_url, timeout=config["store"]["busy_timeout_s"]) as store:
            gone = set(store.excluded_users()) | set(store.forgotten())
    serving = lineage.gate_reference(str(promoted) if promoted else None, base, gone)
    spec = spec_from_config(config, base, serving, progress=progress, jsonl=[str(f) for f in jsonl])
    if not use_store:
        spec.store = None
    if max_iters:
        spec.train["max_iters"] = max_iters
    if threads:
        spec.threads = threads
    if nproc is not None:
        spec.train["nproc"] = nproc
    if int(spec.train.get("nproc") or 1) != 1:
        return _finetune_distributed(models_dir, spec)
    models_dir.mkdir(parents=True, exist_ok=True)
    with open(models_dir / LOCK_NAME, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Failure("a fine-tune job is already running (the bot's, or another chatcore finetune)") from None
        clean_leftovers(models_dir)  # what crashed fine-tunes left behind
        return run_job(spec)


def _finetune_distributed(models_dir: Path, spec: Any) -> dict[str, Any]:
    """The job under torchrun, through the bot's scheduler (same lock, job folder, log); its log is echoed here."""
    from .training.scheduler import JobBusy, JobScheduler

    try:
        job = JobScheduler(models_dir, lock_url=spec.store).start(spec)
    except JobBusy:
        raise Failure("a fine-tune job is already running (the bot's, or another chatcore finetune)") from None
    log_path, shown = job.dir / "log.txt", 0
    try:
        while True:
            finished = not job.running
            text = log_path.read_bytes()[shown:] if log_path.exists() else b""
            shown += len(text)
            sys.stderr.write(text.decode("utf-8", "replace"))
            sys.stderr.flush()
            if finished:
                break
            try:
                job.proc.wait(0.5)
            except subprocess.TimeoutExpired:
                pass
    except KeyboardInterrupt:
        job.cancel()
        raise
    result = job.wait()
    if result.get("status") in ("failed", "cancelled"):
        raise Failure(f"fine-tune {result['status']}: {result.get('error')} (log: {log_path})")
    return result


def cmd_finetune(args: argparse.Namespace) -> int:
    logging.getLogger("chatcore.training").setLevel(logging.INFO)
    _, config = load(args.config)
    try:
        result = finetune(config, jsonl=args.jsonl, use_store=not args.no_store, max_iters=args.max_iters,
                          threads=args.threads, progress=sys.stderr.isatty(), nproc=args.nproc)
    except ValueError as exc:  # not enough data, bad training options
        raise Failure(str(exc)) from None
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        g = result["gate"]
        print(f"{result['status']}: {Path(result['candidate']).name} - {g['reason']}")
        d = result["data"]
        print(f"data: {d['train_exchanges']} training / {d['val_exchanges']} validation exchanges; "
              f"guards removed {sum(d['guards'].values())} ({', '.join(f'{k} {v}' for k, v in d['guards'].items())})")
        if g.get("candidate_canary_loss") is not None:
            print(f"canaries: loss {g['candidate_canary_loss']:.4f} (serving {g['serving_canary_loss']:.4f})")
        lin = result.get("lineage") or {}
        if lin:
            print(f"lineage: {lin['exchanges']} exchange(s) from {lin['users']} user(s), manifest {lin['manifest'][:19]}")
        if result["status"] == "promoted":
            print("A running bot serves it within seconds.")
    return 0


def _gone_users(config: Any) -> tuple[dict[str, float], dict[str, float]]:
    """The store's users training must leave out now, and those who ran /forget (see `lineage.flagged`)."""
    from .store import Store

    # read-only where it exists: a lineage check never creates or migrates a history
    read_only = config.get("history.url") is None and config.store_path.exists()
    with Store(config.store_url, read_only=read_only, timeout=config["store"]["busy_timeout_s"]) as store:
        return store.excluded_users(), store.forgotten()


def cmd_lineage(args: argparse.Namespace) -> int:
    from .weights import models_dir

    _, config = load(args.config)
    excluded, forgotten = _gone_users(config)
    rows = lineage.report(models_dir(config), excluded, forgotten)
    print(json.dumps(rows, indent=2) if args.json else lineage.format_report(rows))
    if not args.json and any(r["forgotten_users"] for r in rows):
        print("\nA fine-tune from the base model without them replaces these "
              "(plugins.auto_finetune.on_forget; or run `chatcore finetune`).")
    return EXIT_OK


def cmd_prune_forgotten(args: argparse.Namespace) -> int:
    from .weights import models_dir

    _, config = load(args.config)
    excluded, forgotten = _gone_users(config)
    found = lineage.prune_forgotten(models_dir(config), excluded, forgotten, apply=args.yes)
    for name, users in found:
        print(f"{'deleted' if args.yes else 'would delete'} {name}: data of {users} user(s) since forgotten or opted out")
    if not found:
        print("no kept checkpoint holds data of users since forgotten or opted out")
    elif not args.yes:
        print("run again with --yes to delete them (the serving model is never deleted)")
    return EXIT_OK


def cmd_rollback(args: argparse.Namespace) -> int:
    from .registry import Registry

    _, config = load(args.config)
    gate = config.get("plugins.auto_finetune.gate") or {}
    registry = Registry(Path(config.data_dir) / "models", keep=gate.get("keep") or 3,
                        keep_rejected=gate.get("keep_rejected") or 3)
    excluded, forgotten = _gone_users(config)
    try:
        held: list[int] = []
        serving = registry.rollback(
            lambda target: held.append(lineage.check_serve(target, excluded, forgotten, force=args.force)))
    except (LookupError, lineage.HoldsForgottenData) as exc:  # nothing to roll back; or it would serve them again
        raise Failure(str(exc)) from None
    from .store import is_postgres_url

    if is_postgres_url(config.store_url):
        from .postgres import announce_registry_change

        announce_registry_change(config.store_url, "rollback")
    print(f"now serving {serving.name if serving else 'the configured base model'} "
          "(a running bot switches within seconds)")
    if held and held[0]:
        print(f"forced: it holds data of {held[0]} user(s) since forgotten or opted out; "
              "a fresh fine-tune (`chatcore finetune`) replaces it")
    return 0


def cmd_model_status(args: argparse.Namespace) -> int:
    from .registry import Registry

    _, config = load(args.config)
    print(json.dumps(Registry(Path(config.data_dir) / "models").history(), indent=2))
    return 0


def cmd_starter(args: argparse.Namespace) -> int:
    from .training.starter import StarterConfig, build_starter, starter_path

    _, config = load(args.config)
    path = starter_path(config)
    if path.is_file() and not args.force:
        print(f"{path} exists (use --force to rebuild)")
        return 0
    if args.corpus is not None and not args.corpus.is_file():
        raise Failure(f"{args.corpus}: no such file")
    cfg = StarterConfig()
    if args.minutes:
        cfg.minutes = args.minutes
    logging.getLogger("chatcore.training").setLevel(logging.INFO)
    try:
        out = build_starter(path, corpus=args.corpus, cfg=cfg, threads=config.get("model.threads"))
    except (RuntimeError, ValueError) as exc:
        raise Failure(str(exc)) from None
    print(f"starter model written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
