"""The Discord adapter with the real discord.Client against the loopback fake Discord."""

from __future__ import annotations

import asyncio
import threading

import pytest

from chatcore.adapter import AdapterError
from chatcore.adapters.discord import DiscordAdapter
from chatcore.message import BUSY_REPLY

from .conftest import FeedbackSpy, build_bot, eventually, start_adapter
from .fake_discord import MESSAGE_CONTENT, user

ALICE = user(5, "alice")
BOB = user(6, "bob")
OTHER_BOT = user(7, "otherbot", bot=True)


def gated(reply: str) -> tuple[threading.Event, object]:
    """A scripted model that answers only once the test opens the gate."""
    gate = threading.Event()
    return gate, lambda prompt: reply if gate.wait(10) else "the test never opened the gate"


def mention(fake) -> str:
    return f"<@{fake.bot_user['id']}>"


async def test_mention_is_answered_in_the_channel_with_mentions_disabled(discord_bot, fake_discord):
    bot, _ = await discord_bot()
    question = await fake_discord.send_message(f"{mention(fake_discord)} hi   there", author=ALICE,
                                               mentions=[fake_discord.bot_user])
    (sent,) = await fake_discord.wait_sent(1)
    assert sent["content"] == "You said: hi there"  # the mention is stripped before the model sees it
    assert sent["allowed_mentions"] == {"parse": []}
    assert sent["message_reference"]["message_id"] == int(question["id"])
    assert fake_discord.typing(fake_discord.channel_id) >= 1
    found = await eventually(lambda: bot.store.find_by_platform_message_id("discord", sent["response"]["id"]))
    assert found is not None and found.channel == str(fake_discord.channel_id) and found.user == ALICE["id"]
    assert fake_discord.unhandled == []


async def test_old_style_nickname_mention_is_stripped_too(discord_bot, fake_discord):
    await discord_bot()
    await fake_discord.send_message(f"<@!{fake_discord.bot_user['id']}> ping", author=ALICE,
                                    mentions=[fake_discord.bot_user])
    (sent,) = await fake_discord.wait_sent(1)
    assert sent["content"] == "You said: ping"


async def test_dm_is_answered_without_a_mention_and_without_a_reply_reference(discord_bot, fake_discord):
    bot, _ = await discord_bot()
    await fake_discord.send_message("hello in private", author=ALICE, dm=True)
    (sent,) = await fake_discord.wait_sent(1)
    assert sent["content"] == "You said: hello in private"
    assert "message_reference" not in sent or sent["message_reference"] is None
    assert fake_discord.sent(fake_discord.dm_channel_id) == [sent]
    exchange = await eventually(lambda: bot.store.find_by_platform_message_id("discord", sent["response"]["id"]))
    assert exchange.channel == str(fake_discord.dm_channel_id)


async def test_dms_can_be_turned_off(discord_bot, fake_discord):
    await discord_bot({"answer_dms": False})
    await fake_discord.send_message("hello in private", author=ALICE, dm=True)
    await fake_discord.send_message(f"{mention(fake_discord)} control", author=ALICE, mentions=[fake_discord.bot_user])
    (sent,) = await fake_discord.wait_sent(1)
    assert sent["content"] == "You said: control"
    await asyncio.sleep(0.05)
    assert len(fake_discord.sent()) == 1


async def test_ignores_unmentioned_messages_bots_and_itself(discord_bot, fake_discord):
    await discord_bot()
    await fake_discord.send_message("just chatting", author=ALICE)
    await fake_discord.send_message(f"{mention(fake_discord)} from a bot", author=OTHER_BOT,
                                    mentions=[fake_discord.bot_user])
    await fake_discord.send_message(f"{mention(fake_discord)} my own echo", author=fake_discord.bot_user,
                                    mentions=[fake_discord.bot_user])
    await fake_discord.send_message(f"{mention(fake_discord)} pinned a message", author=ALICE,
                                    mentions=[fake_discord.bot_user], type=6)  # a system message
    await fake_discord.send_message(f"{mention(fake_discord)} control", author=ALICE, mentions=[fake_discord.bot_user])
    (sent,) = await fake_discord.wait_sent(1)
    assert sent["content"] == "You said: control"
    await asyncio.sleep(0.05)
    assert len(fake_discord.sent()) == 1
    # without `channels`, the privileged Message Content intent is not even requested
    assert fake_discord.identify["intents"] & MESSAGE_CONTENT == 0


