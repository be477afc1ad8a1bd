"""The fine-tuning loop: the seed's recipe, made faster, deterministic and safe to interrupt.

Defaults (all settable from YAML through `TrainConfig.from_dict`): AdamW lr 1e-3,
batch 2, block 128, 400 iterations, 20 warm-up then cosine down to 1e-4,
dropout 0.1, evaluation every 50, early stop after 3 evaluations without an
improvement of at least 0.001, gradient clipping at 1.0, fused AdamW; the loss on
the whole text, with general text replayed (the recipe measured by benchmarks/learning.py).

Two things make it faster than the seed's loop at the same recipe (see
benchmarks/training.py): fused AdamW, and computing the output head only where a
target is trained on. With the loss on reply tokens only, about half the
positions have no target, and the 768 x 50257 head (plus its softmax) is the
largest single cost of a GPT-2 step.

The validation loss is the mean cross-entropy over every reply token of the
validation split (not a mean of batch means), so it is stable from evaluation to
evaluation and comparable between models: the promotion gate uses the same function.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from .data import Dataset, TokenData, eval_batches, get_batch
from .distributed import Ranks
from .options import TrainConfig

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """Training was asked to stop; nothing was written."""


def get_lr(it: int, cfg: TrainConfig, done: float | None = None) -> float:
    """Linear warm-up, then cosine decay to `min_lr` at `max_iters` (nanoGPT's schedule).

    With a time budget, ``done`` is the fraction of it spent since the warm-up ended:
    the cosine then follows the clock, so a slow machine decays on time too."""
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if done is None:
        done = (it - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters)
    ratio = min(1.0, max(0.0, done))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def set_dropout(model: nn.Module, p: float) -> None:
    """Change dropout on a loaded model (its config was saved with the serving value)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
        if hasattr(m, "dropout") and isinstance(getattr(m, "dropout"), float):
            m.dropout = p  # attention's SDPA dropout
    model.config.dropout = p


def hidden_states(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """The GPT body up to the final layer norm (the part of `GPT.forward` before the head)."""
    t = model.transformer
    pos = torch.arange(idx.size(1), dtype=torch.long, device=idx.device)
    x = t.drop(t.wte(idx) + t.wpe(pos))
    for block in t.h:
        x = block(x)
    return t.ln_f(x)


@dataclass
class OutputVocab:
    """The output tokens a from-scratch model may predict; all others have zero embedding rows.

    Used by the starter model: with the rows of the other tokens held at zero, their
    logits are exactly 0, so the full-vocabulary cross-entropy is
    ``logsumexp([kept logits, log(n_rest)]) - target logit`` (0 for a rest token):
    exact, at the cost of a head over `ids` only (a few thousand tokens instead of 50257).
    """

    ids: torch.Tensor  # kept token ids, sorted
    index: torch.Tensor  # [vocab]: position in `ids`, or -1
    n_rest: int

    @classmethod
    def most_frequent(cls, tokens: torch.Tensor, size: int, n_vocab: int) -> "OutputVocab":
        counts = torch.bincount(tokens, minlength=n_vocab)
        ids = counts.argsort(descending=True)[:size]
        ids = ids[counts[ids] > 0].sort().values
        index = torch.full((n_vocab,), -1, dtype=torch.long)
        index[ids] = torch.arange(len(ids))
        return cls(ids, index, n_vocab - len(ids))

    def tie(self, model: nn.Module) -> None:
        """Zero the other rows and keep them at zero (their gradients are dropped)."""
        rest = (self.index < 0).nonzero().squeeze(1)
        w = model.transformer.wte.weight
        with torch.no_grad():
            w[rest] = 0.0
        w.register_hook(lambda g: g.index_fill(0, rest, 0.0))


def loss_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             vocab: OutputVocab | None = None) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the targets that are not -1, and how many there were.

    The head runs only on those positions: the same loss as `GPT.forward`, less work.
    """
    h = hidden_states(model, x)
    y = y.reshape(-1)
    keep = y != -1
    n = int(keep.sum())
    if n == 0:
        return h.sum() * 0.0, 0
    h = h.reshape(-1, h.size(-1))[keep]
    y = y[keep]
    if vocab is None:
        logits = model.lm_head(h)
        return F.cross_entropy(logits.float(), y, reduction="sum"), n
    # One extra class stands for all rest tokens together (logit log(n_rest)); a rest
    # target's own logit is 0, i.e. log(n_rest) below its class: add that back.
    rest_logit = math.log(vocab.n_rest) if vocab.n_rest else -math.inf
    logits = F.linear(h, model.lm_head.weight[vocab.ids]).float()
    logits = torch.cat([logits, logits.new_full((logits.size(0), 1), rest_logit)], dim=1)
    pos = vocab.index[y]
    is_rest = pos < 0
    loss = F.cross_entropy(logits, torch.where(is_rest, len(vocab.ids), pos), reduction="sum")
    return loss + is_rest.sum() * (rest_logit if vocab.n_rest else 0.0), n


@torch.no_grad()
def evaluate(model: nn.Module, data: TokenData, batch_size: int = 8, block_size: int = 128,
             max_batches: int | None = None, vocab: OutputVocab | None = None,
             ranks: Ranks | None = None) -> float:
    """Mean loss per target token over the whole split (or its first `max_batches` batches).

    With `ranks`, each rank scores every world-th batch and the sums are added up over ranks."""
    if len(data) < 2:
        return float("nan")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    block = min(block_size, model.config.block_size)
    device = next(model.parameters()).device
    for b, (x, y) in enumerate(eval_batches(data, batch_size, block, max_batches)):
        if ranks is not None and b % ranks.world != ranks.rank:
            continue
        s, n = loss_sum(model, x.to(device), y.to(device), vocab)
        total += float(s)
        count += n
    model.train(was_training)
    if ranks is not None and ranks.world > 1:
        total, count = ranks.sum(total, count)
    return total / count if count else float("nan")


class _StepLoss(nn.Module):
    """A step's summed loss as a module: DistributedDataParallel's forward (which arms its gradient all-reduce) computes it."""

    def __init__(self, model: nn.Module, vocab: OutputVocab | None, full_forward: bool) -> None:
        super().__init__()
        self.model, self.vocab, self.full_forward = model, vocab, full_forward

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.full_forward:  # the model's own forward: full logits (the seed's way)
            logits, _ = self.model(x)
            return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), y.reshape(-1), ignore_index=-1,
                                   reduction="sum")
        return loss_sum(self.model, x, y, self.vocab)[0]


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of what training changes: every tensor, or only the trainable ones when the rest is frozen (LoRA)."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    state = model.state_dict()
    if trainable and len(trainable) < len(list(model.parameters())):
        state = {k: v for k, v in state.items() if k in trainable}
    return copy.deepcopy(state)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    cfg = cfg.for_width(model.config.n_embd)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = cfg.fused
    if fused is None:
        fused = _fused_available()
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             **({"fused": True} if fused else {}))


def _fused_available() -> bool:
    try:
        torch.optim.AdamW([nn.Parameter(torch.zeros(1))], fused=True)
        return True
    except (RuntimeError, TypeError, ValueError):
        return False


class Resume:
    """A training run's last evaluation on disk (model, optimizer, step, RNG), so a killed or
    cancelled job continues from there instead of from the start.

    ``key`` names the run (data hash, options, start weights): a saved state with
    another key is never used. The file is written atomically and read with
    ``torch.load(weights_only=True)``; its owner removes it once the run is complete.
    """

    def __init__(self, path: str | os.PathLike, key: str) -> None:
        self.path = Path(path)
        self.key = key

    def load(self) -> dict[str, Any] | None:
        """The saved state of this run, or None (none, unreadable, or another run's)."""
        if not self.path.is_file():
            return None
        try:
            state = torch.load(str(self.path), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch's parser on a damaged file raises many types
            log.warning("ignoring unreadable resume state %s: %s", self.path, exc)
            return None
        if not isinstance(state, dict) or state.get("key") != self.key:
            log.info("ignoring resume state %s: it is from other data or options; starting fresh", self.path)
            return None
        return state

    def save(self, state: dict[str, Any]) -> None:
        from ..checkpoint import atomic_write

        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, lambda tmp: torch.save({**state, "key": self.key}, str(tmp)))

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


@dataclass
class TrainOutcome:
    initial_val_loss: float
    best_val_loss: float
    best_iter: int
    iters: int
    final_train_loss: float
    stopped: str  # "max_iters", "early_stop" or "time_budget"
    seconds: float
    tokens_per_s: float
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int | None = None  # the iteration a resumed run continued from

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def curves(self) -> dict[str, list]:
        """Loss curves per evaluation for the sidecar: {"iter", "train", "val"} (train is None at iteration 0)."""
        return {"iter": [h["iter"] for h in self.history],
                "train": [h.get("train_loss") for h in self.history],
                "val": [h["val_loss"] for h in self.history]}


class _Progress:
    """Progress with an ETA: a tqdm bar on a terminal, else a plain line every tenth of the run.

    With a time budget the bar counts seconds (so its ETA is the budget's end), else iterations."""

    def __init__(self, cfg: TrainConfig, enabled: bool):
        self.cfg, self.enabled = cfg, enabled
        self.total = cfg.max_seconds if cfg.max_seconds is not None else cfg.max_iters
        self.tty = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=round(self.total), unit="s" if cfg.max_seconds is not None else "it",
                        desc="train", leave=False, disable=not self.tty)
        self.next_line = 0.1

    def update(self, it: int, elapsed: float, loss: float, lr: float) -> None:
        done = (elapsed if self.cfg.max_seconds is not None else it) / self.total
        if self.tty:
            self.bar.n = min(round(self.total), round(done * self.total))
            self.bar.set_postfix(it=it, loss=f"{loss:.3f}", lr=f"{lr:.1e}")  # refreshes
        elif self.enabled and done >= self.next_line:
            self.next_line = math.floor(done * 10 + 1) / 10
            eta = elapsed / done * (1 - done) if done > 0 else float("nan")
            print(f"train: {min(done, 1):.0%} (iteration {it}, loss {loss:.3f}, about {eta:.0f} s left)",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()


def train(model: nn.Module, data: Dataset, cfg: TrainConfig, *, progress: bool = True,
          should_stop: Callable[[], bool] | None = None, vocab: OutputVocab | None = None,
          resume: Resume | None = None, ranks: Ranks | None = None) -> TrainOutcome:
    """Fine-tune `model` in place; on return it holds the weights of its best evaluation.

    With `resume`, every evaluation is saved there, and a saved state of the same run
    is continued from (same batches, dropout masks and optimizer state as if never stopped).
    With `ranks` of a distributed run (`chatcore.training.distributed`), each rank trains on
    its rows of the same global batch under DistributedDataParallel, and only rank 0 writes."""
    t0 = time.perf_counter()  # the budget covers the set-up too (a first fused AdamW takes seconds)
    cfg = cfg.for_width(model.config.n_embd)
    cfg.validate()
    if len(data.train) < 2:
        raise ValueError("no training data left after the guards")
    ranks = ranks or Ranks()
    if ranks.world > cfg.batch_size:
        raise ValueError(f"{ranks.world} ranks need training.batch_size of at least {ranks.world} (one row each)")
    torch.manual_seed(cfg.seed + ranks.rank)  # dropout masks: each rank's own (rank 0's are one process's)
    gen = torch.Generator().manual_seed(cfg.seed)  # batch sampling
    block = min(cfg.block_size, model.config.block_size)
    set_dropout(model, cfg.dropout)
    model.train()
    opt = make_optimizer(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    ddp = None
    if ranks.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # it starts every rank from rank 0's weights (GPT has no buffers to keep in step)
        ddp = DistributedDataParallel(_StepLoss(model, vocab, not (cfg.head_on_targets_only or vocab is not None)),
                                      device_ids=[ranks.device] if ranks.device.type == "cuda" else None)

    def val() -> float:
        return evaluate(model, data.val, batch_size=max(cfg.batch_size, 8), block_size=block,
                        max_batches=cfg.eval_max_batches, vocab=vocab, ranks=ranks)

    saved = resume.load() if resume is not None else None
    if ranks.world > 1:  # all resume from the same evaluation, or all start fresh
        found = saved["iter"] if saved is not None else -1
        if ranks.max(found) != [-x for x in ranks.max(-found)]:
            raise RuntimeError("the training processes found different resume states (is the models folder "
                               "shared by all of them?)")
    e0 = time.perf_counter()
    if saved is not None:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["rng"] if ranks.world == 1 else saved["rngs"][ranks.rank])
        gen.set_state(saved["gen"])
        start, initial, history = saved["iter"], saved["initial"], saved["history"]
        best, best_iter, bad_evals = saved["best"], saved["best_iter"], saved["bad_evals"]
        best_state = trained_state(model) if saved["best_state"] is None else saved["best_state"]
        train_loss, ema = saved["train_loss"], saved["ema"]
        log.info("fine-tune: resumed from iteration %d (val loss %.4f, best %.4f at %d)",
                 start, history[-1]["val_loss"], best, best_iter)
    else:
        start, initial = 0, val()
        best, best_iter, bad_evals = initial, 0, 0
        best_state = trained_state(model) if not math.isnan(initial) else None
        history = [{"iter": 0, "val_loss": initial}]
        train_loss, ema = float("nan"), None
    eval_cost = time.perf_counter() - e0  # the final evaluation must fit in the budget too
    log.info("fine-tune: %d train / %d val tokens, initial val loss %.4f",
             len(data.train), len(data.val), initial)
    stopped, it = "max_iters", start
    finished = bad_evals >= cfg.patience  # it had stopped early, then died before its candidate was written
    if finished:
        stopped = "early_stop"
    tokens = 0
    budget = cfg.max_seconds
    bar = _Progress(cfg, progress and ranks.main)
    warm_end = None  # when the warm-up ended: the cosine spans the rest of the budget
    while it < cfg.max_iters and not finished:
        it += 1
        stop = should_stop is not None and should_stop()
        elapsed = time.perf_counter() - t0
        if ranks.world > 1:  # one clock and one stop for all: the ranks must take the same steps at the same rates
            stop, elapsed, eval_cost = ranks.max(stop, elapsed, eval_cost)
        if stop:
            raise Cancelled(f"cancelled at iteration {it}")
        done = None
        if budget is not None and it > cfg.warmup_iters:
            warm_end = elapsed if warm_end is None else warm_end
            done = (elapsed - warm_end) / max(1e-9, budget - eval_cost - warm_end)
        lr = get_lr(it - 1, cfg, done)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = get_batch(data.train, cfg.batch_size, block, gen)  # the global batch: every rank draws the same
        batch_tokens = x.numel()
        if ddp is not None:
            n_all = int((y != -1).sum())
            if n_all == 0:
                continue
            # This rank's rows, scaled so that DDP's average of the ranks' gradients is the
            # gradient of the global batch's mean loss: exactly one process's step.
            loss = ddp(ranks.shard(x).to(ranks.device), ranks.shard(y).to(ranks.device)) * (ranks.world / n_all)
        elif cfg.head_on_targets_only or vocab is not None:
            s, n = loss_sum(model, x, y, vocab)
            if n == 0:
                continue
            loss = s / n
        else:  # the model's own forward: full logits (the seed's way)
            _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        tokens += batch_tokens
        train_loss = loss.item()
        now = time.perf_counter()
        step_cost, elapsed = now - t0 - elapsed, now - t0
        # stop when another step and the final evaluation would not fit (costs as last measured)
        out_of_time = budget is not None and elapsed + step_cost + eval_cost >= budget
        if ranks.world > 1:  # the global batch's mean loss; out of time when any rank is
            total, late = ranks.sum(train_loss, out_of_time)
            train_loss, out_of_time = total / ranks.world, late > 0
        ema = train_loss if ema is None else 0.9 * ema + 0.1 * train_loss
        if out_of_time:
            stopped = "time_budget"
        bar.update(it, elapsed, ema, lr)
        if it % cfg.eval_interval == 0 or it == cfg.max_iters or out_of_time:
            e0 = time.perf_counter()
            v = val()
            eval_cost = time.perf_counter() - e0
            history.append({"iter": it, "train_loss": ema, "val_loss": v, "lr": lr})
            improved = v < best - cfg.min_delta
            log.info("iter %d: train loss %.4f, val loss %.4f%s", it, ema, v, " (best)" if improved else "")
            if improved:
                best, best_iter, bad_evals = v, it, 0
                best_state = trained_state(model)
            else:
                bad_evals += 1
            rngs = ranks.gather(torch.get_rng_state()) if resume is not None and ranks.world > 1 else None
            if resume is not None and ranks.main:  # the best weights are stored only when they are not the current ones
                resume.save(dict(iter=it, model=model.state_dict(), optimizer=opt.state_dict(),
                                 rng=torch.get_rng_state(), rngs=rngs, gen=gen.get_state(), initial=initial,
                                 history=history, best=best, best_iter=best_iter, bad_evals=bad_evals,
                                 best_state=None if best_iter == it else best_state,
                                 train_loss=train_loss, ema=ema))
            if bad_evals >= cfg.patience and not out_of_time:
                stopped = "early_stop"
                log.info("early stop at iter %d: no improvement >= %g in %d evaluations",
                         it, cfg.min_delta, cfg.patience)
                break
        if out_of_time:
            break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state, strict=False)
    model.eval()
    set_dropout(model, 0.0)
    seconds = time.perf_counter() - t0
    return TrainOutcome(initial_val_loss=initial, best_val_loss=best, best_iter=best_iter, iters=it,
                        final_train_loss=train_loss, stopped=stopped, seconds=seconds,
                        tokens_per_s=tokens / seconds if seconds > 0 else 0.0, history=history,
                        resumed_from=start if saved is not None else None)


def set_threads(threads: int | None) -> None:
    """Cap torch's (and OpenMP's) threads so training leaves cores to serving."""
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(int(threads))
