"""Fine-tuning on several processes: DistributedDataParallel over gloo on 127.0.0.1, torchrun from the CLI.

Agreement (DDP on 2 ranks vs one process, same global batch of 4, dropout 0, 6 steps):
both runs do the same arithmetic in another order (each rank sums its rows, then
gloo averages two gradients), so fp32 rounding (~1e-7 relative) is the only
difference. Measured: losses within 1.3e-7 relative, weights within 2.9e-6 (they
moved by up to 1.1e-2). Asserted: losses at rel 1e-6, weights at atol 5e-5. The
weight bound is looser because AdamW's first steps move a weight by about
lr * sign(gradient): a rounding difference on a near-zero gradient element is
amplified, not damped.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from chatcore import checkpoint
from chatcore.cli import main
from chatcore.registry import Registry
from chatcore.tokenizer import Tokenizer
from chatcore.training import distributed
from chatcore.training.data import build_dataset, load_jsonl
from chatcore.training.job import JobSpec
from chatcore.training.options import TrainConfig
from chatcore.training.scheduler import JobScheduler
from chatcore.training.train import Resume, trained_state, train
from tests.engine_fixtures import tiny_model, torch_threads

LR = 3e-3
CFG = dict(max_iters=6, eval_interval=1, warmup_iters=2, batch_size=4, block_size=64, learning_rate=LR,
           min_lr=3e-4, dropout=0.0, eval_max_batches=2)


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def _setup(corpus: str, lora: bool):
    exchanges, _ = load_jsonl(corpus)
    model = tiny_model(0)
    if lora:
        from chatcore.lora import LoRAConfig, apply_lora

        apply_lora(model, LoRAConfig.from_dict({"rank": 4, "dropout": 0.0}))
    return model, build_dataset(exchanges, Tokenizer())


def _rank(rank: int, world: int, port: int, out: str, corpus: str, lora: bool, cfg: dict) -> None:
    """One rank of the DDP run: joins the group the way a torchrun worker does (from the environment)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    ranks = distributed.from_env()
    assert ranks.world == world and ranks.rank == rank
    model, data = _setup(corpus, lora)
    outcome = train(model, data, TrainConfig(**cfg), progress=False, ranks=ranks,
                    resume=Resume(Path(out) / f"resume-{rank}.pt", "ddp-test"))  # per-rank paths: who writes?
    distributed.close()
    torch.save({"history": outcome.history, "state": trained_state(model)}, str(Path(out) / f"rank{rank}.pt"))


@pytest.mark.slow  # two spawned processes
@pytest.mark.parametrize("lora, head_on_targets_only", [(False, True), (True, False)],
                         ids=["full-head-on-targets", "lora-full-forward"])
def test_ddp_on_two_ranks_matches_one_process(tmp_path, sample_conversations, lora, head_on_targets_only):
    cfg = {**CFG, "head_on_targets_only": head_on_targets_only, **({"method": "lora"} if lora else {})}
    model, data = _setup(str(sample_conversations), lora)
    single = train(model, data, TrainConfig(**cfg), progress=False)
    single_state = trained_state(model)

    mp.spawn(_rank, args=(2, distributed.free_port(), str(tmp_path), str(sample_conversations), lora, cfg),
             nprocs=2, join=True)
    r0, r1 = (torch.load(str(tmp_path / f"rank{r}.pt"), weights_only=True) for r in (0, 1))

    # only rank 0 wrote its resume state
    assert (tmp_path / "resume-0.pt").exists() and not (tmp_path / "resume-1.pt").exists()
    # the ranks stayed in step: identical weights and histories
    assert r0["state"].keys() == r1["state"].keys() == single_state.keys()
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    assert r0["history"] == r1["history"]
    # per-step losses (eval_interval 1: the train loss EMA after every step) and validation losses agree
    assert len(r0["history"]) == len(single.history) == CFG["max_iters"] + 1
    for a, b in zip(single.history, r0["history"]):
        assert a["iter"] == b["iter"]
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-6)
        if a["iter"]:
            assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-6)
    # the weights moved, and moved the same way
    diffs = torch.cat([(r0["state"][k] - single_state[k]).abs().flatten() for k in single_state])
    moved = torch.cat([(single_state[k] - v).abs().flatten() for k, v in _start_state(sample_conversations, lora).items()])
    loss_rel = [abs(b[k] / a[k] - 1) for a, b in zip(single.history[1:], r0["history"][1:]) for k in ("train_loss", "val_loss")]
    print(f"\nDDP vs one process: max |weight diff| {diffs.max():.2e} (moved up to {moved.max():.2e}); "
          f"max rel loss diff {max(loss_rel):.2e}")
    assert moved.max() > 2 * LR
    assert diffs.max() <= 5e-5