async def test_configured_channels_and_their_threads_are_answered_without_mentions(discord_bot, fake_discord):
    bot, _ = await discord_bot({"channels": [str(fake_discord.channel_id)]})
    assert fake_discord.identify["intents"] & MESSAGE_CONTENT
    await fake_discord.send_message("in the channel", author=ALICE)
    await fake_discord.wait_sent(1)
    await fake_discord.send_message("in the thread", author=ALICE, channel_id=fake_discord.thread_id)
    await fake_discord.wait_sent(2)
    await fake_discord.send_message("elsewhere", author=ALICE, channel_id=fake_discord.other_channel_id)
    await fake_discord.send_message("again", author=BOB, channel_id=fake_discord.thread_id)
    sent = await fake_discord.wait_sent(3)
    await asyncio.sleep(0.05)
    assert [s["content"] for s in fake_discord.sent()] == [
        "You said: in the channel", "You said: in the thread", "You said: again"]
    # a thread is its own conversation; so is each user in it
    thread_reply = await eventually(lambda: bot.store.find_by_platform_message_id("discord", sent[1]["response"]["id"]))
    assert (thread_reply.channel, thread_reply.user) == (str(fake_discord.thread_id), ALICE["id"])
    bob_reply = await eventually(lambda: bot.store.find_by_platform_message_id("discord", sent[2]["response"]["id"]))
    assert bob_reply.user == BOB["id"]


async def test_conversation_history_is_per_channel_and_user(discord_bot, fake_discord):
    seen: list[str] = []
    bot, _ = await discord_bot(replies=lambda prompt: seen.append(prompt) or "ok")
    await fake_discord.send_message("first from alice", author=ALICE, dm=True)
    await fake_discord.wait_sent(1)
    await fake_discord.send_message("second from alice", author=ALICE, dm=True)
    await fake_discord.wait_sent(2)
    await fake_discord.send_message(f"{mention(fake_discord)} bob here", author=BOB, mentions=[fake_discord.bot_user])
    await fake_discord.wait_sent(3)
    assert "first from alice" in seen[1]
    assert "alice" not in seen[2]


async def test_long_reply_is_split_and_every_chunk_carries_feedback(discord_bot, fake_discord):
    paragraph = " ".join(["word"] * 150) + "."  # ~750 characters
    long_reply = "\n\n".join([paragraph] * 5)
    spy = FeedbackSpy()
    bot, _ = await discord_bot(replies=[long_reply], plugins=[spy],
                               config={"generation": {"stop_at_newline": False, "max_new_tokens": 1000}})
    await fake_discord.send_message(f"{mention(fake_discord)} tell me a lot", author=ALICE,
                                    mentions=[fake_discord.bot_user])
    await fake_discord.wait_sent(3)
    await asyncio.sleep(0.05)
    sent = fake_discord.sent()
    assert len(sent) == 3 and all(len(s["content"]) <= 2000 for s in sent)
    assert "\n\n".join(s["content"] for s in sent) == long_reply
    assert all(s["allowed_mentions"] == {"parse": []} for s in sent)
    assert sent[0].get("message_reference") and not sent[1].get("message_reference")

    ids = [s["response"]["id"] for s in sent]
    await eventually(lambda: bot.store.find_by_platform_message_id("discord", ids[-1]))
    await fake_discord.react(ids[-1], "\N{THUMBS DOWN SIGN}", BOB["id"])
    await fake_discord.react(ids[0], "\N{THUMBS UP SIGN}\N{EMOJI MODIFIER FITZPATRICK TYPE-4}", ALICE["id"])
    await fake_discord.react(ids[0], "\N{THUMBS UP SIGN}", fake_discord.bot_user["id"])  # its own: ignored
    await fake_discord.react(ids[0], "\N{PARTY POPPER}", ALICE["id"])  # not a rating
    await eventually(lambda: len(spy.votes) >= 2)
    await asyncio.sleep(0.1)
    exchange = bot.store.find_by_platform_message_id("discord", ids[1])
    assert spy.votes == [(exchange.id, f"discord:{BOB['id']}", -1), (exchange.id, f"discord:{ALICE['id']}", 1)]
    assert exchange.feedback == 0  # +1 from alice, -1 from bob


