"""Peak RSS of serving 1 and 8 conversations: the KV cache on demand vs preallocated for the maximum batch.

GPT-2 124M shapes, random weights, served as a bot serves them (`build_engine`,
then `chatcore.serving.Generator` with ``max_batch`` 8, its default): B
conversations of a 32-token prompt and N new tokens each (no stop rule fires),
submitted together. Each case runs in its own fresh process, so its peak RSS
(VmHWM) is its own, loading included. "preallocated" swaps in the cache the
scheduler had before (``on_demand=False``: max_batch x block_size, zeroed, all
resident). Cases run interleaved; the ratios compare cases of the same run.

    python benchmarks/kv_memory.py                  # fp32 and int8, 150 new tokens
    python benchmarks/kv_memory.py --new-tokens 32  # a quicker run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import peak_rss_mb  # benchmarks/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parents[1]


def worker(checkpoint: str, quantize: str, on_demand: bool, batch: int, new_tokens: int, threads: int) -> None:
    import asyncio

    import torch

    from chatcore.sampling import SamplingParams
    from chatcore.serving import Generator
    from chatcore.weights import build_engine

    from engine import prompt_ids

    torch.set_num_threads(threads)
    engine = build_engine({"checkpoint": checkpoint, "device": "cpu", "dtype": "float32", "threads": threads,
                           "quantize": quantize})
    generator = Generator(engine, max_batch=8)
    sched = generator.backend
    if not on_demand:
        sched.cache = engine.model.new_cache(sched.max_batch, max_len=sched.block_size, on_demand=False)
    params = SamplingParams(temperature=0.8, top_k=200, max_new_tokens=new_tokens, seed=1234,
                            stop_at_newline=False, stop=[])
    prompts = [engine.tokenizer.decode(prompt_ids(32 + i)) for i in range(batch)]

    async def go():
        outs = await asyncio.gather(*(generator.generate(p, params) for p in prompts))
        await generator.close()
        return outs

    asyncio.run(go())
    print(json.dumps(dict(quantize=quantize, on_demand=on_demand, batch=batch, peak_rss_mb=round(peak_rss_mb(), 1))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=150)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quantize", default="none,int8", help="comma-separated: none (fp32), int8")
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        checkpoint, quantize, on_demand, batch = args.worker
        worker(checkpoint, quantize, on_demand == "1", int(batch), args.new_tokens, args.threads)
        return
    from engine import write_models

    rss: dict[tuple[str, int, bool], float] = {}
    with tempfile.TemporaryDirectory(prefix="chatcore-kvmem-") as d:
        native, _ = write_models(Path(d))
        for quantize in args.quantize.split(","):
            for batch in (1, 8):
                for on_demand in (False, True):  # interleaved: each pair back to back
                    cmd = [sys.executable, __file__, "--worker", str(native), quantize, str(int(on_demand)), str(batch),
                           "--new-tokens", str(args.new_tokens), "--threads", str(args.threads)]
                    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                    if proc.returncode != 0:
                        sys.exit(f"worker failed:\n{proc.stderr[-3000:]}")
                    rec = json.loads(proc.stdout.strip().splitlines()[-1])
                    rss[(quantize, batch, on_demand)] = rec["peak_rss_mb"]
                    print(json.dumps(rec), flush=True)
    print(f"peak RSS MiB, GPT-2 124M, 32-token prompts, {args.new_tokens} new tokens, Generator max_batch 8")
    for quantize in args.quantize.split(","):
        for batch in (1, 8):
            before, after = rss[(quantize, batch, False)], rss[(quantize, batch, True)]
            print(f"{'fp32' if quantize == 'none' else quantize:>5} batch {batch}: preallocated {before:7.0f}  "
                  f"on demand {after:7.0f}  ratio {after / before:.2f}")


if __name__ == "__main__":
    main()
