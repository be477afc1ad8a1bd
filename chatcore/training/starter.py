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

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .data import TrainingExchange, build_dataset, load_jsonl
from .train import OutputVocab, TrainConfig, loss_sum, make_optimizer, set_threads, train

log = logging.getLogger(__name__)

STARTER_NAME = "starter.safetensors"


@dataclass
class StarterConfig:
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 256  # serving context; training windows are 128
    minutes: float = 4.0  # training time budget (the iteration count is fitted to it)
    max_exchanges: int = 30000
    batch_size: int = 8
    learning_rate: float = 2e-3
    output_vocab: int = 8192  # most frequent tokens it learns to say (the head's cost); 0: all
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


def build_starter(out: str | Path, *, corpus: str | Path | None = None, cfg: StarterConfig | None = None,
                  threads: int | None = None, progress: bool = True) -> Path:
    """Train the starter model and write it (atomically) to `out`; returns the checkpoint path."""
    from ..checkpoint import save
    from ..model import GPT, GPTConfig
    from ..tokenizer import Tokenizer

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
    iters = _fit_iterations(model, data, cfg, vocab)
    tcfg = TrainConfig(learning_rate=cfg.learning_rate, min_lr=cfg.learning_rate / 10, batch_size=cfg.batch_size,
                       block_size=128, max_iters=iters, warmup_iters=min(100, iters // 10), dropout=0.0,
                       eval_interval=max(50, iters // 8), eval_max_batches=16, patience=1000,
                       weight_decay=0.1, beta2=0.99, seed=cfg.seed)
    log.info("starter model: %.1fM parameters, %d iterations on %d tokens from %s",
             sum(p.numel() for p in model.parameters()) / 1e6, iters, len(data.train), source)
    outcome = train(model, data, tcfg, progress=progress, vocab=vocab)
    path = save(model, out, base_model="starter (from scratch)", iteration=outcome.iters,
                train_loss=outcome.final_train_loss, val_loss=outcome.best_val_loss, data_hash=data.hash,
                corpus=source, data=data.summary(), initial_val_loss=outcome.initial_val_loss,
                output_vocab=len(vocab.ids) if vocab is not None else model.config.vocab_size)
    log.info("starter model written to %s (validation loss %.3f)", path, outcome.best_val_loss)
    return path


def _fit_iterations(model: Any, data: Any, cfg: StarterConfig, vocab: OutputVocab | None) -> int:
    """Time a few steps on a throw-away copy to fit the iteration count into the time budget."""
    import copy

    from .data import get_batch

    probe = copy.deepcopy(model).train()
    opt = make_optimizer(probe, TrainConfig())
    gen = torch.Generator().manual_seed(0)
    times = []
    for _ in range(4):
        x, y = get_batch(data.train, cfg.batch_size, min(128, cfg.block_size), gen)
        t0 = time.perf_counter()
        s, n = loss_sum(probe, x, y, vocab)
        opt.zero_grad(set_to_none=True)
        (s / max(n, 1)).backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    per_step = sorted(times[1:])[1] * 1.15  # median after warm-up, plus evaluation overhead
    return max(20, int(cfg.minutes * 60 / per_step))


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
        return build_starter(path, cfg=cfg, threads=config.get("model.threads"),
                             progress=sys.stderr.isatty())
    except RuntimeError as exc:  # no corpus: the engine reports what is missing
        log.error("cannot build the starter model: %s", exc)
        return None
