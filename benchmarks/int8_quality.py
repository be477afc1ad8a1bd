"""What serving int8 costs in quality, measured on the weights exactly as the bot loads them.

For each checkpoint: the fp32 model and the int8 model (`model.quantize: none` and
`int8` through `chatcore.weights.build_engine`, i.e. quantized while loading), then
`chatcore.quant.quality` on held-out sample conversations: perplexity of both and
how often their greedy next tokens agree. ``--finetune CKPT`` first fine-tunes CKPT
on the other sample conversations (a model that has learned this data) and measures
that too.

    python benchmarks/int8_quality.py starter.safetensors --finetune starter.safetensors --steps 60
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sample_conversations.jsonl"
PPL_TOLERANCE, MIN_AGREEMENT = 0.02, 0.95  # the targets of issue 16


def documents(path: Path = DATA) -> tuple[list[list[int]], list[list[int]]]:
    """(train, held out): sample conversations rendered as the bot trains on them, as token ids."""
    from chatcore.prompt import render_exchange
    from chatcore.tokenizer import Tokenizer

    tok = Tokenizer()
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    docs = [tok.encode(render_exchange(r["user"], r["assistant"])) for r in rows]
    return docs[:300], docs[300:]


def served_quality(checkpoint: str | Path, held_out: list[list[int]]) -> dict:
    """fp32 vs int8 as `build_engine` serves them on the CPU."""
    from chatcore.quant import quality
    from chatcore.weights import build_engine

    fp32 = build_engine({"checkpoint": str(checkpoint), "device": "cpu", "quantize": "none"}).model
    int8 = build_engine({"checkpoint": str(checkpoint), "device": "cpu", "quantize": "int8"}).model
    q = quality(fp32, int8, held_out, block_size=min(256, fp32.config.block_size))
    return dict(checkpoint=str(checkpoint), tokens=q.tokens, ppl_fp32=round(q.reference_ppl, 3),
                ppl_int8=round(q.candidate_ppl, 3), ppl_change=round(q.ppl_change, 5),
                top1_agreement=round(q.top1_agreement, 4),
                within_targets=abs(q.ppl_change) <= PPL_TOLERANCE and q.top1_agreement >= MIN_AGREEMENT)


def finetune(checkpoint: str | Path, train: list[list[int]], steps: int, out: Path) -> Path:
    """A short full fine-tune on `train` (batch 8 x 128 tokens, AdamW 3e-4); returns the saved checkpoint."""
    from chatcore import checkpoint as ckpt
    from chatcore.hf import load_any

    model, meta = load_any(checkpoint)
    model.train()
    stream = torch.tensor([t for d in train for t in d])
    window = min(128, model.config.block_size)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - window - 1, (8,), generator=g)
        batch = torch.stack([stream[s : s + window + 1] for s in starts])
        _, loss = model(batch[:, :-1].contiguous(), batch[:, 1:].contiguous())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    base = (meta.get("provenance") or {}).get("base_model") or Path(checkpoint).stem
    return ckpt.save(model.eval(), out, base_model=base, iteration=steps, train_loss=loss.item())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="*", help="checkpoints to measure (native, .pt or Hugging Face directory)")
    ap.add_argument("--finetune", help="fine-tune this checkpoint on 300 sample conversations, then measure it")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    train, held_out = documents()
    paths = list(args.checkpoints)
    with tempfile.TemporaryDirectory() as tmp:
        if args.finetune:
            t0 = time.perf_counter()
            paths.append(finetune(args.finetune, train, args.steps, Path(tmp) / "finetuned"))
            print(f"# fine-tuned {args.finetune} for {args.steps} steps in {time.perf_counter() - t0:.0f} s")
        print(f"# held out: {len(held_out)} sample conversations; targets: ppl within {PPL_TOLERANCE:.0%}, "
              f"top-1 agreement >= {MIN_AGREEMENT:.0%}")
        for path in paths:
            print(json.dumps(served_quality(path, held_out)))


if __name__ == "__main__":
    main()
