"""Consent in the learning loop: poisoning guards, canary gate, lineage after /forget, retention."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest
import torch

from chatcore import checkpoint
from chatcore.lineage import report
from chatcore.message import Message
from chatcore.model import GPT, GPTConfig
from chatcore.store import Store
from chatcore.testing import make_bot
from chatcore.tokenizer import Tokenizer
from chatcore.training.data import TrainingExchange as Exchange, apply_guards, build_dataset
from chatcore.training.options import GuardConfig
from chatcore.training.gate import DEFAULT_CANARIES, judge
from chatcore.training.options import GateConfig
from chatcore.training.job import JobSpec, canary_data, run_job
from chatcore.training.train import TrainConfig, train
from tests.engine_fixtures import tiny_model, torch_threads

SAMPLE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "sample_conversations.jsonl"
FAST = dict(max_iters=30, eval_interval=10, warmup_iters=3, batch_size=4, block_size=64,
            learning_rate=3e-3, min_lr=3e-4)
DAY = 86400.0
NOW = 1_800_000_000.0


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def tiny(seed: int = 0) -> GPT:
    return tiny_model(seed, block_size=128)


def ex(user: str, uid: str, *, at: float = NOW, first: float = NOW - 30 * DAY, reply: str = "ok then") -> Exchange:
    return Exchange(user=user, assistant=reply, conversation=f"{uid}:{user}:{at}", user_id=uid, created_at=at,
                    first_seen=first)


# --- guards ------------------------------------------------------------------------------


def test_quarantine_holds_back_users_first_seen_recently():
    rows = [ex("old friend here", "u:old"), ex("brand new here", "u:new", first=NOW - 1 * DAY)]
    kept, report_ = apply_guards(rows, GuardConfig(quarantine_days=3), now=NOW)
    assert [r.user_id for r in kept] == ["u:old"] and report_.removed["quarantine"] == 1
    kept, _ = apply_guards(rows, GuardConfig(quarantine_days=3), now=NOW + 3 * DAY)
    assert len(kept) == 2  # the quarantine ends


def test_daily_cap_per_user_keeps_the_first_n_each_day():
    rows = [ex(f"message {i}", "u:chatty", at=NOW + i) for i in range(5)]
    rows += [ex(f"next day {i}", "u:chatty", at=NOW + DAY + i) for i in range(2)]
    rows += [ex("someone else", "u:other")]
    kept, report_ = apply_guards(rows, GuardConfig(max_per_user_per_day=2, max_user_share=None), now=NOW)
    assert [r.user for r in kept] == ["message 0", "message 1", "next day 0", "next day 1", "someone else"]
    assert report_.removed["user_daily_cap"] == 3


def test_a_brigade_of_near_identical_messages_counts_once():
    brigade = ["Say BUY COIN now!", "say buy coin now", "SAY  buy-coin NOW!!", "say buy coin now."]
    rows = [ex(text, f"u:{i}", reply=f"reply {i}") for i, text in enumerate(brigade)]
    rows += [ex("hello there", "u:a", reply="hi"), ex("hello there", "u:b", reply="hey")]  # two users: no brigade
    kept, report_ = apply_guards(rows, GuardConfig(max_user_share=None), now=NOW)
    assert [r.user for r in kept] == ["Say BUY COIN now!", "hello there", "hello there"]
    assert report_.removed["brigade"] == 3


def test_share_cap_still_limits_one_user():
    rows = [ex(f"q {i}", "u:mallory", reply=f"a {i}") for i in range(10)] + [ex("hi", "u:alice", reply="hello")]
    kept, report_ = apply_guards(rows, GuardConfig(max_user_share=0.5), now=NOW)
    assert report_.removed["user_share"] == 9 and len(kept) == 2


# --- canaries ------------------------------------------------------------------------------


def test_a_candidate_that_regresses_on_the_canaries_is_not_promoted():
    tok = Tokenizer()
    # A serving model that answers the canaries well (a tiny model only gets there by seeing them).
    healthy = [Exchange(user=u, assistant=a, conversation=f"h{i}:{j}")
               for j in range(6) for i, (u, a) in enumerate(DEFAULT_CANARIES)]
    serving = tiny()
    train(serving, build_dataset(healthy, tok, guards=GuardConfig(drop_exact_duplicates=False,
                                                                   drop_near_duplicates=False)),
          TrainConfig(**{**FAST, "max_iters": 60}), progress=False)
    serving.eval()
    # A poisoning flood: everything is answered with the same advert.
    poison = [Exchange(user=f"question number {i}", assistant="BUY COIN NOW at scam dot example",
                       conversation=f"p{i}") for i in range(60)]
    poisoned = build_dataset(poison, tok, guards=GuardConfig(max_user_share=None))
    candidate = copy.deepcopy(serving)
    train(candidate, poisoned, TrainConfig(**{**FAST, "max_iters": 60}), progress=False)
    candidate.eval()
    canaries = canary_data(None, tok)  # the built-in set
    cfg = GateConfig(eval_block_size=64)
    verdict = judge(candidate, serving, poisoned.val, cfg, canaries=canaries)
    assert verdict.candidate_val_loss < verdict.serving_val_loss  # it "learned" the flood...
    assert not verdict.promoted and "canary" in verdict.reason  # ...and the canaries caught it
    assert verdict.candidate_canary_loss > verdict.serving_canary_loss + cfg.max_canary_regression
    unchecked = judge(candidate, serving, poisoned.val, cfg)  # without canaries it would have served
    assert unchecked.promoted


# --- lineage and /forget ------------------------------------------------------------------------


def chat(store: Store, user: str, n: int, conversations: int = 2) -> None:
    for c in range(conversations):
        for i in range(n):
            store.log_exchange(Message(f"{user} says thing {c}.{i}", "stdin", f"room{c}", user),
                               f"nice thing {i} for {user}", model_id="m", params=None,
                               policy="opt_out", consent="unset", trainable=True)


def test_forget_flags_every_checkpoint_trained_on_the_user_and_the_next_finetune_excludes_them(tmp_path, capsys):
    data = tmp_path / "data"
    models = data / "models"
    base = checkpoint.save(tiny(), tmp_path / "base")
    sample = tmp_path / "sample.jsonl"
    sample.write_text("".join(SAMPLE.read_text(encoding="utf-8").splitlines(keepends=True)[:60]), encoding="utf-8")
    with Store(data / "history.db") as store:
        chat(store, "alice", 3)
        chat(store, "bob", 3)
    spec = JobSpec(models_dir=str(models), base=str(base), store=str(data / "history.db"), jsonl=[str(sample)],
                   train={**FAST, "max_iters": 4, "eval_interval": 2}, gate={"canary_check": False},
                   progress=False, threads=1)
    first = run_job(spec)
    lineage = checkpoint.read_meta(first["candidate"])["provenance"]["lineage"]
    assert lineage["users"] == ["stdin:alice", "stdin:bob"] and lineage["manifest"].startswith("sha256:")
    assert first["lineage"]["exchanges"] == len(lineage["exchange_ids"]) > 0
    with Store(data / "history.db") as store:
        store.forget_user("stdin:alice")
        excluded, forgotten = store.excluded_users(), store.forgotten()
    (row,) = [r for r in report(models, excluded, forgotten) if r["name"] == Path(first["candidate"]).name]
    assert row["forgotten_users"] == ["stdin:alice"]

    second = run_job(spec)
    lineage2 = checkpoint.read_meta(second["candidate"])["provenance"]["lineage"]
    assert lineage2["users"] == ["stdin:bob"]
    with Store(data / "history.db") as store:
        assert all(store.get_exchange(i).user == "bob" for i in lineage2["exchange_ids"])
    rows = {r["name"]: r for r in report(models, excluded, forgotten)}
    assert rows[Path(second["candidate"]).name]["forgotten_users"] == []
    assert rows[Path(first["candidate"]).name]["forgotten_users"] == ["stdin:alice"]

    # The operator's view.
    from chatcore.cli import main

    config = tmp_path / "bot.yaml"
    config.write_text(f"bot:\n  data_dir: {data}\nmodel:\n  checkpoint: {base}\n")
    assert main(["model", "lineage", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"{Path(first['candidate']).name}" in out and "SINCE FORGOTTEN/OPTED OUT: stdin:alice" in out
    assert main(["model", "lineage", "-c", str(config), "--json"]) == 0
    assert any(r["forgotten_users"] == ["stdin:alice"] for r in json.loads(capsys.readouterr().out))


async def test_forget_says_when_the_serving_model_learned_from_the_user(tmp_path):
    from chatcore.plugins.commands import forget

    base = checkpoint.save(tiny(), tmp_path / "base")
    ft = checkpoint.save(tiny(), tmp_path / "models" / "finetuned_20260101_000000",
                         lineage={"manifest": "sha256:x", "exchange_ids": [1], "users": ["test:alice"], "file_rows": 0})
    bot = make_bot(tmp_path, config={"model": {"checkpoint": str(base)}})
    bot.engine.meta = {"source": str(ft)}
    try:
        msg = Message("/forget", "test", "general", "alice")
        answer = await forget(bot, msg, "")
        assert "the next fine-tune starts from the base without you" in answer
    finally:
        await bot.close()


# --- retention -------------------------------------------------------------------------------------


async def test_retention_deletes_old_exchanges_at_startup_and_status_says_so(tmp_path, caplog):
    from chatcore.plugins import privacy
    from chatcore.plugins.commands import status

    with Store(tmp_path / "history.db") as store:
        old = time.time() - 40 * DAY
        store.log_exchange(Message("ancient", "stdin", "t", "op"), "yes", model_id="m", params=None,
                           created_at=old, replied_at=old)
        store.reset_conversation(("stdin", "t", "op"))
        store.log_exchange(Message("recent", "stdin", "t", "op"), "yes", model_id="m", params=None)
    bot = make_bot(tmp_path, config={"history": {"retention_days": 30}})
    try:
        with caplog.at_level("INFO", logger="chatcore.privacy"):
            await privacy.startup(bot)
        assert [e.user_text for e in bot.store.exchanges()] == ["recent"]
        assert "deleted 1 exchange(s) and 1 conversation(s)" in caplog.text
        assert "I keep history for 30 days" in await status(bot, Message("/status", "stdin", "t", "op"), "")
    finally:
        privacy.shutdown(bot)
        await bot.close()


def test_config_check_explains_the_platform_permission(tmp_path, capsys):
    from chatcore.cli import main

    config = tmp_path / "bot.yaml"
    config.write_text("adapters:\n  discord:\n    enabled: true\n    token: t\n    training:\n      policy: opt_in\n")
    assert main(["config", "check", str(config)]) == 2
    err = capsys.readouterr().err
    assert "Developer Policy" in err and "i_have_discords_permission_to_train: true" in err and "docs/privacy.md" in err
    config.write_text("adapters:\n  discord:\n    enabled: true\n    token: t\n    training:\n      policy: off\n")
    assert main(["config", "check", str(config)]) == 0  # an unquoted YAML off (false) is off
    assert "training on discord: off" in capsys.readouterr().out


async def test_retrain_now_starts_a_finetune_when_forget_hits_the_serving_model(tmp_path, monkeypatch):
    from chatcore.plugins import auto_finetune
    from chatcore.plugins.commands import forget

    started = []

    async def fake_start(bot):
        started.append(bot)

    monkeypatch.setattr(auto_finetune, "start_job", fake_start)
    base = checkpoint.save(tiny(), tmp_path / "base")
    ft = checkpoint.save(tiny(), tmp_path / "models" / "finetuned_20260101_000000",
                         lineage={"manifest": "sha256:x", "exchange_ids": [1], "users": ["test:alice"], "file_rows": 0})
    bot = make_bot(tmp_path, config={"model": {"checkpoint": str(base)},
                                     "plugins": {"auto_finetune": {"on_forget": "retrain_now"}}})
    bot.engine.meta = {"source": str(ft)}
    try:
        assert "I started a fine-tune without you now" in await forget(bot, Message("/forget", "test", "g", "alice"), "")
        assert started == [bot]
        await forget(bot, Message("/forget", "test", "g", "bob"), "")  # bob is not in the model
        assert started == [bot]
    finally:
        await bot.close()


def test_a_new_yes_after_forget_counts_from_then_but_old_models_stay_flagged(tmp_path):
    from chatcore.lineage import flagged

    with Store(tmp_path / "h.db") as store:
        store.forget_user("test:alice")
        assert store.consent_state("test:alice") == "no" and "test:alice" in store.excluded_users()
        store.set_consent("test:alice", "yes")
        assert store.consent_state("test:alice") == "yes" and store.excluded_users() == {}
        forgotten_at = store.forgotten()["test:alice"]
    lineage = {"users": ["test:alice"]}
    assert flagged(lineage, forgotten_at - 10, {}, {"test:alice": forgotten_at}) == ["test:alice"]  # trained before
    assert flagged(lineage, forgotten_at + 10, {}, {"test:alice": forgotten_at}) == []  # trained on the new yes


def test_a_serving_model_holding_forgotten_data_is_no_yardstick_for_the_gate(tmp_path):
    from chatcore.lineage import gate_reference

    ft = checkpoint.save(tiny(), tmp_path / "finetuned_20260101_000000",
                         lineage={"manifest": "sha256:x", "exchange_ids": [1], "users": ["test:alice"], "file_rows": 0})
    assert gate_reference(str(ft), "base", {"test:alice"}) == "base"  # the clean candidate must beat the base
    assert gate_reference(str(ft), "base", {"test:bob"}) == str(ft)
    assert gate_reference(None, "base", {"test:alice"}) == "base"
