"""Removing a 👍/👎 reaction withdraws that vote, through the real Discord and Slack clients (issue 9, defect 10)."""

from __future__ import annotations

import asyncio

from .conftest import FeedbackSpy, eventually
from .fake_discord import user

ALICE = user(5, "alice")
THUMBS_UP, THUMBS_DOWN = "\N{THUMBS UP SIGN}", "\N{THUMBS DOWN SIGN}"


async def unreact_discord(fake, message_id: str, emoji: str, user_id: int) -> None:
    # Discord sends no message_author_id with a removal
    await fake.dispatch("MESSAGE_REACTION_REMOVE", {
        "user_id": str(user_id), "channel_id": str(fake.channel_id), "message_id": str(message_id),
        "guild_id": str(fake.guild_id), "emoji": {"id": None, "name": emoji}, "burst": False, "type": 0})


async def test_discord_removing_a_reaction_withdraws_the_vote(discord_bot, fake_discord):
    spy = FeedbackSpy()
    bot, _ = await discord_bot(plugins=[spy])
    await fake_discord.send_message("rate me", author=ALICE, dm=True)
    (sent,) = await fake_discord.wait_sent(1)
    reply_id = sent["response"]["id"]
    exchange = await eventually(lambda: bot.store.find_by_platform_message_id("discord", reply_id))

    await fake_discord.react(reply_id, THUMBS_DOWN, ALICE["id"])
    await eventually(lambda: bot.store.get_exchange(exchange.id).feedback == -1)
    await unreact_discord(fake_discord, reply_id, THUMBS_UP, ALICE["id"])  # not her current vote: kept
    await asyncio.sleep(0.1)
    assert bot.store.get_exchange(exchange.id).feedback == -1
    await unreact_discord(fake_discord, reply_id, THUMBS_DOWN + "\uFE0F", ALICE["id"])
    await eventually(lambda: bot.store.get_exchange(exchange.id).feedback == 0)
    user_key = f"discord:{ALICE['id']}"
    await eventually(lambda: len(spy.votes) == 2)
    assert spy.votes == [(exchange.id, user_key, -1), (exchange.id, user_key, 0)]


async def test_slack_removing_a_reaction_withdraws_the_vote(slack_bot, fake_slack):
    spy = FeedbackSpy()
    bot, _ = await slack_bot(plugins=[spy])
    await fake_slack.push(fake_slack.event_body(fake_slack.message("rate me", "UALICE001")))
    (post,) = await fake_slack.wait_posts(1)
    channel, ts = post["channel"], post["response_ts"]
    exchange = await eventually(lambda: bot.store.find_by_platform_message_id("slack", f"{channel}:{ts}"))

    await fake_slack.push(fake_slack.event_body(fake_slack.reaction("-1", "UALICE001", channel, ts)))
    await eventually(lambda: bot.store.get_exchange(exchange.id).feedback == -1)
    removed = {**fake_slack.reaction("thumbsdown", "UALICE001", channel, ts), "type": "reaction_removed"}
    await fake_slack.push(fake_slack.event_body(removed))
    await eventually(lambda: bot.store.get_exchange(exchange.id).feedback == 0)
    await eventually(lambda: len(spy.votes) == 2)
    assert spy.votes == [(exchange.id, "slack:UALICE001", -1), (exchange.id, "slack:UALICE001", 0)]


def test_store_remove_feedback_only_removes_the_given_vote(tmp_path):
    from chatcore.message import Message
    from chatcore.store import Store

    with Store(tmp_path / "h.db") as store:
        exchange = store.log_exchange(Message("hi", "test", "c", "u"), "hello", model_id="m", params=None)
        store.add_feedback(exchange.id, "test:u", 1)
        assert store.remove_feedback(exchange.id, "test:u", -1) is False
        assert store.get_exchange(exchange.id).feedback == 1
        assert store.remove_feedback(exchange.id, "test:u", 1) is True
        assert store.get_exchange(exchange.id).feedback == 0
        assert store.remove_feedback(exchange.id, "test:u") is False
