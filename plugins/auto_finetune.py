"""Auto-fine-tune: the bot learns from its own conversations, safely.

Counts new eligible exchanges (the count is a query on the history store, so it
survives restarts); at `every` of them (default 50), once the cooldown since the
last fine-tune has passed, it starts a job in a separate process
(`chatcore.training.scheduler`). When the job ends the gate has spoken: a
promoted candidate is loaded off the event loop and hot-swapped into the running
bot (`bot.generator.swap`), a rejected one stays on disk for inspection. Which
weights a job starts from is `chatcore.weights`' answer (`base_checkpoint`),
never whatever happens to serve; which weights serve at startup is also
`chatcore.weights`' decision alone (this plugin never reloads them). Hooks
``finetune_started`` / ``finetune_finished`` / ``finetune_promoted`` /
``finetune_rejected`` fire with the metrics.

``/finetune`` (admin) starts a job now; ``/finetune status`` and ``/finetune cancel``.

Config (``plugins.auto_finetune``)::

    enabled: true         # count and trigger automatically (/finetune works either way)
    every: 50             # new exchanges per fine-tune (below 10 overfits: a warning)
    cooldown_minutes: 60  # at least this long between automatic fine-tunes
    threads: null         # training threads (null: all cores but one)
    start_from: base      # base: the configured model; serving: the model serving now
    training: {...}       # chatcore.training.options.TrainConfig (lr, max_iters, loss_on, ...)
    guards: {...}         # chatcore.training.options.GuardConfig (duplicates, min length, user share, ...)
    gate: {...}           # chatcore.training.options.GateConfig (min_improvement, general_text, keep, ...)
    preference: {...}     # chatcore.training.options.PreferenceConfig (enabled, min_labels, beta, ...)
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import typing
import weakref
from pathlib import Path
from typing import Any

from chatcore import hookimpl
from chatcore.config import Field
from chatcore.lineage import contains_any, gate_reference
from chatcore.plugin_manager import call_hook
from chatcore.registry import Registry
from chatcore.training.job import MIN_SENSIBLE, JobSpec, spec_from_config
from chatcore.training.options import GateConfig, GuardConfig, PreferenceConfig, TrainConfig
from chatcore.training.scheduler import Job, JobBusy, JobScheduler

log = logging.getLogger("chatcore.auto_finetune")


def _schema_of(cls: type) -> dict[str, Field]:
    """Config fields from a dataclass: each option validated with its key path and line."""
    hints = typing.get_type_hints(cls)
    out: dict[str, Field] = {}
    for f in dataclasses.fields(cls):
        args = set(typing.get_args(hints[f.name])) - {type(None)} or {hints[f.name]}
        if typing.get_origin(hints[f.name]) is dict:  # e.g. training.lora: a mapping of its own options
            typ: Any = dict
        elif bool in args:
            typ = bool
        elif float in args:
            typ = (int, float)
        elif int in args:
            typ = int
        elif str in args:
            typ = str
        else:
            typ = list
        default = f.default if f.default is not dataclasses.MISSING else None
        out[f.name] = Field(typ, list(default) if isinstance(default, frozenset) else default)
    return out


@hookimpl
def register_config(register):
    register("plugins.auto_finetune", {
        "enabled": Field(bool, True, help="Fine-tune automatically when enough new exchanges accumulated."),
        "every": Field(int, 50, help="New eligible exchanges that trigger a fine-tune."),
        "cooldown_minutes": Field((int, float), 60, help="Minimum time between automatic fine-tunes."),
        "threads": Field(int, None, help="Training threads (default: all cores but one, so serving keeps one)."),
        "start_from": Field(str, "base", choices=("base", "serving"),
                            help="Start weights: the configured model (forgotten users leave the model too) "
                                 "or the model serving now."),
        "val_fraction": Field((int, float), 0.1, help="Share of conversations held out for the gate."),
        "poll_minutes": Field((int, float), None,
                              help="Also check the history this often: on a serving box, whose front ends "
                                   "(model.remote) log the exchanges (null: only when this instance logs one)."),
        "on_forget": Field(str, "retrain_next", choices=("retrain_next", "retrain_now"),
                           help="When /forget hits a user the serving model was trained on: retrain_next (the "
                                "next fine-tune starts from the base without them) or retrain_now (start one now)."),
        "training": _schema_of(TrainConfig),
        "guards": _schema_of(GuardConfig),
        "gate": _schema_of(GateConfig),
        "preference": _schema_of(PreferenceConfig),
    })


@hookimpl
def register_commands(register):
    register("finetune", finetune_command, admin=True)


class State:
    """One bot's fine-tune bookkeeping."""

    def __init__(self, bot: Any) -> None:
        cfg = bot.config.get("plugins.auto_finetune") or {}
        self.cfg = cfg
        self.models_dir = Path(bot.config.data_dir) / "models"
        self.scheduler = JobScheduler(self.models_dir, threads=cfg.get("threads"), lock_url=bot.config.store_url)
        self.job: Job | None = None
        self.task: asyncio.Task | None = None
        self.poller: asyncio.Task | None = None  # poll_history, on a serving box
        self.last_attempt = 0.0
        if cfg.get("every", 50) < MIN_SENSIBLE:
            log.warning("plugins.auto_finetune.every is %d: fine-tuning on fewer than %d exchanges "
                        "mostly overfits", cfg.get("every"), MIN_SENSIBLE)

    @property
    def running(self) -> bool:
        """A job runs, or its result (gate verdict, hot swap) is still being acted on."""
        return (self.job is not None and self.job.running) or (self.task is not None and not self.task.done())

    def spec(self, bot: Any) -> JobSpec:
        """The job: start from the configured base (asked of `chatcore.weights`) or from what serves."""
        from chatcore.weights import base_checkpoint

        serving = _source(bot.engine)
        if self.cfg.get("start_from", "base") == "base":
            base = base_checkpoint(bot.config)
            if not base:
                raise RuntimeError("the configured model has no checkpoint on disk to fine-tune from")
        else:
            base = serving
            if not base:
                raise RuntimeError("the serving model has no checkpoint on disk to fine-tune from")
        gone = set(bot.store.excluded_users()) | set(bot.store.forgotten())
        if base == serving and contains_any(Path(base), gone):
            # Fine-tuning the serving model would carry forgotten users' data on: start from the base.
            log.info("the serving model holds data of users since forgotten: fine-tuning from the base")
            base = base_checkpoint(bot.config)
            if not base:
                raise RuntimeError("the configured model has no checkpoint on disk to fine-tune from")
        return spec_from_config(bot.config, base, gate_reference(serving, base, gone), progress=False)

    def scope_spec(self, bot: Any, scope: Any) -> JobSpec:
        """A scope's own LoRA adapter: trained on its conversations from the configured base, gated
        on its held-out ones against what serves there now (its adapter, or the base)."""
        from chatcore.registry import serving_checkpoint
        from chatcore.scopes import adapter_dir
        from chatcore.weights import base_checkpoint

        # An adapter serves on the weights it was trained on (lora.check_base): the configured base, or
        # with start_from: serving the bot-wide model that serves now.
        base = base_checkpoint(bot.config) if self.cfg.get("start_from", "base") == "base" else _source(bot.engine)
        if not base:
            raise RuntimeError("the model has no checkpoint on disk to fine-tune from")
        folder = adapter_dir(self.models_dir, scope)
        serving = serving_checkpoint(folder)
        spec = spec_from_config(bot.config, base, str(serving) if serving else None, progress=False,
                                models_dir=str(folder), scope=scope.name,
                                scope_channels=bot.scopes.channels(scope))
        spec.train = {**spec.train, "method": "lora"}
        return spec


