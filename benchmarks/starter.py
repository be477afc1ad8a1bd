"""The offline starter model: held-out loss and sample replies for a few recipes, same wall-clock budget.

Each variant is built by `build_starter` itself (the path `chatcore chat` takes),
with the same budget in minutes, then scored on one fixed held-out set: the reply
tokens of the validation conversations of the default corpus (all of them, full
50257-token vocabulary), and asked the same prompts with a fixed sampling seed.

    python benchmarks/starter.py --seconds 100                  # before vs after
    python benchmarks/starter.py --seconds 100 --variants after --json

Timings on a shared machine drift: compare variants within one run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

PROMPTS = ("hi", "how are you?", "what did you do this weekend?", "do you like music?")
# the starter's recipe before the wall-clock budget (issue 9), for the comparison
BEFORE = dict(n_layer=4, n_head=4, n_embd=128, batch_size=8, learning_rate=2e-3, output_vocab=8192,
              warmup_iters=100)
VARIANTS = {  # "after" is StarterConfig's defaults
    "before": BEFORE,
    "after": {},
    "lr": dict(BEFORE, learning_rate=4e-3, warmup_iters=30, max_exchanges=15000),
    "small": dict(BEFORE, n_layer=3, n_head=3, n_embd=96, learning_rate=4e-3, warmup_iters=30, max_exchanges=15000),
}


def main() -> int:
    import torch

    from chatcore import checkpoint
    from chatcore.engine import Engine
    from chatcore.prompt import render_prompt
    from chatcore.sampling import SamplingParams
    from chatcore.tokenizer import Tokenizer
    from chatcore.training.data import build_dataset
    from chatcore.training.starter import StarterConfig, build_starter, chitchat_exchanges
    from chatcore.training.train import evaluate

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=100, help="wall-clock budget per variant")
    ap.add_argument("--variants", default="before,after", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    default = StarterConfig()
    held_out = build_dataset(chitchat_exchanges(default.max_exchanges), Tokenizer(), loss_on="all",
                             val_fraction=0.02, seed=default.seed).val
    rows = []
    for name in args.variants.split(","):
        cfg = StarterConfig(**VARIANTS[name])
        cfg.minutes = args.seconds / 60
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            path = build_starter(Path(d) / "starter", cfg=cfg, threads=args.threads, progress=False)
            seconds = time.perf_counter() - t0
            model, meta = checkpoint.load(path)
        loss = evaluate(model, held_out, batch_size=16, block_size=128)
        engine = Engine(model, device="cpu")
        params = SamplingParams(seed=0, max_new_tokens=40)
        replies = {p: engine.generate(render_prompt(p), params).strip() for p in PROMPTS}
        prov = meta["provenance"]
        row = {"variant": name, "seconds": round(seconds, 1), "iterations": prov["iteration"],
               "held_out_loss": round(loss, 4), "replies": replies, "config": asdict(cfg)}
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print(f"{name:8} {seconds:6.1f} s  {prov['iteration']:6d} it  held-out loss {loss:.3f}", flush=True)
            for p, r in replies.items():
                print(f"    {p!r:34} -> {r!r}", flush=True)
        torch.manual_seed(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
