"""A rollback or promotion never quietly brings back a checkpoint holding data of users since forgotten."""

from __future__ import annotations

import logging

from aiohttp.test_utils import TestClient, TestServer

from chatcore import checkpoint
from chatcore.cli import main
from chatcore.dashboard import Dashboard
from chatcore.registry import Registry
from chatcore.store import Store

from .dashboard_fixtures import dashboard_bot
from .engine_fixtures import tiny_model
from .test_dashboard import session


def finetune(models, stamp: str, users: list[str], seed: int = 0):
    return checkpoint.save(tiny_model(seed=seed), models / f"finetuned_{stamp}",
                           lineage={"manifest": f"sha256:{stamp}", "exchange_ids": [1], "users": users,
                                    "file_rows": 0})


def test_cli_rollback_to_a_checkpoint_with_forgotten_users_needs_force(tmp_path, capsys, caplog):
    models = tmp_path / "models"
    old = finetune(models, "20260101_000000", ["stdin:alice", "stdin:bob"])
    new = finetune(models, "20260102_000000", ["stdin:bob"], seed=1)
    registry = Registry(models)
    registry.promote(old)
    registry.promote(new)
    with Store(tmp_path / "history.db") as store:
        store.forget_user("stdin:alice")
    config = tmp_path / "bot.yaml"
    config.write_text(f"bot:\n  data_dir: {tmp_path}\n")

    assert main(["model", "rollback", "-c", str(config)]) == 1
    err = capsys.readouterr().err
    assert "holds data of 1 user(s) since forgotten or opted out" in err
    assert "fresh fine-tune" in err and "--force" in err
    assert registry.current() == new  # nothing changed
    assert registry.history()["promoted"][-1]["name"] == new.name

    with caplog.at_level(logging.WARNING, logger="chatcore.lineage"):
        assert main(["model", "rollback", "-c", str(config), "--force"]) == 0
    out = capsys.readouterr().out
    assert f"now serving {old.name}" in out and "forced" in out
    assert registry.current() == old
    assert any("forced" in r.getMessage() and old.name in r.getMessage() for r in caplog.records)


def test_cli_rollback_to_a_clean_checkpoint_or_the_base_needs_nothing(tmp_path, capsys):
    models = tmp_path / "models"
    old = finetune(models, "20260101_000000", ["stdin:bob"])
    new = finetune(models, "20260102_000000", ["stdin:alice"], seed=1)
    Registry(models).promote(old)
    Registry(models).promote(new)
    with Store(tmp_path / "history.db") as store:
        store.forget_user("stdin:alice")  # only the serving one holds alice: rolling away from it is welcome
    config = tmp_path / "bot.yaml"
    config.write_text(f"bot:\n  data_dir: {tmp_path}\n")
    assert main(["model", "rollback", "-c", str(config)]) == 0
    assert main(["model", "rollback", "-c", str(config)]) == 0  # to the base model: no chat data
    assert Registry(models).current() is None


async def test_dashboard_rollback_and_promote_need_allow_forgotten(tmp_path):
    bot = dashboard_bot(tmp_path, metrics_token=None)
    server = Dashboard(bot, bot.config["dashboard"])
    client = TestClient(TestServer(server.app))
    await client.start_server()
    try:
        csrf = await session(client)
        headers = {"X-CSRF-Token": csrf}
        models = server.models_dir
        registry = Registry(models)
        kept = finetune(models, "20260103_000000", ["discord:u1"], seed=3)
        registry.reject(kept)
        bot.store.forget_user("discord:u1")

        # Promote a kept checkpoint that learned from u1: refused, then allowed with the second flag.
        r = await client.post("/api/actions/promote", json={"confirm": True, "name": kept.name}, headers=headers)
        assert r.status == 409
        body = await r.json()
        assert body["forgotten_users"] == 1 and "holds data of 1 user(s)" in body["error"]
        assert '"allow_forgotten": true' in body["error"]
        assert registry.current().name == "finetuned_20260101_000002.safetensors"
        r = await client.post("/api/actions/promote", headers=headers,
                              json={"confirm": True, "name": kept.name, "allow_forgotten": True})
        assert r.status == 200, await r.text()
        assert registry.current() == kept

        # Roll back to the one it replaced: no lineage recorded and older than the /forget, so it may hold u1.
        r = await client.post("/api/actions/rollback", json={"confirm": True}, headers=headers)
        assert r.status == 409 and (await r.json())["forgotten_users"] == 1
        assert registry.current() == kept
        r = await client.post("/api/actions/rollback", json={"confirm": True, "allow_forgotten": True},
                              headers=headers)
        assert r.status == 200, await r.text()
        assert registry.current().name == "finetuned_20260101_000002.safetensors"

        entries = (await (await client.get("/api/audit")).json())["entries"]
        assert [(e["action"], e["ok"]) for e in entries[:4]] == [
            ("rollback", True), ("rollback", False), ("promote", True), ("promote", False)]
        assert "allow_forgotten" in entries[0]["detail"] and "forgotten" in entries[1]["detail"]
    finally:
        await client.close()
        await bot.close()


def test_prune_forgotten_lists_then_deletes_kept_checkpoints_but_never_the_serving_one(tmp_path, capsys):
    models = tmp_path / "models"
    dirty = finetune(models, "20260101_000000", ["stdin:alice", "stdin:bob"])
    clean = finetune(models, "20260102_000000", ["stdin:bob"], seed=1)
    serving = finetune(models, "20260103_000000", ["stdin:alice"], seed=2)
    registry = Registry(models)
    for p in (dirty, clean, serving):
        registry.promote(p)
    with Store(tmp_path / "history.db") as store:
        store.forget_user("stdin:alice")
    config = tmp_path / "bot.yaml"
    config.write_text(f"bot:\n  data_dir: {tmp_path}\n")

    assert main(["model", "prune-forgotten", "-c", str(config)]) == 0  # dry run
    out = capsys.readouterr().out
    assert f"would delete {dirty.name}: data of 1 user(s)" in out and "--yes" in out
    assert clean.name not in out and serving.name not in out
    assert dirty.is_file()

    assert main(["model", "prune-forgotten", "-c", str(config), "--yes"]) == 0
    assert f"deleted {dirty.name}" in capsys.readouterr().out
    assert not dirty.is_file() and not dirty.with_suffix(".json").exists()
    assert clean.is_file() and serving.is_file()  # the serving one waits for a fine-tune to replace it
    assert dirty.name not in [e["name"] for e in registry.history()["promoted"]]
    assert registry.current() == serving
    assert main(["model", "prune-forgotten", "-c", str(config)]) == 0
    assert "no kept checkpoint holds data" in capsys.readouterr().out
