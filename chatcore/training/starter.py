"""The offline starter model: something to chat with when there is no internet and no GPT-2.

A small GPT of the same architecture (and GPT-2's tokenizer) trained from scratch
in a few minutes on the CPU, from the chit-chat corpus that the ``chitchat-dataset``
package ships (MIT, BYU PCC lab: ~7k real two-person conversations) or from any
seed-format JSONL the user points to. It is cached, so this happens once. It makes
conversation-shaped replies, not wise ones; GPT-2 124M stays the default whenever
it is available, and the learning loop fine-tunes whichever model serves.

`starter_model(config)` is the last step of `chatcore.weights` (through
`chatcore.weights.starter_for`) when no other weights are found: it returns the cached
checkpoint, building it first if needed. `build_starter` does the work and is what
``chatcore model starter`` calls.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .data import TrainingExchange, build_dataset, load_jsonl
from .train import OutputVocab, TrainConfig, set_threads, train

log = logging.getLogger(__name__)

STARTER_NAME = "starter.safetensors"
SAVE_RESERVE_S = 1.0  # of the budget, kept for writing the checkpoint


@dataclass
class StarterConfig:
    # Measured with benchmarks/starter.py (same budget, same held-out set): on a busy
    # 2-core machine a model this size gets ~3x the steps of a 4 x 128 one, and a
    # tiny model takes a high learning rate with a short warm-up.
    n_layer: int = 3
    n_head: int = 3
    n_embd: int = 96
    block_size: int = 256  # serving context; training windows are 128
    minutes: float = 4.0  # wall-clock budget for the whole build, kept whatever the load
    max_exchanges: int = 15000  # more than the budget can train on; preparing it counts in the budget
    batch_size: int = 8
    learning_rate: float = 4e-3
    output_vocab: int = 8192  # most frequent tokens it learns to say (the head's cost); 0: all
    warmup_iters: int = 30
    seed: int = 1337


def chitchat_exchanges(limit: int | None = None) -> list[TrainingExchange]:
    """The chitchat-dataset corpus as exchanges: a conversation's turns paired (1st, 2nd), (3rd, 4th), ...

    A turn is one speaker's consecutive messages joined by a space.
    """
    try:
        import chitchat_dataset
    except ImportError as exc:
        raise RuntimeError("the starter corpus needs the chitchat-dataset package "
                           "(pip install chitchat-dataset==0.9.0), or pass a JSONL file") from exc
    out: list[TrainingExchange] = []
    for conv_id, conv in chitchat_dataset.Dataset().items():
        turns = [" ".join(u["text"] for u in group).strip() for group in conv.get("messages", [])]
        turns = [t for t in turns if t]
        for i in range(0, len(turns) - 1, 2):
            out.append(TrainingExchange(user=turns[i], assistant=turns[i + 1], conversation=f"chitchat:{conv_id}"))
        if limit is not None and len(out) >= limit:
            break
    return out[:limit] if limit is not None else out


@functools.lru_cache(maxsize=1)
def _starter_corpus() -> list[TrainingExchange]:
    """The whole chit-chat corpus, read once per process (reading it takes seconds)."""
    return chitchat_exchanges()


def general_exchanges(n: int, seed: int, source: str | Path | None = None) -> list[TrainingExchange]:
    """`n` general exchanges for replay (`training.replay`): from `source` (seed-format JSONL) or the starter corpus."""
    import random

    pool = load_jsonl(source)[0] if source else _starter_corpus()
    picked = random.Random(seed).sample(range(len(pool)), min(n, len(pool)))
    # Their own conversation keys: replay never shares a split key or a guard with users' exchanges.
    return [TrainingExchange(user=pool[i].user, assistant=pool[i].assistant, conversation=f"replay:{i}")
            for i in sorted(picked)]


def build_starter(out: str | Path, *, corpus: str | Path | None = None, cfg: StarterConfig | None = None,
                  threads: int | None = None, progress: bool = True) -> Path:
    """Train the starter model and write it (atomically) to `out`; returns the checkpoint path."""
    from ..checkpoint import save
    from ..model import GPT, GPTConfig
    from ..tokenizer import Tokenizer

    start = time.monotonic()
    cfg = cfg or StarterConfig()
    set_threads(threads)
    if corpus is not None:
        exchanges, bad = load_jsonl(corpus)
        source = str(corpus)
    else:
        exchanges, bad = chitchat_exchanges(cfg.max_exchanges), []
        source = "chitchat-dataset 0.9.0"
    exchanges = exchanges[: cfg.max_exchanges]
    # Whole-text loss: a model that starts from nothing learns English from both sides.
    data = build_dataset(exchanges, Tokenizer(), loss_on="all", val_fraction=0.02, seed=cfg.seed,
                         bad_lines=bad)
    torch.manual_seed(cfg.seed)
    model = GPT(GPTConfig(block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                          n_embd=cfg.n_embd, dropout=0.0))
    vocab = None
    if cfg.output_vocab:
        # The 50257-token head is most of a small model's step: learn only the frequent
        # tokens (the rest keep zero rows, so the saved model is an ordinary GPT).
        vocab = OutputVocab.most_frequent(data.train.tokens, cfg.output_vocab, model.config.vocab_size)
        vocab.tie(model)
    # The budget counts from the start of the build: what the corpus took is spent.
    seconds = max(1.0, cfg.minutes * 60 - (time.monotonic() - start) - SAVE_RESERVE_S)
    tcfg = TrainConfig(learning_rate=cfg.learning_rate, min_lr=cfg.learning_rate / 10, batch_size=cfg.batch_size,
                       block_size=128, max_iters=10**9, max_seconds=seconds, warmup_iters=cfg.warmup_iters,
                       dropout=0.0, eval_interval=250, eval_max_batches=16, patience=10**9,
                       weight_decay=0.1, beta2=0.99, seed=cfg.seed)
    log.info("starter model: %.1fM parameters, %.0f s of training on %d tokens from %s",
             sum(p.numel() for p in model.parameters()) / 1e6, seconds, len(data.train), source)
    outcome = train(model, data, tcfg, progress=progress, vocab=vocab)
    path = save(model, out, base_model="starter (from scratch)", iteration=outcome.iters,
                train_loss=outcome.final_train_loss, val_loss=outcome.best_val_loss, data_hash=data.hash,
                corpus=source, data=data.summary(), initial_val_loss=outcome.initial_val_loss,
                output_vocab=len(vocab.ids) if vocab is not None else model.config.vocab_size)
    log.info("starter model written to %s (validation loss %.3f)", path, outcome.best_val_loss)
    return path


def starter_path(config: Any) -> Path:
    return Path(config.data_dir) / "models" / STARTER_NAME


def starter_model(config: Any) -> Path | None:
    """The cached starter checkpoint, trained now if missing (the last step of `chatcore.weights`)."""
    path = starter_path(config)
    if path.is_file():
        return path
    cfg = StarterConfig()
    print(f"No GPT-2 weights are available offline: training a small starter model for about "
          f"{cfg.minutes:g} minutes (once; cached at {path}).", file=sys.stderr, flush=True)
    try:
        return build_starter(path, cfg=cfg, threads=config.get("model.threads"))
    except RuntimeError as exc:  # no corpus: the engine reports what is missing
        log.error("cannot build the starter model: %s", exc)
        return None
