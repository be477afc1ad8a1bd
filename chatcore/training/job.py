"""One fine-tune job, start to finish: data, training, candidate, gate, registry.

Run in-process with `run_job`, or as the scheduler's worker process::

    python -m chatcore.training.job SPEC.json [--lock-fd N]

Steps: read the exchanges (history store and/or seed-format JSONL files), apply
the guards, split by conversation; load the start weights (`spec.base`, the
configured base model by default, so a user who ran ``/forget`` drops out of the
model at the next fine-tune, not only out of the data); train; write the
candidate ``<models>/finetuned_YYYYMMDD_HHMMSS.safetensors`` (atomically, with
provenance); judge it against the serving model (`spec.serving`) on the
held-out split; record the promotion or rejection in the registry and mark the
fine-tune in the store so the exchange counter restarts.

Under torchrun (``training.nproc`` > 1, see `chatcore.training.distributed`) every
rank runs this job up to the end of training; rank 0 alone then goes on to the
preference stage, the candidate, the gate and the registry, and writes ``result.json``.

The result (a JSON-able dict, also ``result.json`` in the job folder) has
``status`` = ``promoted`` | ``rejected`` | ``failed`` | ``cancelled``, the metrics and
the data report. A cancelled or failed job writes no candidate and changes nothing
but its resume state: each evaluation is saved to ``<models>/.finetune-resume.pt``
(hidden, never a candidate), and the next job with the same data, options and
start weights continues from there; it is removed once the registry has the
candidate. Fewer than `MIN_SENSIBLE` exchanges: a warning, and training goes on.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("chatcore.training")

MIN_SENSIBLE = 10  # exchanges: fine-tuning on fewer mostly overfits (the seed's warning threshold)
RESUME_NAME = ".finetune-resume.pt"  # in the models folder: the last evaluation of an unfinished job


@dataclass
class JobSpec:
    models_dir: str
    base: str  # start weights: a checkpoint file, a Hugging Face dir, or a hub name such as "gpt2"
    serving: str | None = None  # what the candidate must beat (None: the same as base)
    store: str | None = None  # the history: an SQLite file or a postgresql:// URL
    jsonl: list[str] = field(default_factory=list)  # extra seed-format chat_history.jsonl files
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields
    guards: dict[str, Any] = field(default_factory=dict)  # GuardConfig fields
    gate: dict[str, Any] = field(default_factory=dict)  # GateConfig fields
    preference: dict[str, Any] = field(default_factory=dict)  # options.PreferenceConfig fields
    preference_jsonl: list[str] = field(default_factory=list)  # labels from files (preference.load_preference_jsonl)
    val_fraction: float = 0.1
    threads: int | None = None
    progress: bool = True
    scope: str | None = None  # a scope's own adapter (chatcore.scopes): only its channels' exchanges
    scope_channels: list[str] = field(default_factory=list)  # their "adapter:channel" keys


def stop_if_asked(should_stop: Callable[[], bool] | None, where: str) -> None:
    """Raise `Cancelled` if the job was asked to stop (SIGTERM, `Job.cancel`)."""
    if should_stop is not None and should_stop():
        from .train import Cancelled

        raise Cancelled(f"cancelled {where}")


def spec_from_config(config: Any, base: str, serving: str | None = None, **overrides: Any) -> JobSpec:
    """A job for a bot's config: store, models folder and the ``plugins.auto_finetune`` sections."""
    section = config.get("plugins.auto_finetune") or {}

    def options(name: str) -> dict[str, Any]:
        return {k: v for k, v in (section.get(name) or {}).items() if v is not None and v != []}

    fields = dict(models_dir=str(Path(config.data_dir) / "models"), base=base, serving=serving,
                  store=config.store_url, train=options("training"), guards=options("guards"),
                  gate=options("gate"), preference=options("preference"), val_fraction=float(section.get("val_fraction", 0.1)),
                  threads=section.get("threads"))
    fields.update(overrides)
    return JobSpec(**fields)


