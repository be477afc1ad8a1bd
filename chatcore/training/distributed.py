"""Fine-tuning on several processes: torchrun starts them, DistributedDataParallel keeps them in step.

``training.nproc: N`` (or ``chatcore finetune --nproc N``) runs the job worker
(``python -m chatcore.training.job``) under ``torchrun`` on this machine: N
ranks, gloo on CPU, NCCL with one GPU per rank on CUDA. Every rank draws the
same global batch (same seed) and trains on its own rows of it, so batch size,
learning rate and schedule mean what they mean in one process. Rank 0 alone
writes (resume state, candidate, sidecar) and runs the preference stage, the gate
and the registry, once, after the other ranks have left.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class Ranks:
    """This process's place in a distributed run (rank 0 of 1 when there is none)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch (every world-th row, as DistributedSampler deals them)."""
        return batch[self.rank::self.world]

    def _reduce(self, values: tuple[float, ...], op: dist.ReduceOp) -> list[float]:
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op)
        return t.tolist()

    def max(self, *values: float) -> list[float]:
        """The largest of each value over all ranks (a shared clock, a stop any rank asked for)."""
        return self._reduce(values, dist.ReduceOp.MAX)

    def sum(self, *values: float) -> list[float]:
        return self._reduce(values, dist.ReduceOp.SUM)

    def gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's copy of a same-shaped tensor, on the CPU, in rank order."""
        mine = t.to(self.device)
        out = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(out, mine)
        return [x.cpu() for x in out]

    def same(self, digest: str) -> bool:
        """Whether every rank holds the same hex digest (e.g. of its training data)."""
        x = int(digest[:15], 16)  # 60 bits fit an int64; max(x) == -max(-x) only when all agree
        t = torch.tensor([x, -x], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t[0]) == x and int(-t[1]) == x


def from_env() -> Ranks:
    """Join the process group torchrun describes in the environment; rank 0 of 1 outside torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        backend, device = "nccl", torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        backend, device = "gloo", torch.device("cpu")
    if not dist.is_initialized():
        # a dead peer is noticed at once on loopback; the timeout only bounds a hung one
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(minutes=10))
    return Ranks(rank, world, local_rank, device)


def close() -> None:
    """Leave the process group (rank 0 then goes on alone to the gate)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def torchrun_command(nproc: int, module: str, args: list[str]) -> list[str]:
    """``torchrun`` for `nproc` ranks of ``python -m module args`` on this machine, on 127.0.0.1 only.

    A static rendezvous on a loopback port (not ``--standalone``, whose endpoint is
    "localhost"); no restarts: a rank that dies fails the job, and a failed job
    writes no candidate."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
            "--master-addr", LOOPBACK, "--master-port", str(free_port()), "--max-restarts", "0",
            "-m", module, *args]


def torchrun_env(nproc: int, threads: int | None) -> dict[str, str]:
    """Environment for the ranks: each gets its share of the thread budget; gloo talks over loopback."""
    env = {"OMP_NUM_THREADS": str(max(1, (threads or nproc) // nproc))}
    env["MKL_NUM_THREADS"] = env["OMP_NUM_THREADS"]
    if sys.platform.startswith("linux") and "GLOO_SOCKET_IFNAME" not in os.environ:
        env["GLOO_SOCKET_IFNAME"] = "lo"  # else gloo picks the interface the hostname resolves to
    return env


def check_nproc(nproc: int) -> None:
    """Refuse a rank count this machine cannot run (on CUDA: one GPU per rank)."""
    if nproc < 1:
        raise ValueError("training.nproc must be at least 1")
    if nproc > 1 and torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise ValueError(f"training.nproc is {nproc} but this machine has {torch.cuda.device_count()} GPU(s): "
                         "NCCL needs one GPU per rank")