async def test_reactions_on_messages_that_are_not_replies_are_ignored(discord_bot, fake_discord):
    spy = FeedbackSpy()
    bot, _ = await discord_bot(plugins=[spy])
    question = await fake_discord.send_message(f"{mention(fake_discord)} hi", author=ALICE,
                                               mentions=[fake_discord.bot_user])
    (sent,) = await fake_discord.wait_sent(1)
    await fake_discord.react(question["id"], "\N{THUMBS UP SIGN}", BOB["id"], message_author_id=ALICE["id"])
    await fake_discord.react(question["id"], "\N{THUMBS UP SIGN}", BOB["id"])
    await asyncio.sleep(0.1)
    assert spy.votes == []


async def test_generated_pings_cannot_notify_anyone(discord_bot, fake_discord):
    await discord_bot(replies=["@everyone look <@123456789012345678> and @here"])
    await fake_discord.send_message("hi", author=ALICE, dm=True)
    (sent,) = await fake_discord.wait_sent(1)
    assert "@everyone" in sent["content"]
    assert sent["allowed_mentions"] == {"parse": []}


async def test_a_full_queue_gets_a_polite_busy_answer(discord_bot, fake_discord):
    gate, answer = gated("finally")
    bot, _ = await discord_bot(replies=answer, config={"serving": {"max_queue": 1}})
    await fake_discord.send_message("first", author=ALICE, dm=True)
    await eventually(lambda: bot.engine.prompts)  # the model is busy with the first message
    await fake_discord.send_message("second", author=BOB, dm=True)
    (busy,) = await fake_discord.wait_sent(1)
    assert busy["content"] == BUSY_REPLY
    gate.set()
    assert (await fake_discord.wait_sent(2))[1]["content"] == "finally"


async def test_bad_token_is_a_clear_startup_error(tmp_path, fake_discord, monkeypatch):
    monkeypatch.setattr(DiscordAdapter, "guild_ready_timeout", 0.05)
    bot = build_bot(tmp_path, "discord", {"token": "wrong"})
    adapter = bot.enabled_adapters(["discord"])[0]
    try:
        with pytest.raises(AdapterError, match="rejected the bot token.*DISCORD_TOKEN"):
            await asyncio.wait_for(adapter.start(), 10)
    finally:
        await bot.close()
    assert adapter.client.is_closed()


async def test_missing_privileged_intent_is_a_clear_startup_error(tmp_path, fake_discord, monkeypatch):
    monkeypatch.setattr(DiscordAdapter, "guild_ready_timeout", 0.05)
    fake_discord.allow_privileged = False
    bot = build_bot(tmp_path, "discord", {"token": fake_discord.token, "channels": [str(fake_discord.channel_id)]})
    adapter = bot.enabled_adapters(["discord"])[0]
    try:
        with pytest.raises(AdapterError, match="4014.*MESSAGE CONTENT INTENT"):
            await asyncio.wait_for(adapter.start(), 10)
    finally:
        await bot.close()


async def test_without_channels_no_privileged_intent_is_needed(tmp_path, discord_bot, fake_discord):
    fake_discord.allow_privileged = False
    await discord_bot()
    await fake_discord.send_message("hi", author=ALICE, dm=True)
    assert (await fake_discord.wait_sent(1))[0]["content"] == "You said: hi"


async def test_stop_is_idempotent_and_start_returns(tmp_path, fake_discord, monkeypatch):
    monkeypatch.setattr(DiscordAdapter, "guild_ready_timeout", 0.05)
    bot = build_bot(tmp_path, "discord", {"token": fake_discord.token})
    adapter = bot.enabled_adapters(["discord"])[0]
    task = await start_adapter(adapter, adapter.ready.wait)
    await adapter.stop()
    await adapter.stop()
    await asyncio.wait_for(task, 5)
    assert fake_discord.heartbeats >= 1  # discord.py's keep-alive reached the fake gateway
    await bot.close()
