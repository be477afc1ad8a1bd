"""Two Slack instances (real slack-bolt, HTTP Events API) on one history: a redelivered event is answered once."""

from __future__ import annotations

import asyncio
from pathlib import Path

from .conftest import Running, build_bot, eventually

ALICE = "UALICE001"


def store_url(history_url) -> str:
    return history_url if isinstance(history_url, str) else f"sqlite:///{history_url}"


async def test_an_event_delivered_to_two_instances_gets_one_reply_and_one_exchange(tmp_path: Path, fake_slack,
                                                                                   history_url):
    settings = {"mode": "http", "bot_token": fake_slack.bot_token, "api_url": fake_slack.api_url,
                "signing_secret": fake_slack.signing_secret, "host": "127.0.0.1", "port": 0}
    running = Running()
    bots, urls = [], []
    try:
        for name in ("a", "b"):
            bot = build_bot(tmp_path / name, "slack", settings, config={"history": {"url": store_url(history_url)}})
            adapter = bot.enabled_adapters(["slack"])[0]
            await running.start(bot, adapter, adapter.ready.wait)
            bots.append(bot)
            urls.append(f"http://127.0.0.1:{adapter.port}/slack/events")

        body = fake_slack.event_body(fake_slack.message("only once", ALICE))
        # Slack's retry of an event whose ack was slow lands on the other instance, at the same time.
        acks = await asyncio.gather(fake_slack.post_signed(urls[0], body),
                                    fake_slack.post_signed(urls[1], body, retry_num=1))
        assert [status for status, _ in acks] == [200, 200]  # both acked, or Slack keeps retrying
        await fake_slack.wait_posts(1)
        await fake_slack.post_signed(urls[1], fake_slack.event_body(fake_slack.message("control", ALICE)))
        await fake_slack.wait_posts(2)
        await asyncio.sleep(0.1)
        assert [p["text"] for p in fake_slack.posts()] == ["You said: only once", "You said: control"]
        assert [e.user_text for e in bots[1].store.exchanges()] == ["only once", "control"]
        assert sum(len(b.engine.prompts) for b in bots) == 2  # the duplicate never reached a model
    finally:
        await running.stop_all()


async def test_socket_mode_instances_answer_a_redelivered_event_once(tmp_path: Path, fake_slack, history_url):
    # Slack spreads an app's events over all its Socket Mode connections; a retry may reach another one.
    from .fake_slack import FakeSlack

    other = await FakeSlack().start()  # the second instance's connection (its own posts list)
    running = Running()
    try:
        bots = []
        for name, fake in (("a", fake_slack), ("b", other)):
            settings = {"mode": "socket", "bot_token": fake.bot_token, "app_token": fake.app_token,
                        "api_url": fake.api_url}
            bot = build_bot(tmp_path / name, "slack", settings, config={"history": {"url": store_url(history_url)}})
            adapter = bot.enabled_adapters(["slack"])[0]

            async def ready(adapter=adapter, fake=fake) -> None:
                await adapter.ready.wait()
                await fake.socket_connected.wait()

            await running.start(bot, adapter, ready)
            bots.append(bot)
        body = fake_slack.event_body(fake_slack.mention("just once", ALICE))
        envelopes = await asyncio.gather(fake_slack.push(body), other.push(body, retry_attempt=1))
        await fake_slack.wait_ack(envelopes[0])
        await other.wait_ack(envelopes[1])
        await eventually(lambda: fake_slack.posts() or other.posts())
        await asyncio.sleep(0.1)  # time for a second answer, were there one
        assert [p["text"] for p in fake_slack.posts() + other.posts()] == ["You said: just once"]
        assert [e.user_text for e in bots[0].store.exchanges()] == ["just once"]
    finally:
        await running.stop_all()
        await other.close()