def scope_exchanges_since_finetune(bot: Any, scope: Any, up_to: int | None = None) -> int:
    """Exchanges of `scope`'s channels logged after the newest one its last fine-tune saw (counting stops at `up_to`)."""
    from chatcore.scopes import adapter_dir

    mark = Path(adapter_dir(state_of(bot).models_dir, scope)) / "last_finetune.json"
    try:
        since = int(json.loads(mark.read_text(encoding="utf-8")).get("up_to_id", 0))
    except (OSError, ValueError, AttributeError):
        since = 0
    keys = set(bot.scopes.channels(scope))
    count = 0
    for e in bot.store.exchanges(since_id=since):
        if f"{e.adapter}:{e.channel}" in keys and e.trainable:  # consented, as the bot-wide count
            count += 1
            if up_to is not None and count >= up_to:
                break
    return count


_states: "weakref.WeakKeyDictionary[Any, State]" = weakref.WeakKeyDictionary()


def state_of(bot: Any) -> State:
    st = _states.get(bot)
    if st is None:
        st = _states[bot] = State(bot)
    return st


def _source(engine: Any) -> str | None:
    meta = getattr(engine, "meta", None) or {}
    return meta.get("source")


# --- lifecycle -----------------------------------------------------------------------


@hookimpl
async def startup(bot):
    """Remove what crashed fine-tunes left behind (temporary files, orphan candidates); start `poll_history`."""
    st = state_of(bot)
    # A job running on another instance holds only the database lock where the shared folder's file locks
    # do not reach across machines (busy() asks both): its files are no leftovers.
    if not await asyncio.to_thread(st.scheduler.busy):
        await asyncio.to_thread(st.scheduler.clean)
    minutes = st.cfg.get("poll_minutes")
    if minutes and not bot.config.get("model.remote"):
        st.poller = asyncio.create_task(poll_history(bot, float(minutes) * 60), name="auto_finetune:poll")