def _start_state(corpus, lora: bool) -> dict[str, torch.Tensor]:
    model, _ = _setup(str(corpus), lora)
    return {k: v for k, v in model.state_dict().items() if k in trained_state(model)}


def test_nproc_is_validated():
    assert TrainConfig.from_dict({}).nproc == 1
    with pytest.raises(ValueError, match="nproc"):
        TrainConfig.from_dict({"nproc": 0})
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig.from_dict({"nproc": 4, "batch_size": 2})


def test_torchrun_command_stays_on_loopback():
    cmd = distributed.torchrun_command(2, "chatcore.training.job", ["spec.json"])
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    assert cmd[cmd.index("--master-addr") + 1] == "127.0.0.1"
    assert "--standalone" not in cmd and not any("localhost" in c or "rdzv" in c for c in cmd)
    assert cmd[cmd.index("--nproc-per-node") + 1] == "2" and cmd[-3:] == ["-m", "chatcore.training.job", "spec.json"]


def _config(tmp_path: Path, base: Path, **training) -> Path:
    config = tmp_path / "bot.yaml"
    opts = {"max_iters": 6, "eval_interval": 3, "warmup_iters": 1, "batch_size": 4, "block_size": 64,
            "learning_rate": 0.003, "min_lr": 0.0003, "eval_max_batches": 4, **training}
    config.write_text(f"bot:\n  data_dir: {tmp_path / 'data'}\nmodel:\n  checkpoint: {base}\n  device: cpu\n"
                      "plugins:\n  auto_finetune:\n    threads: 2\n    gate:\n      eval_max_batches: 4\n"
                      "    training:\n" + "".join(f"      {k}: {v}\n" for k, v in opts.items()))
    return config


@pytest.mark.slow  # torchrun with two ranks, then the gate
def test_finetune_nproc_2_runs_torchrun_and_gates_one_candidate(tmp_path, capsys, sample_conversations):
    base = checkpoint.save(tiny_model(0, block_size=128), tmp_path / "base")
    config = _config(tmp_path, base)
    assert main(["history", "import", "-c", str(config), str(sample_conversations)]) == 0
    capsys.readouterr()
    assert main(["finetune", "-c", str(config), "--nproc", "2", "--json"]) == 0
    out = capsys.readouterr()
    result = json.loads(out.out)
    assert result["status"] in ("promoted", "rejected") and result["gate"]["reason"]
    models = tmp_path / "data" / "models"
    cand = Path(result["candidate"])
    # rank 0 alone wrote: one candidate, one sidecar, and the job's one result
    assert sorted(p.name for p in models.glob("finetuned_*")) == sorted([cand.name, cand.with_suffix(".json").name])
    _, meta = checkpoint.load(cand)
    assert meta["provenance"]["training"]["nproc"] == 2 and meta["provenance"]["lineage"]["exchange_ids"]
    assert Registry(models).history()["promoted" if result["status"] == "promoted" else "rejected"]
    assert not (models / ".finetune-resume.pt").exists()
    job = models / "jobs" / result["job"]
    assert sorted(p.name for p in job.iterdir()) == ["log.txt", "result.json", "spec.json"]
    assert json.loads((job / "spec.json").read_text())["train"]["nproc"] == 2
    print(out.err)


