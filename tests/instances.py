"""Several real `chatcore run` processes on one history and one shared models folder.

The harness of tests/test_two_instances.py and ``benchmarks/loadtest.py --instances N``:
each instance is its own process with the HTTP adapter on a free 127.0.0.1 port, all
with the same ``history.url`` and the same ``bot.data_dir`` (so the same ``models/``
folder, registry.json included), as on several machines sharing a volume.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

# Fine-tune settings that finish in seconds on a tiny model (as tests/plugins/test_auto_finetune.py).
QUICK_TRAINING = dict(max_iters=10, eval_interval=5, warmup_iters=2, batch_size=4, block_size=64,
                      learning_rate=3e-3, min_lr=3e-4)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def instance_config(*, name: str, data_dir: Path, history_url: str, port: int, api_key: str, checkpoint: Path,
                    every: int, max_new_tokens: int = 8, max_queue: int = 64, threads: int = 1,
                    training: dict | None = None) -> dict[str, Any]:
    """One instance's config: HTTP adapter with an API key (its exchanges train), rate limits off, auto fine-tune on."""
    return {
        "bot": {"name": name, "data_dir": str(data_dir), "log_level": "INFO"},
        "model": {"checkpoint": str(checkpoint), "device": "cpu", "threads": threads, "quantize": "none",
                  "download": False, "starter": False},
        "generation": {"max_new_tokens": max_new_tokens},
        "serving": {"max_queue": max_queue},
        "history": {"url": history_url},
        "adapters": {"http": {"enabled": True, "host": "127.0.0.1", "port": port, "api_key": api_key}},
        "plugins": {
            "commands": {"rate_limit": {"messages": 0}},
            # cooldown: one job for the run; the first one is due at once (the history's mark is old, see seed_history)
            "auto_finetune": {"every": every, "cooldown_minutes": 60, "threads": 1,
                              "training": training or QUICK_TRAINING},
        },
    }


class Instance:
    """One `chatcore run -c FILE` process; its output goes to ``<name>.log`` beside its config."""

    def __init__(self, config: dict[str, Any], folder: Path) -> None:
        self.name = config["bot"]["name"]
        self.port = config["adapters"]["http"]["port"]
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = folder / f"{self.name}.yaml"
        self.config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        self.log_path = folder / f"{self.name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Instance":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "chatcore.cli", "run", "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"})
        return self

    def health(self, timeout: float = 5) -> dict[str, Any] | None:
        """GET /health, or None while it does not answer."""
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=timeout) as r:
                return json.loads(r.read())
        except (OSError, urllib.error.URLError, ValueError):
            return None

    def wait_ready(self, deadline: float) -> None:
        while self.health(timeout=2) is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"instance {self.name} did not start:\n{self.log()[-3000:]}")
            time.sleep(0.2)

    def log(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM (requests in flight finish), then SIGKILL; the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_instances(configs: list[dict[str, Any]], folder: Path, *, timeout: float = 120) -> list[Instance]:
    """Start every instance at once and wait until each answers /health; on failure, stop them all."""
    instances = [Instance(c, folder).start() for c in configs]
    try:
        deadline = time.monotonic() + timeout
        for inst in instances:
            inst.wait_ready(deadline)
    except BaseException:
        for inst in instances:
            inst.stop(5)
        raise
    return instances


def seed_history(history_url: str, jsonl: Path) -> int:
    """Import seed-format conversations (the fine-tune's data and held-out set) as old news; the row count.

    The fine-tune mark is dated at the epoch, so the counter starts at 0 and no cooldown delays the first job.
    """
    from chatcore.store import Store

    with Store(history_url) as store:
        report = store.import_jsonl(jsonl)
        store.mark_finetune(at=1.0)
    return report.imported


def stored_replies(history_url: str, prefix: str) -> dict[str, list[str]]:
    """user text -> the reply of every row storing it, for user texts starting with `prefix` (read in SQL)."""
    import psycopg

    from chatcore.postgres import decode_text  # the store escapes NUL, which a sampled reply may hold

    with psycopg.connect(history_url) as conn:
        rows = conn.execute("SELECT user_text, reply_text FROM exchanges WHERE user_text LIKE %s",
                            (prefix.replace("%", r"\%").replace("_", r"\_") + "%",)).fetchall()
    out: dict[str, list[str]] = {}
    for text, reply in rows:
        out.setdefault(decode_text(text), []).append(decode_text(reply))
    return out


def finetune_jobs(history_url: str, models_dir: Path) -> dict[str, Any]:
    """What records fine-tune jobs: job folders (one per started job), the store's marks, the registry."""
    import psycopg

    from chatcore.registry import Registry

    jobs = sorted(p.name for p in (models_dir / "jobs").glob("*")) if (models_dir / "jobs").is_dir() else []
    with psycopg.connect(history_url) as conn:
        marks = conn.execute("SELECT checkpoint FROM finetunes WHERE checkpoint IS NOT NULL ORDER BY id").fetchall()
    history = Registry(models_dir).history()
    return {"jobs": jobs, "marks": [m[0] for m in marks], "serving": history["serving"],
            "promoted": [e["name"] for e in history["promoted"]], "rejected": [e["name"] for e in history["rejected"]]}