@hookimpl
def shutdown(bot):
    st = _states.get(bot)
    if st is not None and st.poller is not None:
        st.poller.cancel()
    if st is not None and st.running:
        log.info("cancelling the running fine-tune job")
        st.job.cancel(grace=5)


@hookimpl
async def exchange_logged(bot, exchange):
    if bot.config.get("model.remote"):
        return  # a front end has no weights: the serving box fine-tunes (chatcore.remote.front_end_note)
    scopes = getattr(bot, "scopes", None)
    scope = scopes.scope_of(exchange.adapter, exchange.channel) if scopes is not None else None
    await consider(bot, scope if scope is not None and scope.finetune else None)  # a scope counts for its adapter


async def consider(bot: Any, scope: Any = None) -> None:
    """Start a fine-tune of `scope`'s adapter (None: the bot-wide model) when enough new exchanges wait."""
    st = state_of(bot)
    if not st.cfg.get("enabled", True) or st.running:
        return
    if scope is not None:
        every = st.cfg.get("every", 50)
        if await bot.store.run(scope_exchanges_since_finetune, bot, scope, every) >= every:
            try:
                await start_job(bot, scope)
            except JobBusy as exc:
                log.info("fine-tune of scope %s not started: %s", scope.name, exc)
            except Exception as exc:  # never let learning break answering
                st.last_attempt = time.time()
                log.warning("fine-tune of scope %s not started: %s", scope.name, exc)
        return
    every = st.cfg.get("every", 50)
    if await bot.store.run(bot.store.exchanges_since_finetune, up_to=every) < every:
        return
    cooldown = float(st.cfg.get("cooldown_minutes", 60)) * 60
    last = await bot.store.run(bot.store.last_finetune)
    since = time.time() - max(last["at"] if last else 0.0, st.last_attempt)
    if since < cooldown:
        return
    try:
        await start_job(bot)
    except JobBusy as exc:
        log.info("fine-tune not started: %s", exc)
    except Exception as exc:  # never let learning break answering
        st.last_attempt = time.time()
        log.warning("fine-tune not started: %s", exc)


async def poll_history(bot: Any, every_s: float) -> None:
    """A serving box's look at the history its front ends log to (chatcore.remote): no `exchange_logged`
    fires here for their exchanges, so the same counts are checked every `every_s` seconds."""
    while True:
        await asyncio.sleep(every_s)
        for scope in [s for s in bot.scopes.scopes if s.finetune] + [None]:
            await consider(bot, scope)


@hookimpl
async def user_forgotten(bot, user_key, deleted):
    """retrain_now: a serving model trained on this user is replaced by a fine-tune without them, now."""
    st = state_of(bot)
    serving = _source(bot.engine)
    if not contains_any(Path(serving) if serving else None, {user_key}):
        return None
    if st.cfg.get("on_forget", "retrain_next") != "retrain_now":
        return "The current model learned from you; the next fine-tune starts from the base without you."
    try:
        await start_job(bot)
    except Exception as exc:  # Busy, not enough data: the next fine-tune still leaves them out
        log.warning("retrain after /forget not started: %s", exc)
        return "The current model learned from you; the next fine-tune starts from the base without you."
    return "The current model learned from you: I started a fine-tune without you now."