@pytest.mark.slow  # torchrun with two ranks, one killed
def test_a_killed_rank_fails_the_job_and_leaves_serving(tmp_path, sample_conversations):
    d = tmp_path / "models"
    serving = checkpoint.save(tiny_model(1, block_size=128), d / "finetuned_20260101_000000")
    Registry(d).promote(serving)
    base = checkpoint.save(tiny_model(0, block_size=128), tmp_path / "base")
    before = {p.name for p in d.iterdir() if p.name not in ("jobs", ".finetune.lock")}
    sched = JobScheduler(d, threads=2)
    job = sched.start(JobSpec(models_dir=str(d), base=str(base), jsonl=[str(sample_conversations)], progress=False,
                              train=dict(max_iters=100_000, eval_interval=100_000, batch_size=2, block_size=32,
                                         nproc=2)))
    _wait_in_log(job, "fine-tune:")  # rank 0 is in the training loop
    time.sleep(0.5)
    rank1 = _rank_pid(job.pid, 1)
    os.kill(rank1, signal.SIGKILL)
    result = job.wait(120)
    assert result["status"] == "failed", result
    assert Registry(d).current() == serving
    assert {p.name for p in d.iterdir() if p.name not in ("jobs", ".finetune.lock")} == before
    assert not sched.busy()


@pytest.mark.slow  # torchrun with two ranks, its launcher killed
def test_a_killed_launcher_takes_its_ranks_and_lock_with_it(tmp_path, sample_conversations):
    d = tmp_path / "models"
    base = checkpoint.save(tiny_model(0, block_size=128), tmp_path / "base")
    sched = JobScheduler(d, threads=2)
    job = sched.start(JobSpec(models_dir=str(d), base=str(base), jsonl=[str(sample_conversations)], progress=False,
                              train=dict(max_iters=100_000, eval_interval=100_000, batch_size=2, block_size=32,
                                         nproc=2)))
    _wait_in_log(job, "fine-tune:")
    ranks = [_rank_pid(job.pid, r) for r in (0, 1)]
    os.kill(job.pid, signal.SIGKILL)
    assert job.wait(30)["status"] == "failed"
    end = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() and "Z" not in _state(pid) for pid in ranks):
        assert time.monotonic() < end, "a rank outlived its launcher"
        time.sleep(0.1)
    assert not sched.busy() and not list(d.glob("finetuned_*")) and Registry(d).current() is None


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


@pytest.mark.slow  # torchrun with two ranks, twice
def test_cancel_stops_every_rank_and_the_next_job_resumes(tmp_path, sample_conversations):
    d = tmp_path / "models"
    base = checkpoint.save(tiny_model(0, block_size=128), tmp_path / "base")
    sched = JobScheduler(d, threads=2)
    spec = JobSpec(models_dir=str(d), base=str(base), jsonl=[str(sample_conversations)], progress=False,
                   train=dict(max_iters=100_000, eval_interval=5, eval_max_batches=2, patience=100_000,
                              batch_size=2, block_size=32, nproc=2))
    job = sched.start(spec)
    _wait_in_log(job, "iter 5:")
    result = job.cancel(grace=60)
    assert result["status"] == "cancelled", result
    assert not list(d.glob("finetuned_*")) and (d / ".finetune-resume.pt").exists()
    assert Registry(d).current() is None and not sched.busy()
    again = sched.start(spec)
    _wait_in_log(again, "resumed from iteration")
    assert again.cancel(grace=60)["status"] == "cancelled"


def _wait_in_log(job, text: str) -> None:
    log = job.dir / "log.txt"
    end = time.monotonic() + 120
    while text not in log.read_text():
        assert job.running and time.monotonic() < end, log.read_text()
        time.sleep(0.2)


def _rank_pid(launcher: int, rank: int) -> int:
    """The pid of torchrun's worker with RANK=rank (its children, read from /proc)."""
    children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    for pid in children:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in env:
            return int(pid)
    raise AssertionError(f"no rank {rank} among {children}")
