"""Does the learning loop learn? Reply-token loss, forgetting and preference accuracy, before and after.

From a base checkpoint, run the real fine-tune path (`chatcore.training.job.run_job`:
guards, split, supervised fine-tune, optional preference stage, candidate, gate) on a
training JSONL, then measure on a disjoint evaluation JSONL and a general-text file:

- reply-token loss (nats per reply token) of the base and of the candidate;
- general-text loss (every token) of both: the price in forgetting;
- preference accuracy of both: for each evaluation prompt, its real reply labelled
  good against the reply of another evaluation conversation labelled bad (is the
  real reply likelier, per token?), with the mean log-probability margin;
- wall time, training tokens/s and the gate's decision.

Default data (``--prepare``): the sample conversations (../shared/data), split by
conversation (their chitchat-dataset ids in ``sample_conversations.sources.tsv``)
into ~80% training / ~20% evaluation; the base is the offline starter model built
with a short budget from chitchat-dataset conversations that are NOT in the sample
(so the evaluation is not in the base's training data), and the general text is
150 further chitchat conversations neither model trained on. Everything is cached
under ``--workdir``.

    python benchmarks/learning.py                        # prepare (once) and run the default recipe
    python benchmarks/learning.py --set learning_rate=1e-3 --set max_iters=200
    python benchmarks/learning.py --preference            # also the preference stage (synthetic labels)
    python benchmarks/learning.py --json                  # one JSON object per measurement

Preference labels for ``--preference``: a reply of the training split voted good,
and the reply of another training conversation given to the same prompt voted bad
(the same construction as the evaluation, on disjoint conversations).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / ".." / "shared" / "data"
SAMPLE = SHARED / "sample_conversations.jsonl"
SOURCES = SHARED / "sample_conversations.sources.tsv"


# --- data ------------------------------------------------------------------------------


def sample_split(eval_fraction: float = 0.2, seed: int = 0) -> tuple[list[dict], list[dict], set[str]]:
    """The sample conversations as rows with a ``conversation`` key, split by conversation."""
    with open(SOURCES, encoding="utf-8") as f:
        conv_of = {int(r["line"]): r["location"].split(":", 1)[0] for r in csv.DictReader(f, delimiter="\t")}
    rows = []
    with open(SAMPLE, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            obj = json.loads(line)
            rows.append({**obj, "conversation": conv_of[n]})
    convs = sorted({r["conversation"] for r in rows})
    random.Random(seed).shuffle(convs)
    held = set(convs[: max(1, round(len(convs) * eval_fraction))])
    return [r for r in rows if r["conversation"] not in held], [r for r in rows if r["conversation"] in held], set(convs)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def prepare(workdir: Path, minutes: float, threads: int | None) -> dict[str, Path]:
    """Write the splits and build the base (starter) model once; returns their paths."""
    from chatcore.training.starter import StarterConfig, build_starter, chitchat_exchanges

    workdir.mkdir(parents=True, exist_ok=True)
    paths = {name: workdir / f"{name}.jsonl" for name in ("train", "eval", "general", "corpus")}
    paths["base"] = workdir / "base.safetensors"
    train_rows, eval_rows, sample_convs = sample_split()
    write_jsonl(paths["train"], train_rows)
    write_jsonl(paths["eval"], eval_rows)
    if not paths["base"].is_file():
        rest = [e for e in chitchat_exchanges() if e.conversation.split(":", 1)[1] not in sample_convs]
        convs = sorted({e.conversation for e in rest})
        random.Random(1).shuffle(convs)
        general = set(convs[:150])
        write_jsonl(paths["general"], [{"user": e.user, "assistant": e.assistant, "conversation": e.conversation}
                                       for e in rest if e.conversation in general])
        write_jsonl(paths["corpus"], [{"user": e.user, "assistant": e.assistant, "conversation": e.conversation}
                                      for e in rest if e.conversation not in general])
        build_starter(paths["base"], corpus=paths["corpus"], cfg=StarterConfig(minutes=minutes),
                      threads=threads, progress=sys.stderr.isatty())
    return paths
