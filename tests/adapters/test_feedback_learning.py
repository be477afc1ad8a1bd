"""Votes and /retry preference pairs through the real adapters against their fakes (issue 11)."""

from __future__ import annotations

import asyncio

from chatcore.training.preference import from_store_preferences

from .conftest import eventually
from .fake_discord import user
from .test_http import KEY, client, post

ALICE = user(5, "alice")
BOB = user(6, "bob")
RETRY = "\N{CLOCKWISE RIGHTWARDS AND LEFTWARDS OPEN CIRCLE ARROWS}"


def pairs(bot) -> list[tuple[str, str, str, str]]:
    """(chosen reply, rejected reply, user, how) of every stored pair."""
    out = []
    for p in bot.store.preference_pairs():
        chosen, rejected = bot.store.get_exchange(p["chosen_id"]), bot.store.get_exchange(p["rejected_id"])
        out.append((chosen.reply_text, rejected.reply_text, p["user_key"], p["how"]))
    return out


async def test_discord_retry_reaction_then_a_thumbs_up_makes_a_pair_and_votes_change(discord_bot, fake_discord):
    bot, _ = await discord_bot(replies=["first answer", "second answer", "third"])
    await fake_discord.send_message("tell me a joke", author=ALICE, dm=True)
    (first,) = await fake_discord.wait_sent(1)
    first_id = first["response"]["id"]
    await eventually(lambda: bot.store.find_by_platform_message_id("discord", first_id))
    await fake_discord.react(first_id, RETRY, BOB["id"], channel_id=fake_discord.dm_channel_id)  # not Bob's: ignored
    await fake_discord.react(first_id, RETRY, ALICE["id"], channel_id=fake_discord.dm_channel_id)
    sent = await fake_discord.wait_sent(2)
    assert sent[1]["content"] == "second answer" and sent[1]["response"]["channel_id"] == str(fake_discord.dm_channel_id)
    second_id = sent[1]["response"]["id"]
    second = await eventually(lambda: bot.store.find_by_platform_message_id("discord", second_id))
    assert second.user_text == "tell me a joke"
    assert bot.store.history(("discord", str(fake_discord.dm_channel_id), ALICE["id"])) == [
        ("tell me a joke", "second answer")]  # the replaced reply left the history
    assert pairs(bot) == []  # no rating, no continuation yet

    await fake_discord.react(first_id, "\N{THUMBS UP SIGN}", ALICE["id"], channel_id=fake_discord.dm_channel_id)
    await eventually(lambda: pairs(bot))
    assert pairs(bot) == [("first answer", "second answer", f"discord:{ALICE['id']}", "rated")]
    # a changed vote changes the pair: 👎 on the first now prefers the second
    await fake_discord.react(first_id, "\N{THUMBS DOWN SIGN}", ALICE["id"], channel_id=fake_discord.dm_channel_id)
    await eventually(lambda: pairs(bot) and pairs(bot)[0][0] == "second answer")
    assert pairs(bot) == [("second answer", "first answer", f"discord:{ALICE['id']}", "rated")]
    # 🔁 on an older reply does nothing: only the last reply of one's conversation can be retried
    await fake_discord.react(first_id, RETRY, ALICE["id"], channel_id=fake_discord.dm_channel_id)
    await asyncio.sleep(0.1)
    assert len(fake_discord.sent()) == 2 and fake_discord.unhandled == []


async def test_slack_retry_in_a_thread_then_carrying_on_keeps_the_second(slack_bot, fake_slack):
    # labels train only under the consent rules: this workspace lets the bot learn (with Slack's permission)
    learn = {"training": {"policy": "opt_out", "i_have_slacks_permission_to_train": True}}
    bot, _ = await slack_bot(settings=learn, replies=["first answer", "second answer", "you're welcome"])
    await fake_slack.push(fake_slack.event_body(fake_slack.mention("tell me a joke", "UALICE001")))
    (first,) = await fake_slack.wait_posts(1)
    channel, thread = first["channel"], first["thread_ts"]
    await eventually(lambda: bot.store.find_by_platform_message_id("slack", f"{channel}:{first['response_ts']}"))
    await fake_slack.push(fake_slack.event_body(fake_slack.reaction("repeat", "UALICE001", channel, first["response_ts"])))
    posts = await fake_slack.wait_posts(2)
    assert posts[1]["text"] == "second answer" and posts[1]["thread_ts"] == thread
    await eventually(lambda: bot.store.find_by_platform_message_id("slack", f"{channel}:{posts[1]['response_ts']}"))
    assert pairs(bot) == []
    await fake_slack.push(fake_slack.event_body(fake_slack.mention("thanks", "UALICE001", thread_ts=thread)))
    await fake_slack.wait_posts(3)
    await eventually(lambda: pairs(bot))
    assert pairs(bot) == [("second answer", "first answer", "slack:UALICE001", "kept")]
    # the continuation saw the kept reply, not the replaced one, in its prompt
    prefs = from_store_preferences(bot.store)
    assert prefs.pairs[0].prompt.endswith("Human: tell me a joke\nAssistant:")


async def test_http_retry_command_and_feedback_make_a_pair_and_labels(http_bot):
    # API-key clients: their text may teach the bot (anonymous HTTP never does, retries included)
    bot, _, url = await http_bot({"api_key": KEY}, replies=["first answer", "second answer"])
    async with client(url) as api:
        one = await api.chat.completions.create(model="x", user="alice", extra_headers={
            "X-Chatcore-Conversation": "c1"}, messages=[{"role": "user", "content": "tell me a joke"}])
        two = await api.chat.completions.create(model="x", user="alice", extra_headers={
            "X-Chatcore-Conversation": "c1"}, messages=[{"role": "user", "content": "/retry"}])
    assert two.choices[0].message.content == "second answer"
    status, _, _ = await post(f"{url}/feedback", {"id": two.id, "value": -1, "user": "alice"})
    assert status == 200  # the /retry answer is a real, rateable reply
    status, _, _ = await post(f"{url}/feedback", {"id": one.id, "value": 1, "user": "bob"})
    assert status == 200
    assert sorted(pairs(bot)) == [("first answer", "second answer", "http:alice", "rated"),
                                  ("first answer", "second answer", "http:bob", "rated")]
    prefs = from_store_preferences(bot.store)
    labels = sorted((e.reply, e.label, e.user) for e in prefs.labelled)
    assert labels == [("first answer", 1, "http:bob"), ("second answer", -1, "http:alice")]
    assert all(e.prompt == "Human: tell me a joke\nAssistant:" for e in prefs.labelled)
    # /forget takes Bob's votes, and with them his pair
    bot.store.forget_user("http:bob")
    assert pairs(bot) == [("first answer", "second answer", "http:alice", "rated")]


async def test_a_retry_keeps_who_vouched_for_the_asker(http_bot):
    """A /retry from an unauthenticated HTTP client is no more trainable than the message it retries."""
    bot, _, url = await http_bot(replies=["first answer", "second answer"])  # no api_key: nobody vouches
    async with client(url, api_key="none") as api:
        for text in ("tell me a joke", "/retry"):
            await api.chat.completions.create(model="x", user="alice", extra_headers={
                "X-Chatcore-Conversation": "c1"}, messages=[{"role": "user", "content": text}])
    rows = list(bot.store.exchanges())
    assert [r.reply_text for r in rows] == ["first answer", "second answer"]
    assert not any(r.trainable for r in rows)
