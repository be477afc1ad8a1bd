"""A thread follows its parent channel's training policy unless it has an entry of its own (real clients, fakes)."""

from __future__ import annotations

from .conftest import eventually
from .fake_discord import user

ALICE = user(5, "alice")
S_ALICE = "UALICE001"
DISCORD_ON = {"i_have_discords_permission_to_train": True}
SLACK_ON = {"i_have_slacks_permission_to_train": True}


async def discord_thread_row(bot, fake):
    await fake.send_message("in the thread", author=ALICE, channel_id=fake.thread_id)
    (sent,) = await fake.wait_sent(1)
    row = await eventually(lambda: bot.store.find_by_platform_message_id("discord", sent["response"]["id"]))
    assert row.channel == str(fake.thread_id)
    return row


async def test_a_discord_thread_trains_under_an_opt_out_parent_channel(discord_bot, fake_discord):
    channel = str(fake_discord.channel_id)
    bot, _ = await discord_bot({"channels": [channel], "training": {"channels": {channel: "opt_out"}, **DISCORD_ON}})
    row = await discord_thread_row(bot, fake_discord)
    assert (row.policy, row.trainable) == ("opt_out", True)  # not the adapter's default off


async def test_a_discord_thread_under_a_parent_that_is_off_does_not_train(discord_bot, fake_discord):
    channel, guild = str(fake_discord.channel_id), str(fake_discord.guild_id)
    training = {"workspaces": {guild: "opt_out"}, "channels": {channel: "off"}, **DISCORD_ON}
    bot, _ = await discord_bot({"channels": [channel], "training": training})
    row = await discord_thread_row(bot, fake_discord)
    assert (row.policy, row.trainable) == ("off", False)  # the parent channel beats the guild


async def test_a_discord_threads_own_entry_beats_its_parent(discord_bot, fake_discord):
    channel, thread = str(fake_discord.channel_id), str(fake_discord.thread_id)
    training = {"channels": {channel: "off", thread: "opt_out"}, **DISCORD_ON}
    bot, _ = await discord_bot({"channels": [channel], "training": training})
    row = await discord_thread_row(bot, fake_discord)
    assert (row.policy, row.trainable) == ("opt_out", True)


async def slack_thread_row(bot, fake):
    await fake.push(fake.event_body(fake.mention("in the thread", S_ALICE, thread_ts="1700000000.000100")))
    await fake.wait_posts(1)
    (row,) = await eventually(lambda: list(bot.store.exchanges()))
    assert row.channel == "C0000001/1700000000.000100"
    return row


async def test_a_slack_thread_trains_under_an_opt_out_parent_channel(slack_bot, fake_slack):
    bot, _ = await slack_bot("socket", {"training": {"channels": {"C0000001": "opt_out"}, **SLACK_ON}})
    row = await slack_thread_row(bot, fake_slack)
    assert (row.policy, row.trainable) == ("opt_out", True)


async def test_a_slack_thread_under_a_parent_that_is_off_does_not_train(slack_bot, fake_slack):
    training = {"workspaces": {fake_slack.team_id: "opt_out"}, "channels": {"C0000001": "off"}, **SLACK_ON}
    bot, _ = await slack_bot("socket", {"training": training})
    row = await slack_thread_row(bot, fake_slack)
    assert (row.policy, row.trainable) == ("off", False)
