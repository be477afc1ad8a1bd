"""Consent through the real adapters and their fakes: who may teach the bot, /learn, /mydata, /status."""

from __future__ import annotations

import io
import json

import aiohttp
import pytest

from chatcore.config import ConfigError
from chatcore.training.data import apply_guards, from_store

from .conftest import build_bot, eventually
from .fake_discord import user

ALICE, BOB = user(5, "alice"), user(6, "bob")
S_ALICE, S_BOB = "UALICE001", "UBOB00001"
DISCORD_ON = {"i_have_discords_permission_to_train": True}
SLACK_ON = {"i_have_slacks_permission_to_train": True}


def trained_users(bot) -> set[str]:
    kept, _ = apply_guards(from_store(bot.store))
    return {ex.user_id for ex in kept}


async def dm(fake, text: str, author=ALICE, count: int = 1) -> list[dict]:
    before = len(fake.sent())
    await fake.send_message(text, author=author, dm=True)
    return (await fake.wait_sent(before + count))[before:]


# --- Discord ---------------------------------------------------------------------------


async def test_discord_exchanges_never_reach_training_under_the_default_policy(discord_bot, fake_discord):
    bot, _ = await discord_bot()
    await fake_discord.send_message(f"<@{fake_discord.bot_user['id']}> hi all", author=ALICE,
                                    mentions=[fake_discord.bot_user])
    await fake_discord.wait_sent(1)
    await dm(fake_discord, "/learn on")  # even a yes cannot turn on what the operator has not
    await dm(fake_discord, "hello in private")
    rows = await eventually(lambda: list(bot.store.exchanges()) if len(list(bot.store.exchanges())) == 2 else None)
    assert [(e.policy, e.trainable) for e in rows] == [("off", False), ("off", False)]
    assert rows[0].workspace == str(fake_discord.guild_id) and rows[1].workspace is None  # guild; DM has none
    kept, report = apply_guards(from_store(bot.store))
    assert kept == [] and report.removed["no_consent"] == 2
    assert bot.store.exchanges_since_finetune() == 0  # auto-fine-tune never even counts them
    (status,) = await dm(fake_discord, "/status")
    assert "this conversation does not teach me: training is off here" in status["content"]


def test_turning_discord_or_slack_training_on_needs_the_permission_key(tmp_path):
    for adapter, settings in (("discord", {"token": "t"}), ("slack", {"bot_token": "x", "app_token": "y"})):
        with pytest.raises(ConfigError) as err:
            build_bot(tmp_path, adapter, {**settings, "training": {"channels": {"123": "opt_in"}}})
        text = str(err.value)
        assert f"i_have_{adapter}s_permission_to_train: true" in text and "docs/privacy.md" in text
    bot = build_bot(tmp_path, "discord", {"token": "t", "training": {"policy": "opt_in", **DISCORD_ON}})
    bot.store.close()


async def test_opt_in_trains_only_users_who_said_yes(discord_bot, fake_discord):
    bot, _ = await discord_bot({"training": {"policy": "opt_in", **DISCORD_ON}})
    (answer,) = await dm(fake_discord, "/learn on")
    assert "can teach me" in answer["content"]
    await dm(fake_discord, "I am alice")
    await dm(fake_discord, "I am bob", author=BOB)
    (shown,) = await dm(fake_discord, "/learn", author=BOB)
    assert "you have not said" in shown["content"] and "opt-in" in shown["content"]
    await eventually(lambda: len(list(bot.store.exchanges())) == 2)
    assert trained_users(bot) == {f"discord:{ALICE['id']}"}
    # A later no reaches back over what was said with a yes.
    await dm(fake_discord, "/learn off")
    assert trained_users(bot) == set()


async def test_mydata_is_a_discord_file_of_exactly_the_users_rows_and_only_in_a_dm(discord_bot, fake_discord):
    bot, _ = await discord_bot()
    await dm(fake_discord, "alice one")
    await dm(fake_discord, "bob one", author=BOB)
    await dm(fake_discord, "alice two")
    await bot.rate(bot.store.last_exchange(("discord", str(fake_discord.dm_channel_id), ALICE["id"])), "x:y", -1)
    (sent,) = await dm(fake_discord, "/mydata")
    (upload,) = sent["uploaded"]
    data = json.loads(upload["data"])
    assert upload["filename"] == f"mydata-discord-{ALICE['id']}.json" and data["user"] == f"discord:{ALICE['id']}"
    assert [e["user_text"] for e in data["exchanges"]] == ["alice one", "alice two"]
    assert {e["user"] for e in data["exchanges"]} == {ALICE["id"]} and data["votes"] == []  # not their vote
    await fake_discord.send_message(f"<@{fake_discord.bot_user['id']}> /mydata", author=ALICE,
                                    mentions=[fake_discord.bot_user])
    public = (await fake_discord.wait_sent(len(fake_discord.sent()) + 1))[-1]
    assert "direct message" in public["content"] and not public.get("uploaded")


# --- Slack -------------------------------------------------------------------------------


