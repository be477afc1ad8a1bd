"""The auto-fine-tune plugin: the counter, the job in the background, the hot swap, /finetune."""

from __future__ import annotations

import asyncio

import pytest
import torch

from chatcore import checkpoint, hookimpl
from chatcore.engine import Engine
from chatcore.model import GPT, GPTConfig
from chatcore.store import Store
from chatcore.testing import ScriptedEngine, make_bot

QUICK = dict(max_iters=10, eval_interval=5, warmup_iters=2, batch_size=4, block_size=64,
             learning_rate=3e-3, min_lr=3e-4)


def tiny(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=128, n_layer=2, n_head=2, n_embd=32))


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []

    @hookimpl
    def finetune_started(self, bot, job):
        self.events.append(("started", {"job": job.id}))

    @hookimpl
    def finetune_finished(self, bot, job, result):
        self.events.append(("finished", result))

    @hookimpl
    def finetune_promoted(self, bot, result):
        self.events.append(("promoted", result))

    @hookimpl
    def finetune_rejected(self, bot, result):
        self.events.append(("rejected", result))


@pytest.mark.slow  # a worker process: torch import + a short training
async def test_counter_triggers_at_n_survives_restart_and_promotion_swaps(tmp_path, caplog, sample_conversations):
    from chatcore.plugins import auto_finetune

    base = checkpoint.save(tiny(), tmp_path / "base", base_model="random-test")
    with Store(tmp_path / "history.db") as store:  # make_bot's data_dir is tmp_path
        store.import_jsonl(sample_conversations)
        store.mark_finetune()  # the sample is old news: the counter starts at 0
    config = {
        "model": {"checkpoint": str(base), "device": "cpu", "threads": 1},
        "plugins": {"auto_finetune": {"every": 3, "cooldown_minutes": 0, "threads": 1, "training": QUICK}},
    }

    def scripted() -> ScriptedEngine:
        engine = ScriptedEngine(["sure, sounds good", "I like that a lot", "tell me more about it"])
        engine.meta = {"source": str(base)}  # what Engine.meta carries for a loaded checkpoint
        return engine

    def msg(text: str, user: str):
        from chatcore.message import Message

        # stdin trains by default (opt_out); an adapter with no training policy ("test") never does.
        return Message(text=text, adapter="stdin", channel="c", user=user, is_direct=True)

    bot = make_bot(tmp_path, engine=scripted(), config=config)
    await bot.handle(msg("hello there", "alice"))
    await bot.handle(msg("what do you like?", "bob"))
    assert auto_finetune.state_of(bot).job is None  # 2 < 3
    await bot.close()

    recorder = Recorder()
    bot = make_bot(tmp_path, engine=scripted(), config=config, plugins=[recorder])  # a restart
    try:
        assert bot.store.exchanges_since_finetune() == 2
        await bot.handle(msg("any plans for the weekend?", "carol"))
        st = auto_finetune.state_of(bot)
        assert st.job is not None and [e[0] for e in recorder.events] == ["started"]
        # the bot keeps answering while the job runs in its own process
        reply = await bot.handle(msg("still there?", "dave"))
        assert reply is not None and reply.text
        result = await asyncio.wait_for(st.task, 180)
    finally:
        st = auto_finetune._states.get(bot)
        if st is not None and st.running:
            st.job.cancel()
    assert result["status"] == "promoted", result
    assert [e[0] for e in recorder.events] == ["started", "finished", "promoted"]
    assert recorder.events[2][1]["gate"]["candidate_val_loss"] < recorder.events[2][1]["gate"]["serving_val_loss"]
    # hot-swapped to the candidate: a real engine now serves
    assert isinstance(bot.engine, Engine) and bot.engine.meta["source"] == result["candidate"]
    # the counter restarts from the newest exchange the job read: dave's counts again if it came later
    assert bot.store.exchanges_since_finetune() == (1 if reply.exchange_id > result["up_to_id"] else 0)
    assert result["data"]["train_exchanges"] + result["data"]["val_exchanges"] >= 350
    await bot.close()


async def test_finetune_command_is_admin_only_and_reports_status(tmp_path):
    engine = ScriptedEngine()
    bot = make_bot(tmp_path, engine=engine, config={"bot": {"admins": ["test:root"]},
                                                   "plugins": {"auto_finetune": {"every": 5}}})
    from chatcore.message import Message

    def msg(text: str, user: str) -> Message:
        return Message(text=text, adapter="test", channel="c", user=user, is_direct=True)

    try:
        assert "Unknown command" in (await bot.handle(msg("/finetune", "eve"))).text
        status = (await bot.handle(msg("/finetune status", "root"))).text
        assert "No fine-tune is running" in status and "base model" in status
        # a scripted engine has no weights to start from: a clear refusal, nothing started
        assert "Not started" in (await bot.handle(msg("/finetune", "root"))).text
        assert (await bot.handle(msg("/finetune cancel", "root"))).text == "No fine-tune is running."
    finally:
        await bot.close()
