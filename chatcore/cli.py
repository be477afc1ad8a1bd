"""The `chatcore` command.

Exit codes: 0 success; 1 a runtime failure (model, store, adapter); 2 bad usage
or an invalid config; 130 interrupted (Ctrl-C; every finished exchange is saved).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from . import __version__
from .config import ConfigError
from .training import cli as training_cli

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


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
    except Exception as exc:  # one readable line, not a traceback, for what users cause
        if not _is_user_error(exc):
            raise
        print(f"chatcore: {exc}", file=sys.stderr)
        return EXIT_FAILURE


def _is_user_error(exc: Exception) -> bool:
    """Errors a user causes and can fix: one line, no traceback. Anything else is a bug and keeps its traceback."""
    from .adapter import AdapterError
    from .checkpoint import CheckpointError
    from .engine import ModelNotFound
    from .store import StoreError

    return isinstance(exc, (Failure, StoreError, ModelNotFound, CheckpointError, AdapterError))


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
    p = hsub.add_parser("export", help="write chat_history.jsonl ({user, assistant} per line)", description="Export every exchange as JSONL.")
    config_arg(p)
    p.add_argument("-o", "--output", default="-", help="output file (default: stdout)")
    p.set_defaults(run=cmd_history_export)
    p = hsub.add_parser("import", help="read chat_history.jsonl into the store", description="Import a JSONL file in one transaction; bad lines are skipped and reported.")
    config_arg(p)
    p.add_argument("file", type=Path)
    p.set_defaults(run=cmd_history_import)
    p = hsub.add_parser("stats", help="print counts as JSON", description="Print history statistics as JSON.")
    config_arg(p)
    p.set_defaults(run=cmd_history_stats)

    cfg = sub.add_parser("config", help="check a config file", description="Work with config files.")
    csub = cfg.add_subparsers(title="config commands", metavar="ACTION", required=True)
    p = csub.add_parser("check", help="validate a config file (secrets are never printed)", description="Validate a config file and print it with secrets redacted.")
    p.add_argument("file", type=Path)
    p.set_defaults(run=cmd_config_check)
    p = csub.add_parser("defaults", help="print every key with its default (config/default.yaml)", description="Print the full default config, commented.")
    p.set_defaults(run=cmd_config_defaults)

    training_cli.add_commands(sub, config_arg)
    return parser


# --- helpers -----------------------------------------------------------------


def load(config_path: Path | None):
    """The plugin manager and the validated config (no model, no store)."""
    from .config import load_config
    from .plugin_manager import make_plugin_manager

    pm = make_plugin_manager()
    config = load_config(config_path, pm.schema())
    pm.disable(config["plugins"]["disabled"])
    logging.getLogger("chatcore").setLevel(config["bot"]["log_level"])
    return pm, config


def open_store(config_path: Path | None, *, read_only: bool = False):
    from .store import Store

    _, config = load(config_path)
    return Store(config.store_path, read_only=read_only)


def build_bot(config_path: Path | None):
    from .bot import Bot

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
        if args.output == "-":
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


def cmd_history_stats(args: argparse.Namespace) -> int:
    store = open_store(args.config, read_only=True)
    try:
        print(json.dumps(store.stats(), indent=2, default=str))
    finally:
        store.close()
    return EXIT_OK


def cmd_config_check(args: argparse.Namespace) -> int:
    import yaml

    _, config = load(args.file)
    enabled = [name for name, section in config["adapters"].items() if section.get("enabled")]
    print(f"{args.file}: OK (adapters enabled: {', '.join(enabled) or 'none'})")
    print(yaml.safe_dump(config.redacted(), sort_keys=False), end="")
    return EXIT_OK


def cmd_config_defaults(args: argparse.Namespace) -> int:
    from .config import render_defaults
    from .plugin_manager import make_plugin_manager

    print(render_defaults(make_plugin_manager().schema()), end="")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