async def start_job(bot: Any, scope: Any = None) -> Job:
    """Start a fine-tune job now (the bot-wide model, or a scope's adapter); its result is handled
    in the background. Raises JobBusy."""
    if bot.config.get("model.remote"):
        from chatcore.remote import front_end_note

        raise RuntimeError(front_end_note(bot.config))
    st = state_of(bot)
    if st.running:
        raise JobBusy("a fine-tune job is already running")
    st.last_attempt = time.time()
    # may look in the Hugging Face cache: off the event loop
    spec = await asyncio.to_thread(st.spec, bot) if scope is None else await asyncio.to_thread(st.scope_spec, bot, scope)
    st.job = st.scheduler.start(spec)
    log.info("fine-tune job %s started (pid %d)", st.job.id, st.job.pid)
    await _fire(bot, "finetune_started", bot=bot, job=st.job)
    st.task = asyncio.create_task(_follow(bot, st.job))
    return st.job


async def _follow(bot: Any, job: Job) -> dict[str, Any]:
    result = await job.wait_async()
    await finish(bot, job, result)
    return result


async def finish(bot: Any, job: Any, result: dict[str, Any]) -> None:
    """Act on a job's result: hooks, and the hot swap on promotion."""
    await _fire(bot, "finetune_finished", bot=bot, job=job, result=result)
    status = result.get("status")
    if status == "promoted" and result.get("scope"):
        # the scope's next request loads the new adapter (chatcore.batching); nothing to swap
        log.info("scope %s now serves adapter %s", result["scope"], result.get("candidate"))
        await _fire(bot, "finetune_promoted", bot=bot, result=result)
    elif status == "promoted":
        try:
            engine = await asyncio.to_thread(engine_for, bot, Path(result["candidate"]))
        except Exception as exc:  # the old model keeps serving
            log.error("promoted checkpoint %s failed to load, still serving %s: %s",
                      result.get("candidate"), bot.engine.model_id, exc)
            result = {**result, "status": "failed", "error": f"loading the promoted model failed: {exc}"}
            return
        bot.generator.swap(engine)  # fully loaded first: no request sees half a model
        log.info("now serving %s (validation loss %.4f, was %.4f)", engine.model_id,
                 result["gate"]["candidate_val_loss"], result["gate"]["serving_val_loss"])
        await _fire(bot, "finetune_promoted", bot=bot, result=result)
    elif status == "rejected":
        log.info("candidate rejected: %s", result["gate"]["reason"])
        await _fire(bot, "finetune_rejected", bot=bot, result=result)
    else:
        log.warning("fine-tune job %s: %s", result.get("job"), result.get("error", status))


def engine_for(bot: Any, checkpoint: Path) -> Any:
    """A complete engine for `checkpoint`, built like the serving one (`chatcore.weights.engine_for`)."""
    from chatcore import weights

    return weights.engine_for(bot.config, checkpoint, getattr(bot.engine, "tokenizer", None))


async def _fire(owner: Any, hook: str, **kwargs: Any) -> None:
    await call_hook(owner.pm, hook, **kwargs)


# --- /finetune -----------------------------------------------------------------------


async def finetune_command(bot, message, args):
    """Fine-tune on the new conversations now (status, cancel)."""
    st = state_of(bot)
    arg = args.strip().lower()
    if arg == "status":
        if st.running:
            return f"Fine-tune job {st.job.id} is running: {st.job.progress() or 'starting'}"
        reg = Registry(st.models_dir).current()
        since = await bot.store.run(bot.store.exchanges_since_finetune)
        return (f"No fine-tune is running. {since} new exchange(s) since the "
                f"last one; serving {reg.name if reg else 'the base model'}.")
    if arg == "cancel":
        if not st.running:
            return "No fine-tune is running."
        await asyncio.to_thread(st.job.cancel)
        return "Fine-tune cancelled; the serving model is unchanged."
    if arg:
        return "Usage: /finetune [status|cancel]"
    try:
        job = await start_job(bot)
    except JobBusy as exc:
        return f"Not started: {exc}."
    except Exception as exc:
        return f"Not started: {exc}"
    return f"Fine-tune job {job.id} started; I keep answering meanwhile."
