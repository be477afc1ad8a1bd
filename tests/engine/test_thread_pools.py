"""The thread that loads the weights gives its OpenMP workers back, so the decoding thread's pool is the only one.

Each thread that runs a parallel torch op keeps its own pool of OpenMP workers; with
two pools on a machine with as many CPUs as one pool has threads, GNU OpenMP stops
spinning at barriers and every decode step slows (benchmarks/omp_threads.py). The
workers are threads of the process, so /proc/self/task counts them. Each case runs in
a fresh process: this one's pools depend on what earlier tests ran.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from chatcore import checkpoint
from chatcore.model import GPT, GPTConfig

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc/self/task"),
    pytest.mark.skipif("ATen parallel backend: OpenMP" not in torch.__config__.parallel_info(),
                       reason="torch without OpenMP has no per-thread worker pools"),
]

_COUNT = """
import json, os, sys, time
import torch
from chatcore.threads import release_thread_pool
from chatcore.weights import build_engine

def tasks(settle_at=None):
    # a released worker leaves on its own schedule: give it up to 5 s to be gone
    for _ in range(500):
        n = len(os.listdir("/proc/self/task"))
        if settle_at is None or n == settle_at:
            return n
        time.sleep(0.01)
    return n

torch.set_num_threads(2)
before = tasks()
torch.ones(512, 512).mul_(2)  # one parallel op: this thread now has a pool
with_pool = tasks()
released = release_thread_pool()
after_release = tasks(settle_at=before)
torch.ones(512, 512).mul_(2)  # parallel ops still work: a new pool
again = tasks()
release_thread_pool()
engine = build_engine({"checkpoint": sys.argv[1], "device": "cpu", "threads": 2, "quantize": sys.argv[2]})
after_build = tasks(settle_at=before)
print(json.dumps(dict(before=before, with_pool=with_pool, released=released, after_release=after_release,
                      again=again, after_build=after_build)))
"""


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=64))
    return checkpoint.save(model, tmp_path_factory.mktemp("pools") / "tiny")


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_building_an_engine_leaves_the_loading_thread_without_workers(tiny_checkpoint, quantize):
    out = subprocess.run([sys.executable, "-c", _COUNT, str(tiny_checkpoint), quantize],
                         capture_output=True, text=True, timeout=300, check=True)
    n = json.loads(out.stdout.strip().splitlines()[-1])
    assert n["with_pool"] == n["before"] + 1, n  # two threads: the caller and one worker
    assert n["released"] is True and n["after_release"] == n["before"], n
    assert n["again"] == n["before"] + 1, n
    assert n["after_build"] == n["before"], n  # the load ran parallel ops, and gave their worker back


def test_importing_chatcore_bounds_openmp_spinning_unless_the_operator_chose():
    code = "import os, chatcore; print(os.environ['GOMP_SPINCOUNT'])"
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "10000"
    env["GOMP_SPINCOUNT"] = "300000"
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "300000"
