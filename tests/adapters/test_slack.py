"""The Slack adapter: a real slack-bolt AsyncApp over Socket Mode and signed HTTP, against the fake Slack."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from chatcore.adapter import AdapterError
from chatcore.message import BUSY_REPLY

from .conftest import FeedbackSpy, build_bot, eventually

ALICE, BOB = "UALICE001", "UBOB00001"


def gated(reply: str = "done") -> tuple[threading.Event, object]:
    """A scripted model that answers only once the test opens the gate."""
    gate = threading.Event()

    def answer(prompt: str) -> str:
        assert gate.wait(10), "the test never opened the gate"
        return reply

    return gate, answer


async def test_socket_mode_mention_is_acked_first_then_answered_in_its_thread(slack_bot, fake_slack):
    gate, answer = gated("Hello Alice")
    bot, _ = await slack_bot(replies=answer)
    event = fake_slack.mention("hi  there", ALICE, channel="C0000001")
    envelope = await fake_slack.push(fake_slack.event_body(event))
    await fake_slack.wait_ack(envelope)
    assert fake_slack.posts() == []  # acked while the model is still working
    gate.set()
    (post,) = await fake_slack.wait_posts(1)
    assert post["channel"] == "C0000001" and post["thread_ts"] == event["ts"] and post["text"] == "Hello Alice"
    assert post["unfurl_links"] is False
    (prompt,) = bot.engine.prompts
    assert prompt.endswith("Human: hi there\nAssistant:")  # the mention is stripped
    exchange = await eventually(
        lambda: bot.store.find_by_platform_message_id("slack", f"C0000001:{post['response_ts']}"))
    assert exchange.channel == f"C0000001/{event['ts']}" and exchange.user == ALICE
    assert fake_slack.unhandled == []


async def test_a_channel_mention_arriving_twice_is_answered_once(slack_bot, fake_slack):
    await slack_bot()
    mention = fake_slack.mention("once please", ALICE)
    as_message = {**mention, "type": "message", "channel_type": "channel"}
    await fake_slack.push(fake_slack.event_body(as_message))
    await fake_slack.push(fake_slack.event_body(mention))
    await fake_slack.wait_posts(1)
    await fake_slack.push(fake_slack.event_body(fake_slack.message("control", ALICE)))
    posts = await fake_slack.wait_posts(2)
    await asyncio.sleep(0.05)
    assert [p["text"] for p in fake_slack.posts()] == ["You said: once please", "You said: control"]
    assert posts[0]["thread_ts"] == mention["ts"]


async def test_dm_is_answered_in_the_dm_and_a_dm_thread_in_its_thread(slack_bot, fake_slack):
    bot, _ = await slack_bot()
    top = fake_slack.message("hello", ALICE)
    await fake_slack.push(fake_slack.event_body(top))
    (post,) = await fake_slack.wait_posts(1)
    assert post["channel"] == "D0000001" and post.get("thread_ts") is None
    threaded = fake_slack.message("in a thread", ALICE, thread_ts=top["ts"])
    await fake_slack.push(fake_slack.event_body(threaded))
    posts = await fake_slack.wait_posts(2)
    assert posts[1]["thread_ts"] == top["ts"]
    first = bot.store.find_by_platform_message_id("slack", f"D0000001:{posts[0]['response_ts']}")
    second = await eventually(
        lambda: bot.store.find_by_platform_message_id("slack", f"D0000001:{posts[1]['response_ts']}"))
    assert (first.channel, second.channel) == ("D0000001", f"D0000001/{top['ts']}")


async def test_ignores_bots_itself_edits_and_plain_channel_messages(slack_bot, fake_slack):
    await slack_bot()
    for event in [
        fake_slack.message("from a bot", "UOTHERBOT", bot_id="BOTHER"),
        fake_slack.message("my own", fake_slack.bot_user_id),
        fake_slack.message("edited", ALICE, subtype="message_changed"),
        fake_slack.message("no user", None, subtype="bot_message"),
        fake_slack.message("chatting in a channel", ALICE, channel="C0000002", channel_type="channel"),
        fake_slack.mention("mention from a bot", "UOTHERBOT", bot_id="BOTHER"),
    ]:
        await fake_slack.push(fake_slack.event_body(event))
    await fake_slack.push(fake_slack.event_body(fake_slack.message("control", ALICE)))
    (post,) = await fake_slack.wait_posts(1)
    await asyncio.sleep(0.05)
    assert post["text"] == "You said: control" and len(fake_slack.posts()) == 1


async def test_duplicate_deliveries_are_answered_once(slack_bot, fake_slack):
    await slack_bot()
    body = fake_slack.event_body(fake_slack.message("just once", ALICE))
    first = await fake_slack.push(body, retry_attempt=0)  # Socket Mode marks even first deliveries
    retry = await fake_slack.push(body, retry_attempt=1)
    await fake_slack.wait_ack(first)
    await fake_slack.wait_ack(retry)  # a duplicate is still acked, or Slack keeps retrying
    await fake_slack.wait_posts(1)
    await fake_slack.push(fake_slack.event_body(fake_slack.message("control", ALICE)))
    await fake_slack.wait_posts(2)
    await asyncio.sleep(0.05)
    assert [p["text"] for p in fake_slack.posts()] == ["You said: just once", "You said: control"]


async def test_long_reply_is_split_and_reactions_become_feedback(slack_bot, fake_slack):
    spy = FeedbackSpy()
    sentence = "This sentence is part of a long answer. "
    long_reply = (sentence * 30).strip()  # ~1200 characters
    bot, _ = await slack_bot(settings={"max_chars": 500}, replies=[long_reply], plugins=[spy],
                             config={"generation": {"max_new_tokens": 1000}})
    await fake_slack.push(fake_slack.event_body(fake_slack.mention("go", ALICE)))
    await fake_slack.wait_posts(3)
    await asyncio.sleep(0.05)
    posts = fake_slack.posts()
    assert len(posts) == 3 and all(len(p["text"]) <= 500 for p in posts)
    assert " ".join(p["text"] for p in posts) == long_reply
    assert len({p["thread_ts"] for p in posts}) == 1

    channel = posts[0]["channel"]
    await fake_slack.push(fake_slack.event_body(fake_slack.reaction("+1::skin-tone-3", BOB, channel, posts[0]["response_ts"])))
    await fake_slack.push(fake_slack.event_body(fake_slack.reaction("thumbsdown", ALICE, channel, posts[2]["response_ts"])))
    await fake_slack.push(fake_slack.event_body(fake_slack.reaction("tada", ALICE, channel, posts[1]["response_ts"])))
    await fake_slack.push(fake_slack.event_body(
        fake_slack.reaction("+1", ALICE, channel, "1600000000.000001", item_user=BOB)))  # someone else's message
    await fake_slack.push(fake_slack.event_body(
        fake_slack.reaction("+1", fake_slack.bot_user_id, channel, posts[0]["response_ts"])))  # its own
    await eventually(lambda: len(spy.votes) >= 2)
    await asyncio.sleep(0.1)
    exchange = bot.store.find_by_platform_message_id("slack", f"{channel}:{posts[1]['response_ts']}")
    assert spy.votes == [(exchange.id, f"slack:{BOB}", 1), (exchange.id, f"slack:{ALICE}", -1)]


async def test_generated_text_cannot_mention_anyone(slack_bot, fake_slack):
    await slack_bot(replies=["<!channel> & <@UALICE001> <!here|here>"])
    await fake_slack.push(fake_slack.event_body(fake_slack.message("hi", ALICE)))
    (post,) = await fake_slack.wait_posts(1)
    assert post["text"] == "&lt;!channel&gt; &amp; &lt;@UALICE001&gt; &lt;!here|here&gt;"


async def test_a_full_queue_gets_a_polite_busy_answer(slack_bot, fake_slack):
    gate, answer = gated("finally")
    bot, _ = await slack_bot(replies=answer, config={"serving": {"max_queue": 1}})
    await fake_slack.push(fake_slack.event_body(fake_slack.message("first", ALICE)))
    await eventually(lambda: bot.engine.prompts)  # the model is busy with the first message
    await fake_slack.push(fake_slack.event_body(fake_slack.message("second", BOB, channel="D0000002")))
    (busy,) = await fake_slack.wait_posts(1)
    assert busy["text"] == BUSY_REPLY and busy["channel"] == "D0000002"
    gate.set()
    assert (await fake_slack.wait_posts(2))[1]["text"] == "finally"


# --- HTTP Events API ---------------------------------------------------------------------------


async def test_http_mode_acks_signed_events_fast_then_answers(slack_bot, fake_slack):
    gate, answer = gated("Hi from HTTP")
    _, adapter = await slack_bot("http", replies=answer)
    url = f"http://127.0.0.1:{adapter.port}/slack/events"
    event = fake_slack.mention("over http", ALICE)
    body = fake_slack.event_body(event)
    started = time.monotonic()
    status, _ = await fake_slack.post_signed(url, body)
    assert status == 200 and time.monotonic() - started < 3
    assert fake_slack.posts() == []  # acked before the model answered
    status, _ = await fake_slack.post_signed(url, body, retry_num=1)  # Slack's retry of the same event
    assert status == 200
    gate.set()
    (post,) = await fake_slack.wait_posts(1)
    assert post["text"] == "Hi from HTTP" and post["thread_ts"] == event["ts"]
    await asyncio.sleep(0.1)
    assert len(fake_slack.posts()) == 1


async def test_http_mode_rejects_bad_signatures_and_answers_url_verification(slack_bot, fake_slack):
    _, adapter = await slack_bot("http")
    url = f"http://127.0.0.1:{adapter.port}/slack/events"
    body = fake_slack.event_body(fake_slack.message("forged", ALICE))
    status, _ = await fake_slack.post_signed(url, body, secret="not-the-secret")
    assert status == 401
    status, _ = await fake_slack.post_signed(url, body, timestamp=int(time.time()) - 3600)  # replayed
    assert status == 401
    status, text = await fake_slack.post_signed(url, {"type": "url_verification", "challenge": "abc123",
                                                      "token": "x"})
    assert status == 200 and json.loads(text)["challenge"] == "abc123"
    await asyncio.sleep(0.05)
    assert fake_slack.posts() == []


# --- startup errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode, settings, match", [
    ("http", {"signing_secret": None}, "mode http needs signing_secret"),
    ("socket", {"app_token": None}, "mode socket needs app_token"),
    ("socket", {"bot_token": "xoxb-wrong"}, "rejected the bot token \\(invalid_auth\\)"),
    ("socket", {"app_token": "xapp-wrong"}, "rejected the app-level token \\(invalid_auth\\)"),
])
async def test_startup_errors_are_clear(tmp_path, fake_slack, mode, settings, match):
    base = {"mode": mode, "bot_token": fake_slack.bot_token, "app_token": fake_slack.app_token,
            "signing_secret": fake_slack.signing_secret, "api_url": fake_slack.api_url, "host": "127.0.0.1",
            "port": 0}
    bot = build_bot(tmp_path, "slack", {k: v for k, v in {**base, **settings}.items() if v is not None})
    adapter = bot.enabled_adapters(["slack"])[0]
    try:
        with pytest.raises(AdapterError, match=match):
            await asyncio.wait_for(adapter.start(), 10)
    finally:
        await bot.close()
    assert not fake_slack.socket_connected.is_set()
