"""Runs fine-tune jobs in a separate process, one at a time, so the bot keeps answering.

- One job at a time: an exclusive ``flock`` on ``<models>/.finetune.lock``. The
  parent takes it, the worker inherits the open file and the parent lets go, so
  the lock lives exactly as long as the worker: a crashed or killed worker (even
  ``kill -9``) releases it with its last file descriptor, and no stale lock can
  block the next job. The lock file holds the worker's pid, for people.
  Instances sharing a PostgreSQL history (``lock_url``) also hold a PostgreSQL
  advisory lock for the job's life, so one job runs across all of them (a file
  lock on a shared folder is not to be trusted across machines).
- Cancellable: `Job.cancel` sends SIGTERM; the worker stops at the next step and
  writes nothing; SIGKILL follows if it does not exit in time.
- Thread budget: the worker caps torch/OpenMP threads (default: all cores but
  one) and lowers its priority, so serving keeps a core.
- Nothing half-written is ever visible: the worker writes a candidate under a
  hidden temporary name and renames it into place when complete
  (`chatcore.checkpoint.save`); the serving model changes only through
  `chatcore.registry.Registry` after the gate. What dead workers left (temp files,
  orphan candidates the registry never recorded) is removed when the next job
  starts, when the bot starts and by ``chatcore finetune`` (`clean_leftovers`).
- Resumable: a killed or cancelled job continues from its last evaluation
  (``<models>/.finetune-resume.pt``, see `chatcore.training.train.Resume`).

The worker is ``python -m chatcore.training.job SPEC.json`` (see `job.py`), or
``torchrun`` running N of them when ``training.nproc`` is N
(`chatcore.training.distributed`): the launcher then holds the lock, and a rank
that dies fails the whole job before any candidate exists. Each
job has a folder ``<models>/jobs/<id>/`` with ``spec.json``, ``log.txt`` and,
when it ends, ``result.json``.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from ..store import is_postgres_url, without_password
from .job import RESUME_NAME, JobSpec
from .options import TrainConfig

LOCK_NAME = ".finetune.lock"


class JobBusy(RuntimeError):
    """A fine-tune job is already running."""


def default_threads() -> int:
    return max(1, (os.cpu_count() or 2) - 1)


class Job:
    """A running (or finished) worker process."""

    def __init__(self, job_id: str, folder: Path, proc: subprocess.Popen, held: Any = None) -> None:
        self.id = job_id
        self.dir = folder
        self.proc = proc
        self._held = held  # the session holding the cross-instance job lock, closed when the worker ends
        self.started_at = time.time()
        self._result: dict[str, Any] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def poll(self) -> dict[str, Any] | None:
        """The result once the worker has exited, else None."""
        if self._result is None and self.proc.poll() is not None:
            self._result = self._read_result()
            if self._held is not None:
                self._held.close()  # after the worker wrote its fine-tune mark: the next job sees the reset count
                self._held = None
        return self._result

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        self.proc.wait(timeout)
        result = self.poll()
        assert result is not None
        return result

    async def wait_async(self, interval: float = 0.5) -> dict[str, Any]:
        """Wait without blocking the event loop."""
        while (result := self.poll()) is None:
            await asyncio.sleep(interval)
        return result

    def cancel(self, grace: float = 15.0) -> dict[str, Any]:
        """Stop the job: SIGTERM, then SIGKILL after `grace` seconds. Serving is never touched."""
        if self.running:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.wait()

    def progress(self) -> str:
        """The last line the worker logged."""
        try:
            lines = (self.dir / "log.txt").read_text(encoding="utf-8", errors="replace").strip().splitlines()
        except OSError:
            return ""
        return lines[-1] if lines else ""

    def _read_result(self) -> dict[str, Any]:
        try:
            return json.loads((self.dir / "result.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            rc = self.proc.returncode
            how = f"killed by signal {-rc}" if rc is not None and rc < 0 else f"exited with code {rc}"
            return {"status": "failed", "error": f"worker {how} without a result (see {self.dir / 'log.txt'})",
                    "job": self.id}


class JobScheduler:
    """Starts fine-tune workers for one models folder; `start` raises `JobBusy` while one runs."""

    def __init__(self, models_dir: str | os.PathLike, *, threads: int | None = None,
                 keep_jobs: int = 10, lock_url: str | None = None) -> None:
        """`lock_url`: the PostgreSQL history the instances share (an SQLite path needs no more than the file lock)."""
        self.lock_url = lock_url if is_postgres_url(lock_url) else None
        self.models_dir = Path(models_dir).expanduser()
        self.threads = threads or default_threads()
        self.keep_jobs = keep_jobs
        self.current: Job | None = None

    @property
    def lock_path(self) -> Path:
        return self.models_dir / LOCK_NAME

    def busy(self) -> bool:
        """Whether any process (this one or another, or another instance on the same PostgreSQL) holds the job lock."""
        if self.lock_url is not None:
            from chatcore import postgres

            held = postgres.try_lock(self.lock_url, postgres.JOB_LOCK)
            if held is None:
                return True
            held.close()
        self.models_dir.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
            return False

    def _hold_instance_lock(self) -> Any:
        if self.lock_url is None:
            return None
        from chatcore import postgres

        held = postgres.try_lock(self.lock_url, postgres.JOB_LOCK)
        if held is None:
            raise JobBusy("a fine-tune job is already running on another instance")
        return held

    def start(self, spec: JobSpec) -> Job:
        nproc = TrainConfig.from_dict(spec.train).nproc  # bad options fail here, before any lock or folder
        if nproc > 1:
            from .distributed import check_nproc

            check_nproc(nproc)
        self.models_dir.mkdir(parents=True, exist_ok=True)
        held = self._hold_instance_lock()
        lock = open(self.lock_path, "a+")
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise JobBusy(f"a fine-tune job is already running ({_lock_owner(self.lock_path)})") from None
            self._clean_leftovers()
            job_id = time.strftime("%Y%m%d_%H%M%S") + f"_{os.getpid()}"
            folder = self.models_dir / "jobs" / job_id
            folder.mkdir(parents=True)
            spec = JobSpec(**{**asdict(spec), "models_dir": str(self.models_dir),
                              "threads": spec.threads or self.threads})
            secret: dict[str, str] = {}
            if is_postgres_url(spec.store):  # spec.json is a file for people to read: no password in it
                store, password = without_password(spec.store)
                if password is not None:
                    spec, secret = replace(spec, store=store), {"PGPASSWORD": password}
            (folder / "spec.json").write_text(json.dumps(asdict(spec), indent=2), encoding="utf-8")
            env = {**os.environ, "OMP_NUM_THREADS": str(spec.threads), "MKL_NUM_THREADS": str(spec.threads),
                   "PYTHONUNBUFFERED": "1", **secret}
            command = [sys.executable, "-m", "chatcore.training.job", str(folder / "spec.json"),
                       "--lock-fd", str(lock.fileno())]
            if nproc > 1:
                from .distributed import torchrun_command, torchrun_env

                command = torchrun_command(nproc, "chatcore.training.job", [str(folder / "spec.json")])
                env.update(torchrun_env(nproc, spec.threads))
            with open(folder / "log.txt", "ab") as logf:
                proc = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                    pass_fds=(lock.fileno(),), env=env,  # same cwd: relative paths in the spec still hold
                )
            lock.seek(0)
            lock.truncate()
            lock.write(f"pid {proc.pid} job {job_id}\n")
            lock.flush()
        except BaseException:
            if held is not None:
                held.close()
            raise
        finally:
            lock.close()  # the worker holds the lock from here on
        self.current = Job(job_id, folder, proc, held)
        return self.current

    def clean(self) -> bool:
        """`clean_leftovers` now, unless a job runs (then it is not a leftover); True if cleaned."""
        self.models_dir.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            try:
                clean_leftovers(self.models_dir)
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
        return True

    def _clean_leftovers(self) -> None:
        """Leftovers of dead workers, and old job folders. Called holding the lock."""
        clean_leftovers(self.models_dir)
        jobs = sorted((self.models_dir / "jobs").glob("*")) if (self.models_dir / "jobs").is_dir() else []
        for old in jobs[: max(0, len(jobs) - self.keep_jobs + 1)]:
            shutil.rmtree(old, ignore_errors=True)


def clean_leftovers(models_dir: Path) -> list[str]:
    """Remove what crashed fine-tunes left in ``models_dir``; the names removed. Call it holding the job lock.

    That is: temporary files of interrupted writes, and orphan candidates (a
    ``finetuned_*`` weights file or sidecar that the registry never recorded: the
    job died between writing it and the gate's verdict). A candidate is only a
    complete pair that the registry knows. With an unreadable registry no
    candidate is touched. The resume checkpoint is kept: it is how a job resumes.
    """
    from ..registry import CANDIDATE_PREFIX, Registry, RegistryError

    removed = []
    for p in [*models_dir.glob(f".{CANDIDATE_PREFIX}*.tmp"), *models_dir.glob(f".{RESUME_NAME}.*.tmp")]:
        p.unlink(missing_ok=True)  # checkpoint.atomic_write's temporary names
        removed.append(p.name)
    try:
        history = Registry(models_dir).history()
    except RegistryError:  # unreadable or garbage: touch no candidate
        return removed
    known = {e["name"] for e in history["promoted"] + history["rejected"]} | {history["serving"]}
    for p in [*models_dir.glob(f"{CANDIDATE_PREFIX}*.safetensors"), *models_dir.glob(f"{CANDIDATE_PREFIX}*.json")]:
        if p.with_suffix(".safetensors").name not in known:
            p.unlink(missing_ok=True)
            removed.append(p.name)
    return removed


def _lock_owner(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip() or "pid unknown"
    except OSError:
        return "pid unknown"