def load_model(spec: str):
    """Weights for a checkpoint path or a Hugging Face hub name (cache only: a job never downloads)."""
    from ..hf import load_any, load_hf
    from ..lora import is_adapter, load_adapter, merge_adapter

    if is_adapter(Path(spec).expanduser()):  # a LoRA adapter: its base, with the adapter merged in
        adapter = load_adapter(Path(spec).expanduser())
        model, meta = load_model(adapter.base_model or "")
        return merge_adapter(model, adapter), {**meta, "source": str(spec), "adapter": adapter.meta}
    if Path(spec).expanduser().exists():
        return load_any(Path(spec).expanduser())
    return load_hf(spec, local_files_only=True)


def resume_key(spec: JobSpec, train_cfg: Any, data_hash: str, model_config: Any) -> str:
    """What a resume state must match: the data, the options and the start weights."""
    import hashlib

    base = Path(spec.base).expanduser()
    st = base.stat() if base.is_file() else None
    parts = dict(data=data_hash, val_fraction=spec.val_fraction, train=asdict(train_cfg), base=spec.base,
                 base_file=[st.st_size, st.st_mtime_ns] if st else None, model=asdict(model_config))
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def candidate_path(models_dir: Path) -> Path:
    stamp = time.strftime("%Y%m%d_%H%M%S")
    path = models_dir / f"finetuned_{stamp}.safetensors"
    n = 1
    while path.exists():  # two jobs in one second (tests)
        path = models_dir / f"finetuned_{stamp}_{n}.safetensors"
        n += 1
    return path


