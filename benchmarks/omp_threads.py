"""Does a second thread that ran a 2-thread torch op slow decoding on the serving thread?

`chatcore.serving.Generator` decodes on its batching thread while the weights were
loaded on another (the main thread). GNU OpenMP gives every thread that starts a
parallel region its own pool of workers, and once it manages more threads than
there are CPUs it stops spinning at barriers (100 spins instead of
GOMP_SPINCOUNT's, then a futex sleep), so every parallel op of a decode step pays a
wake-up. This times one decode step (GPT-2 124M shapes, random weights, a 32-token
prompt in the KV cache) in fresh processes, interleaved over --rounds:

- ``main``: built and decoded on the main thread (one pool);
- ``worker-after-main``: built on the main thread (which also ran a 2-thread op),
  decoded on another thread: what the bot did before `chatcore.threads` (two pools);
- ``worker-released``: the same, but the main thread then called
  `chatcore.threads.release_thread_pool` (as `build_engine` does now): one live pool;
- ``worker-released-1``: that, decoding on one thread (what `ThreadTuner` picks when
  other work makes it faster).

Every mode imports chatcore before torch, so GNU OpenMP reads chatcore's
GOMP_SPINCOUNT default (10,000). Its own default, 300,000 spins (milliseconds),
was the reason an earlier attempt with one pool was reverted: on a busy machine
(load 5 on 2 cores) served decode fell to 0.07-0.13x, the spinning workers taking
the CPU everything else needed. ``--busy N`` runs N busy-looping processes beside
the measurements, to see that case again.

    python benchmarks/omp_threads.py                    # plain and packed layouts
    python benchmarks/omp_threads.py --layouts plain,int8 --rounds 5 --busy 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from _common import build_model, busy_processes  # benchmarks/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parents[1]
MODES = ("main", "worker-after-main", "worker-released", "worker-released-1")


def build(layout: str):
    import torch

    from chatcore.cpu_linear import pack_linears
    from chatcore.engine import prepare_for_inference
    from chatcore.quant import quantize_int8

    model = prepare_for_inference(build_model(), torch.device("cpu"), torch.float32)
    if layout == "packed":
        pack_linears(model)
    elif layout == "int8":
        quantize_int8(model)
    return model


def worker(mode: str, layout: str, threads: int, steps: int) -> None:
    import chatcore  # noqa: F401  before torch, as the `chatcore` command: its OpenMP default is read when torch loads
    import torch

    from chatcore.threads import release_thread_pool

    torch.set_num_threads(threads)
    box: dict = {"model": build(layout)}
    torch.ones(2048, 2048).add_(1)  # one more 2-thread op on the main thread
    if mode.startswith("worker-released"):
        release_thread_pool()
    model = box["model"]

    def decode() -> None:
        if mode == "worker-released-1":
            torch.set_num_threads(1)
        with torch.inference_mode():
            cache = model.new_cache(1, max_len=64 + steps)
            idx = torch.randint(0, 50000, (1, 32), generator=torch.Generator().manual_seed(0))
            model.forward_cached(idx, cache)
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                model.forward_cached(idx[:, :1], cache)
                times.append(time.perf_counter() - t0)
        box["ms"] = statistics.median(times) * 1e3

    if mode == "main":
        decode()
    else:
        t = threading.Thread(target=decode)
        t.start()
        t.join()
    print(json.dumps(dict(mode=mode, layout=layout, ms_per_token=round(box["ms"], 2))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", default="plain,packed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--busy", type=int, default=0, help="N busy-looping processes beside the measurements")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1], args.threads, args.steps)
        return
    results: dict[tuple[str, str], list[float]] = {}
    loads = []
    with busy_processes(args.busy):
        for r in range(args.rounds):
            cases = [(m, lay) for lay in args.layouts.split(",") for m in MODES]
            for mode, layout in cases if r % 2 == 0 else cases[::-1]:
                loads.append(os.getloadavg()[0])
                out = subprocess.run([sys.executable, __file__, "--worker", mode, layout, "--threads", str(args.threads),
                                      "--steps", str(args.steps)], capture_output=True, text=True, cwd=ROOT, check=True)
                rec = json.loads(out.stdout.strip().splitlines()[-1])
                results.setdefault((mode, layout), []).append(rec["ms_per_token"])
    print(f"decode ms/token (median of {args.rounds} rounds), {args.threads} threads; "
          f"load average {min(loads):.1f}-{max(loads):.1f}" + (f"; {args.busy} busy-looping processes" if args.busy else ""))
    for layout in args.layouts.split(","):
        base = statistics.median(results[("main", layout)])
        for mode in MODES:
            ms = statistics.median(results[(mode, layout)])
            print(f"  {layout:<7} {mode:<18} {ms:8.2f} ms   x{ms / base:.2f} of main   (rounds: {results[(mode, layout)]})")


if __name__ == "__main__":
    main()
