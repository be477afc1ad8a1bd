"""Prompts arriving together: one forward over rows of different lengths, padded vs packed.

Continuous batching runs the prompts that are waiting in one forward
(`chatcore.batching`, `prefill_tokens`). Their rows differ in length; padded, every
matrix product runs on rows x longest tokens. `GPT.forward_cached` packs them
(``pack=True``, the default): only the real tokens go through the layers, attention
still sees them padded. GPT-2 124M shapes, random weights, fp32 and int8, the two
layouts interleaved for ``--rounds`` rounds (medians), in one run.

    python benchmarks/prefill.py                      # six prompts of 22-128 tokens
    python benchmarks/prefill.py --lengths 128,128    # equal rows: nothing to pack (same path)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

from _common import build_model  # benchmarks/ is on sys.path when a script runs

import chatcore  # noqa: F401  before torch, as the `chatcore` command: its OpenMP default is read when torch loads
import torch  # noqa: E402

from chatcore.quant import quantize_int8  # noqa: E402


def forward_ms(model, idx: torch.Tensor, lengths: list[int], pack: bool) -> float:
    cache = model.new_cache(len(lengths), max_len=model.config.block_size)
    started = time.perf_counter()
    model.forward_cached(idx, cache, rows=list(range(len(lengths))), n_new=lengths, pack=pack)
    return 1000 * (time.perf_counter() - started)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="128,40,75,22,60,100", help="prompt tokens of each row, comma-separated")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lengths = [int(n) for n in args.lengths.split(",")]
    torch.manual_seed(0)
    fp32 = build_model().eval()
    models = {"fp32": fp32, "int8": quantize_int8(copy.deepcopy(fp32))}
    idx = torch.randint(0, 50257, (len(lengths), max(lengths)))
    print(f"{len(lengths)} prompts of {lengths} tokens in one forward: {sum(lengths)} real of "
          f"{len(lengths) * max(lengths)} padded; {args.threads} threads, medians of {args.rounds} interleaved rounds")
    with torch.inference_mode():
        for name, model in models.items():
            forward_ms(model, idx, lengths, True)  # warm-up: kernels, allocator
            padded, packed = [], []
            for _ in range(args.rounds):
                padded.append(forward_ms(model, idx, lengths, False))
                packed.append(forward_ms(model, idx, lengths, True))
            a, b = statistics.median(padded), statistics.median(packed)
            print(f"  {name}: padded {a:.0f} ms, packed {b:.0f} ms -> packed is {a / b:.2f}x faster")


if __name__ == "__main__":
    main()