def run_job(spec: JobSpec, should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    from ..checkpoint import check_servable, save, sidecar_path
    from ..tokenizer import Tokenizer
    from .data import GuardConfig, build_dataset, from_store, load_jsonl
    from ..registry import Registry
    from ..store import is_postgres_url
    from .gate import GateConfig, judge_file
    from .preference import preference_metrics
    from .distributed import close as leave_process_group
    from .distributed import from_env
    from .train import Resume, TrainConfig, set_threads, train

    t0 = time.time()
    ranks = from_env()  # rank 0 of 1 unless torchrun started this process
    set_threads(max(1, spec.threads // ranks.world) if spec.threads else None)  # the budget is the job's, not a rank's
    models_dir = Path(spec.models_dir).expanduser()
    train_cfg = TrainConfig.from_dict(spec.train)
    if train_cfg.nproc != ranks.world:
        log.warning("training.nproc is %d but this job runs in %d process(es) (torchrun starts the others: "
                    "`chatcore finetune --nproc N`); training in %d, with the same global batch",
                    train_cfg.nproc, ranks.world, ranks.world)
        train_cfg.nproc = ranks.world  # the provenance says how it was trained
    guard_cfg = GuardConfig.from_dict(spec.guards)
    gate_cfg = GateConfig.from_dict(spec.gate)
    lora_cfg = None
    if train_cfg.method == "lora":  # validated before any data or weights are read
        from ..lora import LoRAConfig

        lora_cfg = LoRAConfig.from_dict(train_cfg.lora)

    # data
    exchanges, bad_lines, up_to_id = [], [], None
    store = None
    if spec.store:
        from ..store import Store

        store = Store(spec.store)
        exchanges += from_store(store)
        if spec.scope is not None:  # this scope's conversations only: trained on, and gated on
            keys = set(spec.scope_channels)
            mine = {e.id for e in store.exchanges() if f"{e.adapter}:{e.channel}" in keys}
            exchanges = [e for e in exchanges if e.id in mine]
        up_to_id = max((e.id for e in exchanges if e.id is not None), default=0)
    for path in spec.jsonl:
        rows, bad = load_jsonl(path)
        exchanges += rows
        bad_lines += bad
    tok = Tokenizer()
    data = build_dataset(exchanges, tok, guards=guard_cfg, loss_on=train_cfg.loss_on,
                         val_fraction=spec.val_fraction, seed=train_cfg.seed, bad_lines=bad_lines)
    log.info("data: %d train / %d validation exchanges; guards %s", data.train_exchanges,
             data.val_exchanges, data.guard_report)
    if data.train_exchanges == 0 or data.val_exchanges == 0:
        raise ValueError(f"not enough data to fine-tune: {data.train_exchanges} training and "
                         f"{data.val_exchanges} validation exchange(s) after the guards ({data.guard_report})")
    if ranks.world > 1 and not ranks.same(data.hash):
        raise RuntimeError("the training processes read different data (the history changed while they read it); "
                           "run the job again")
    if train_cfg.replay > 0:  # general text on the training side only (the gate judges users' conversations)
        add_replay(data, tok, train_cfg)  # the same sample on every process (seeded)
    if data.train_exchanges + data.val_exchanges < MIN_SENSIBLE:
        log.warning("fine-tuning on %d exchange(s), fewer than %d: the model will mostly overfit them; "
                    "training anyway", data.train_exchanges + data.val_exchanges, MIN_SENSIBLE)

    # models
    model, base_meta = load_model(spec.base)
    train_cfg = train_cfg.for_width(model.config.n_embd)  # the learning rates it trains with, as the provenance says
    check_servable(model, spec.base)  # a base that cannot serve cannot give a candidate that can
    lineage = inherit_lineage(data.lineage, base_meta)
    serving = None
    if ranks.main:  # only rank 0 judges
        serving = copy.deepcopy(model) if spec.serving in (None, spec.base) else load_model(spec.serving)[0]
        serving.eval()
    if lora_cfg is not None:
        from ..lora import apply_lora

        apply_lora(model, lora_cfg)

    resume = Resume(models_dir / RESUME_NAME, resume_key(spec, train_cfg, data.hash, model.config))
    model.to(ranks.device)
    outcome = train(model, data, train_cfg, progress=spec.progress, should_stop=should_stop, resume=resume,
                    ranks=ranks)
    model.to("cpu")
    leave_process_group()
    if not ranks.main:  # rank 0 has the same weights and writes everything
        return {"status": "trained", "rank": ranks.rank}
    prefs_train, prefs_held, pref_outcome = preference_stage(spec, store, guard_cfg, train_cfg.seed, model, tok,
                                                             should_stop)
    # a stop that arrives after the last step still means "write nothing" (Job.cancel's promise)
    stop_if_asked(should_stop, "after training: no candidate written")

    # candidate: written atomically (temp name + rename inside checkpoint.save)
    cand = candidate_path(models_dir)
    provenance = dict(iteration=outcome.best_iter, train_loss=outcome.final_train_loss,
                      val_loss=outcome.best_val_loss, data_hash=data.hash, data=data.summary(),
                      training=asdict(train_cfg), stopped=outcome.stopped,
                      initial_val_loss=outcome.initial_val_loss, resumed_from=outcome.resumed_from, lineage=lineage,
                      history=outcome.history,  # per-evaluation train/val losses: the dashboard's learning curves
                      curves=outcome.curves(),  # the same as {iter, train, val} lists, for plotting
                      preference=pref_outcome.as_dict() if pref_outcome else None)
    if lora_cfg is not None:  # the adapter alone; weights.py serves it on its base
        from ..lora import save_adapter

        save_adapter(model, cand, lora_cfg, base_model=spec.base, **provenance)
    else:
        save(model, cand, base_model=spec.base, **provenance)

    del model  # the gate judges the file just written, exactly what would serve
    general = None
    if gate_cfg.general_text:
        general = general_text_data(gate_cfg.general_text, tok)
    canaries = canary_data(gate_cfg.canaries, tok) if gate_cfg.canary_check else None
    pref_block = gate_cfg.eval_block_size
    verdict = judge_file(cand, serving, data.val, gate_cfg, general, canaries,
                         preferences=(lambda m: preference_metrics(m, tok, prefs_held, pref_block))
                         if len(prefs_held) else None,
                         loader=(lambda p: load_model(str(p))) if lora_cfg is not None else None)
    registry = Registry(models_dir, keep=gate_cfg.keep, keep_rejected=gate_cfg.keep_rejected)
    result = {
        "status": "promoted" if verdict.promoted else "rejected",
        "candidate": str(cand),
        "base": spec.base,
        "serving": spec.serving or spec.base,
        "gate": verdict.as_dict(),
        "training": {k: v for k, v in outcome.as_dict().items() if k != "history"},
        "history": outcome.history,
        "preference": {**(pref_outcome.as_dict() if pref_outcome else {"stopped": "disabled"}),
                       "train_labels": prefs_train.summary(), "held_out_labels": prefs_held.summary()},
        "data": data.summary(),
        "lineage": {"manifest": lineage["manifest"], "exchanges": len(lineage["exchange_ids"]),
                    "users": len(lineage["users"]), "inherited_from": lineage.get("inherited_from")},
        "up_to_id": up_to_id,
        "seconds": round(time.time() - t0, 1),
    }
    if should_stop is not None and should_stop():
        cand.unlink(missing_ok=True)
        sidecar_path(cand).unlink(missing_ok=True)
        stop_if_asked(should_stop, "during the gate: the candidate was removed, serving is unchanged")
    if verdict.promoted:
        registry.promote(cand, metrics=result["gate"])
    else:
        registry.reject(cand, metrics=result["gate"])
    if spec.scope is not None:  # the scope's own counter restarts; the bot-wide one is not touched
        _write_json_atomic(models_dir / "last_finetune.json", {"up_to_id": up_to_id, "at": time.time(),
                                                               "candidate": cand.name})
        result["scope"] = spec.scope
    resume.clear()  # complete: the registry knows the candidate (until then, an orphan is cleaned and this resumes)
    if store is not None:
        if spec.scope is None:
            store.mark_finetune(checkpoint=cand.name, up_to_id=up_to_id)
        store.close()
    if verdict.promoted and is_postgres_url(spec.store):
        from ..postgres import announce_registry_change

        announce_registry_change(spec.store, cand.name)  # every instance swaps now, not at its next poll
    log.info("%s: %s", result["status"], verdict.reason)
    return result


def add_replay(data: Any, tok: Any, cfg: Any) -> None:
    """Append `cfg.replay` x the training exchanges of general ones to `data.train` (none if the source is missing)."""
    import torch

    from .data import TokenData, tokenize
    from .starter import general_exchanges

    try:
        extra = general_exchanges(round(cfg.replay * data.train_exchanges), cfg.seed, cfg.replay_source)
    except (RuntimeError, OSError) as exc:
        log.warning("training without replay: %s", exc)
        return
    more = tokenize(extra, tok, cfg.loss_on)
    data.train = TokenData(torch.cat([data.train.tokens, more.tokens]), torch.cat([data.train.mask, more.mask]),
                           data.train.documents + more.documents)
    log.info("replay: %d general exchange(s) mixed into training", len(extra))


def inherit_lineage(lineage: dict[str, Any], base_meta: dict[str, Any]) -> dict[str, Any]:
    """A candidate started from a fine-tune also carries that fine-tune's data: merge its manifest in."""
    import hashlib

    parent = (base_meta.get("provenance") or {}).get("lineage")
    if not parent:
        return lineage
    ids = sorted(set(lineage["exchange_ids"]) | set(parent.get("exchange_ids", [])))
    return {**lineage, "exchange_ids": ids,
            "manifest": "sha256:" + hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest(),
            "users": sorted(set(lineage["users"]) | set(parent.get("users", []))),
            "file_rows": lineage["file_rows"] + parent.get("file_rows", 0),
            "inherited_from": Path(str(base_meta.get("source", ""))).name or None}


def canary_data(path: str | None, tok):
    """The canary prompts as reply-token data: the operator's JSONL file, else the built-in set."""
    from .data import TrainingExchange, load_jsonl, tokenize
    from .gate import DEFAULT_CANARIES

    if path:
        rows, _ = load_jsonl(Path(path).expanduser())
    else:
        rows = [TrainingExchange(user=u, assistant=a, conversation=f"canary:{i}")
                for i, (u, a) in enumerate(DEFAULT_CANARIES)]
    return tokenize(rows, tok) if rows else None


def preference_stage(spec: JobSpec, store: Any, guards: Any, seed: int, model: Any, tok: Any,
                     should_stop: Callable[[], bool] | None):
    """Labels (store votes and pairs, label files) split like the data; KTO/DPO when enabled and enough exist."""
    from .options import PreferenceConfig
    from .preference import Preferences, from_store_preferences, load_preference_jsonl, train_preferences

    cfg = PreferenceConfig.from_dict(spec.preference)
    prefs = from_store_preferences(store, guards) if store is not None else Preferences()
    for path in spec.preference_jsonl:
        more = load_preference_jsonl(path)
        prefs.labelled += more.labelled
        prefs.pairs += more.pairs
    train_prefs, held = prefs.split(spec.val_fraction, seed)
    outcome = None
    if cfg.enabled:
        outcome = train_preferences(model, tok, train_prefs, cfg, should_stop=should_stop)
        log.info("preference stage: %s after %d step(s), KL to reference %.4f (labels %s)",
                 outcome.stopped, outcome.steps, outcome.kl, outcome.labels)
    return train_prefs, held, outcome


def general_text_data(path: str, tok):
    """A fixed general-text set: seed-format JSONL (reply tokens) or plain text (every token)."""
    from .data import TokenData, load_jsonl, tokenize

    import torch

    p = Path(path).expanduser()
    if p.suffix == ".jsonl":
        rows, _ = load_jsonl(p)
        return tokenize(rows, tok)
    ids = tok.encode(p.read_text(encoding="utf-8"))
    return TokenData(torch.tensor(ids, dtype=torch.long), torch.ones(len(ids), dtype=torch.bool), 1)


# --- worker process ------------------------------------------------------------------


def _write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)


def _die_with_launcher() -> None:
    """Under torchrun: end with the launcher, which holds the job lock (Linux; a no-op elsewhere).

    A rank outliving a killed launcher would train on, unlocked, and rank 0 could still promote."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the launcher died before the line above
        os._exit(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chatcore.training.job")
    parser.add_argument("spec")
    parser.add_argument("--lock-fd", type=int, default=None, help="inherited lock (kept open while running)")
    args = parser.parse_args(argv)
    spec_path = Path(args.spec)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    try:
        os.nice(5)  # serving first
    except OSError:
        pass
    stop = {"flag": False}

    def on_signal(signum, frame):
        stop["flag"] = True
        log.info("signal %d: stopping at the next step", signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    from .train import Cancelled

    spec = JobSpec(**json.loads(spec_path.read_text(encoding="utf-8")))
    result_path = spec_path.with_name("result.json")
    rank = int(os.environ.get("RANK", "0"))  # set by torchrun; rank 0 alone reports
    if "RANK" in os.environ:
        _die_with_launcher()
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        result = run_job(spec, should_stop=lambda: stop["flag"])
        rc = 0
    except Cancelled as exc:
        result, rc = {"status": "cancelled", "error": str(exc)}, 3
    except Exception as exc:  # reported to the bot; the traceback goes to the job log
        traceback.print_exc()
        result, rc = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}, 1
    result["job"] = spec_path.parent.name
    if rank == 0:
        _write_json_atomic(result_path, result)
    return rc


if __name__ == "__main__":
    sys.exit(main())
