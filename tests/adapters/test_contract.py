"""One contract every adapter keeps, run against each through its real client library and fake platform.

Each driver speaks its platform's language (gateway events, Slack envelopes,
HTTP requests) and reads what the adapter actually sent back. HTTP has no
mentions and no "self" to ignore: those cases are skipped for it, with the reason.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import pytest

from .conftest import FeedbackSpy, eventually
from .fake_discord import user as discord_user

LONG = " ".join(f"Sentence number {i} is here." for i in range(400))  # ~11,000 characters


class DiscordDriver:
    name, limit = "discord", 2000

    def __init__(self, fake, run) -> None:
        self.fake, self.run = fake, run

    async def start(self, **kwargs: Any) -> Any:
        self.bot, _ = await self.run(**kwargs)
        return self.bot

    def _author(self, who: str) -> dict:
        return discord_user(abs(hash(who)) % 10**6 + 10, who)

    async def say(self, text: str, *, who: str = "alice", dm: bool = False, mention: bool = False) -> None:
        if mention:
            text = f"<@{self.fake.bot_user['id']}> {text}"
        await self.fake.send_message(text, author=self._author(who), dm=dm,
                                     mentions=[self.fake.bot_user] if mention else [])

    async def say_as_self(self, text: str) -> None:
        await self.fake.send_message(text, author=self.fake.bot_user, dm=True)

    def replies(self) -> list[str]:
        return [s["content"] for s in self.fake.sent()]

    def reply_ids(self) -> list[str]:
        return [s["response"]["id"] for s in self.fake.sent()]

    async def rate(self, index: int, value: int, who: str) -> None:
        emoji = "\N{THUMBS UP SIGN}" if value > 0 else "\N{THUMBS DOWN SIGN}"
        await self.fake.react(self.reply_ids()[index], emoji, int(self._author(who)["id"]))

    def user_key(self, who: str) -> str:
        return f"discord:{self._author(who)['id']}"


class SlackDriver:
    name, limit = "slack", 3900

    def __init__(self, fake, run) -> None:
        self.fake, self.run = fake, run

    async def start(self, **kwargs: Any) -> Any:
        self.bot, _ = await self.run(**kwargs)
        return self.bot

    def _user(self, who: str) -> str:
        return "U" + who.upper().ljust(8, "0")[:8]

    async def say(self, text: str, *, who: str = "alice", dm: bool = False, mention: bool = False) -> None:
        if dm:
            event = self.fake.message(text, self._user(who))
            if mention:
                event["text"] = f"<@{self.fake.bot_user_id}> {text}"
        elif mention:
            event = self.fake.mention(text, self._user(who))
        else:
            event = self.fake.message(text, self._user(who), channel="C0000001", channel_type="channel")
        await self.fake.push(self.fake.event_body(event))

    async def say_as_self(self, text: str) -> None:
        await self.fake.push(self.fake.event_body(self.fake.message(text, self.fake.bot_user_id)))

    def replies(self) -> list[str]:
        # what users see: Slack shows &lt; as <
        return [p["text"].replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&") for p in self.fake.posts()]

    async def rate(self, index: int, value: int, who: str) -> None:
        post = self.fake.posts()[index]
        await self.fake.push(self.fake.event_body(self.fake.reaction(
            "+1" if value > 0 else "-1", self._user(who), post["channel"], post["response_ts"])))

    def user_key(self, who: str) -> str:
        return f"slack:{self._user(who)}"


class HttpDriver:
    name, limit = "http", None

    def __init__(self, run) -> None:
        self.run = run
        self._replies: list[tuple[str, str]] = []

    async def start(self, **kwargs: Any) -> Any:
        self.bot, _, self.url = await self.run({"max_tokens": 10_000}, **kwargs)
        return self.bot

    async def say(self, text: str, *, who: str = "alice", dm: bool = False, mention: bool = False) -> None:
        body = {"model": "x", "user": who, "messages": [{"role": "user", "content": text}]}
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{self.url}/v1/chat/completions", json=body) as r:
                assert r.status == 200, await r.text()
                data = await r.json()
        if data["choices"][0]["message"]["content"]:
            self._replies.append((data["id"], data["choices"][0]["message"]["content"]))

    async def say_as_self(self, text: str) -> None:
        pytest.skip("HTTP requests never come from the bot itself")

    def replies(self) -> list[str]:
        return [text for _, text in self._replies]

    async def rate(self, index: int, value: int, who: str) -> None:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{self.url}/feedback",
                                    json={"id": self._replies[index][0], "value": value, "user": who}) as r:
                assert r.status == 200, await r.text()

    def user_key(self, who: str) -> str:
        return f"http:{who}"


@pytest.fixture(params=["discord", "slack", "http"])
def driver(request) -> Any:
    if request.param == "discord":
        return DiscordDriver(request.getfixturevalue("fake_discord"), request.getfixturevalue("discord_bot"))
    if request.param == "slack":
        return SlackDriver(request.getfixturevalue("fake_slack"), request.getfixturevalue("slack_bot"))
    return HttpDriver(request.getfixturevalue("http_bot"))


async def replies(driver: Any, count: int) -> list[str]:
    return await eventually(lambda: len(driver.replies()) >= count and driver.replies())


async def test_a_mention_is_answered_without_the_mention(driver):
    if driver.name == "http":
        pytest.skip("HTTP has no mentions: every request is addressed to the bot")
    bot = await driver.start()
    await driver.say("what is up", mention=True)
    assert await replies(driver, 1) == ["You said: what is up"]
    assert bot.engine.prompts[-1].endswith("Human: what is up\nAssistant:")


async def test_a_direct_message_is_answered(driver):
    await driver.start()
    await driver.say("hello privately", dm=True)
    assert await replies(driver, 1) == ["You said: hello privately"]


async def test_unaddressed_channel_chatter_and_its_own_messages_are_ignored(driver):
    if driver.name == "http":
        pytest.skip("HTTP requests are always addressed to the bot and never come from it")
    await driver.start()
    await driver.say("people talking among themselves")
    await driver.say_as_self("You said: an echo of myself")
    await driver.say("control", dm=True)
    assert await replies(driver, 1) == ["You said: control"]
    await asyncio.sleep(0.05)
    assert driver.replies() == ["You said: control"]


async def test_a_long_reply_arrives_whole_within_the_platform_limit(driver):
    await driver.start(replies=[LONG], config={"generation": {"max_new_tokens": 5000}}, block_size=8192)
    await driver.say("tell me everything", dm=True)
    if driver.limit is None:
        assert await replies(driver, 1) == [LONG]
        return
    expected = -(-len(LONG) // driver.limit)
    got = await replies(driver, expected)
    await asyncio.sleep(0.05)
    got = driver.replies()
    assert all(len(chunk) <= driver.limit for chunk in got)
    assert len(got) <= expected + 1
    assert " ".join(got) == LONG  # cut between sentences: nothing lost, nothing added


async def test_feedback_on_a_reply_reaches_the_feedback_hook(driver):
    spy = FeedbackSpy()
    bot = await driver.start(plugins=[spy])
    await driver.say("rate this", dm=True)
    await replies(driver, 1)
    await driver.rate(0, -1, "bob")
    await driver.rate(0, 1, "carol")
    await eventually(lambda: len(spy.votes) == 2)
    (exchange,) = list(bot.store.exchanges())
    assert spy.votes == [(exchange.id, driver.user_key("bob"), -1), (exchange.id, driver.user_key("carol"), 1)]


@pytest.mark.slow  # ~10 s a platform: 503 messages, each a full exchange written to SQLite
async def test_naughty_strings_are_all_answered_without_a_crash(driver, naughty_strings, caplog):
    caplog.set_level(logging.ERROR)
    await driver.start(config={"serving": {"max_queue": 1000}, "generation": {"max_new_tokens": 5000},
                               "plugins": {"commands": {"rate_limit": {"messages": 0}}}}, block_size=8192)
    # A numbered prefix keeps blank strings from being (rightly) ignored, and tells replies apart.
    texts = [f"n{i}: {s}" for i, s in enumerate(naughty_strings)]
    if driver.name == "http":
        await asyncio.gather(*(driver.say(t, dm=True) for t in texts))
    else:
        for t in texts:
            await driver.say(t, dm=True)
    wanted = {f"n{i}" for i in range(len(texts))}

    def answered() -> set[str]:
        return {r.removeprefix("You said: ").split(":", 1)[0] for r in driver.replies() if r.startswith("You said: n")}

    await eventually(lambda: answered() >= wanted, timeout=30)
    got = driver.replies()
    assert all(driver.limit is None or len(r) <= driver.limit for r in got)
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    if driver.name == "discord":
        assert all(s["allowed_mentions"] == {"parse": []} for s in driver.fake.sent())
    if driver.name == "slack":
        assert not any("<!" in p["text"] or "<@" in p["text"] for p in driver.fake.posts())
