"""Discord sharding: instances split the gateway shards (real discord.py AutoShardedClient against the fake gateway)."""

from __future__ import annotations

from pathlib import Path

import pytest

from chatcore.config import ConfigError

from .conftest import Running, build_bot
from .fake_discord import user

ALICE = user(11, "alice")


async def test_two_instances_identify_as_their_shards_and_both_answer(tmp_path: Path, fake_discord, monkeypatch):
    from chatcore.adapters.discord import DiscordAdapter

    monkeypatch.setattr(DiscordAdapter, "guild_ready_timeout", 0.05)
    running = Running()
    bots = {}
    try:
        for shard in (0, 1):  # one data dir: both instances share its history.db
            bot = build_bot(tmp_path, "discord", {"token": fake_discord.token, "shard_count": 2, "shard_ids": [shard]})
            adapter = bot.enabled_adapters(["discord"])[0]
            await running.start(bot, adapter, adapter.ready.wait)
            bots[shard] = bot
        assert sorted(i["shard"] for i in fake_discord.identifies) == [[0, 2], [1, 2]]

        guild_shard = fake_discord.shard_of(fake_discord.guild_id)
        me = fake_discord.bot_user
        await fake_discord.send_message(f"<@{me['id']}> hi from the server", author=ALICE, mentions=[me])
        await fake_discord.wait_sent(1)
        await fake_discord.send_message("hi in a DM", author=ALICE, dm=True)  # DMs come on shard 0
        sent = await fake_discord.wait_sent(2)
        assert [m["content"] for m in sent] == ["You said: hi from the server", "You said: hi in a DM"]
        assert [p.rsplit("Human: ", 1)[1] for p in bots[guild_shard].engine.prompts][:1] == [
            "hi from the server\nAssistant:"]
        assert bots[0].engine.prompts[-1].endswith("Human: hi in a DM\nAssistant:")
        assert sum(len(b.engine.prompts) for b in bots.values()) == 2  # each message reached one instance
        assert [e.user_text for e in bots[1].store.exchanges()] == ["hi from the server", "hi in a DM"]
    finally:
        await running.stop_all()


async def test_shard_count_alone_runs_every_shard(discord_bot, fake_discord):
    await discord_bot({"shard_count": 1})
    assert fake_discord.identify["shard"] == [0, 1]


async def test_unsharded_by_default(discord_bot, fake_discord):
    await discord_bot()
    assert "shard" not in fake_discord.identify


@pytest.mark.parametrize("settings, key, match", [
    ({"shard_ids": [0]}, "shard_ids", "needs shard_count"),
    ({"shard_count": 0}, "shard_count", "at least 1"),
    ({"shard_count": 2, "shard_ids": [0, 2]}, "shard_ids", r"0 to shard_count - 1 = 1: \[2\] out of range"),
    ({"shard_count": 2, "shard_ids": [-1]}, "shard_ids", "out of range"),
    ({"shard_count": 2, "shard_ids": []}, "shard_ids", "non-empty list"),
    ({"shard_count": 2, "shard_ids": ["one"]}, "shard_ids", "non-empty list of shard numbers"),
    ({"shard_count": 2, "shard_ids": [True]}, "shard_ids", "non-empty list of shard numbers"),
    ({"shard_count": 4, "shard_ids": [1, 1]}, "shard_ids", "twice"),
])
async def test_bad_shard_settings_are_clear_errors_naming_the_key(tmp_path, settings, key, match):
    bot = build_bot(tmp_path, "discord", {"token": "t", **settings})
    try:
        with pytest.raises(ConfigError, match=match) as info:
            bot.enabled_adapters(["discord"])
        assert str(info.value).startswith(f"adapters.discord.{key}: ")
    finally:
        await bot.close()


async def test_shard_ids_from_an_environment_variable(tmp_path):
    from chatcore.testing import make_bot

    bot = make_bot(tmp_path, config="adapters:\n  discord:\n    enabled: true\n    token: t\n"
                                    "    shard_count: ${SHARDS}\n    shard_ids: ${MY_SHARDS}\n",
                   environ={"SHARDS": "4", "MY_SHARDS": "3, 1"})
    try:
        client = bot.enabled_adapters(["discord"])[0].client
        assert (client.shard_ids, client.shard_count) == ([1, 3], 4)
    finally:
        await bot.close()


def test_config_check_finds_bad_shard_settings_before_a_deploy(tmp_path, capsys):
    from chatcore.cli import main

    config = tmp_path / "bot.yaml"
    body = "adapters:\n  discord:\n    enabled: {enabled}\n    token: t\n    shard_count: 2\n    shard_ids: [0, 2]\n"
    config.write_text(body.format(enabled="true"))
    assert main(["config", "check", str(config)]) == 2
    assert "adapters.discord.shard_ids: shard ids run from 0 to shard_count - 1 = 1" in capsys.readouterr().err
    config.write_text(body.format(enabled="false"))  # a disabled adapter's settings wait until it is enabled
    assert main(["config", "check", str(config)]) == 0