async def test_slack_policy_change_is_not_retroactive_until_relabelled(slack_bot, fake_slack, tmp_path, capsys):
    bot, _ = await slack_bot()  # default: off
    await fake_slack.push(fake_slack.event_body(fake_slack.mention("before", S_ALICE)))
    await fake_slack.wait_posts(1)
    await eventually(lambda: list(bot.store.exchanges()))
    (old,) = bot.store.exchanges()
    assert old.workspace == fake_slack.team_id and old.policy == "off" and not old.trainable
    # The operator turns training on for the channel, with Slack's permission.
    on = {"training": {"channels": {"C0000001": "opt_out"}, **SLACK_ON}}
    bot2, adapter2 = await slack_bot("http", on)
    url = f"http://127.0.0.1:{adapter2.port}/slack/events"
    status, _ = await fake_slack.post_signed(url, fake_slack.event_body(fake_slack.mention("after", S_ALICE)))
    assert status == 200
    await fake_slack.wait_posts(2)
    await eventually(lambda: len(list(bot2.store.exchanges())) == 2)
    kept, report = apply_guards(from_store(bot2.store))
    assert [ex.user for ex in kept] == ["after"] and report.removed["no_consent"] == 1

    # Reaching back is one explicit command that says how many rows it touches; dry run first.
    from chatcore.cli import main

    config = tmp_path / "bot.yaml"
    config.write_text(f"bot:\n  data_dir: {tmp_path}\nadapters:\n  slack:\n    training:\n"
                      "      i_have_slacks_permission_to_train: true\n")
    args = ["history", "relabel", "-c", str(config), "--adapter", "slack", "--channel", "C0000001", "--policy", "opt_out"]
    assert main(args) == 0
    assert "would relabel 2 exchange(s) as opt_out: 1 become trainable" in capsys.readouterr().out
    assert len(apply_guards(from_store(bot2.store))[0]) == 1
    assert main([*args, "--yes"]) == 0
    assert "relabelled 2 exchange(s)" in capsys.readouterr().out
    assert len(apply_guards(from_store(bot2.store))[0]) == 2
    config.write_text(f"bot:\n  data_dir: {tmp_path}\n")  # without the permission key: refused
    assert main(args) == 1 and "i_have_slacks_permission_to_train" in capsys.readouterr().err


async def test_mydata_in_a_slack_dm_is_uploaded_as_a_file(slack_bot, fake_slack):
    bot, _ = await slack_bot()
    await fake_slack.push(fake_slack.event_body(fake_slack.message("hello there", S_ALICE)))
    await fake_slack.push(fake_slack.event_body(fake_slack.message("bob here", S_BOB, channel="D0000002")))
    await fake_slack.wait_posts(2)
    await fake_slack.push(fake_slack.event_body(fake_slack.message("/mydata", S_ALICE)))
    await fake_slack.wait_posts(3)
    (upload,) = await eventually(lambda: [f for f in fake_slack.files.values() if f.get("channel")])
    data = json.loads(upload["data"])
    assert upload["channel"] == "D0000001" and upload["filename"] == f"mydata-slack-{S_ALICE}.json"
    assert [e["user_text"] for e in data["exchanges"]] == ["hello there"]
    assert fake_slack.unhandled == []


# --- HTTP and stdin --------------------------------------------------------------------------


async def test_http_trains_on_api_key_requests_only_and_returns_mydata_as_json(http_bot, tmp_path):
    bot, _, url = await http_bot({"api_key": "k"})
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer k"}) as session:
        for text in ("hi", "/mydata"):
            async with session.post(f"{url}/chat", json={"message": text, "user": "ana"}) as r:
                body = await r.json()
    (row,) = bot.store.exchanges()
    assert row.policy == "opt_out" and row.trainable
    (f,) = body["files"]
    assert [e["user_text"] for e in f["content"]["exchanges"]] == ["hi"]

    anon, _, anon_url = await http_bot({"port": 0}, config={"store": {"path": str(tmp_path / "anon.db")}})
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{anon_url}/chat", json={"message": "hello", "user": "ana"}) as r:
            assert r.status == 200
        async with session.post(f"{anon_url}/chat", json={"message": "/mydata", "user": "ana"}) as r:
            refused = await r.json()
    (row,) = anon.store.exchanges()
    assert row.policy == "off" and not row.trainable  # anyone can claim "ana" without a key
    assert "files" not in refused and "can't be sure who you are" in refused["response"]


async def test_stdin_writes_mydata_to_a_file_and_trains_by_default(tmp_path):
    from chatcore.adapters.stdin import StdinAdapter

    bot = build_bot(tmp_path, "stdin", {"user": "op", "exports_dir": str(tmp_path / "exports")})
    out = io.StringIO()
    adapter = StdinAdapter(bot, bot.config["adapters"]["stdin"], stdin=io.BytesIO(b"hello\n/mydata\n"), stdout=out)
    try:
        await adapter.start()
        path = tmp_path / "exports" / "mydata-stdin-op.json"
        assert f"written to {path}" in out.getvalue()
        assert [e["user_text"] for e in json.loads(path.read_text())["exchanges"]] == ["hello"]
        assert trained_users(bot) == {"stdin:op"}
    finally:
        await bot.close()
