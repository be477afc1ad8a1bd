"""Hostile request fields into every adapter: no 500, no dead worker, the bot still answers afterwards.

Each case is a request or platform event built to break something: the naughty
strings list, huge and oddly typed fields, deep JSON, invalid Unicode. A case
*holds* when the adapter answers it with a reply or a 4xx (never a 5xx, never
silence where a reply is due) and the bot still answers a plain message after
the whole batch. At the end the module reports how many cases it tried and how
many held, in pytest's terminal summary (issue 17: "counts of cases tried, held").
"""

from __future__ import annotations

import asyncio
import io
import json
from collections import Counter

import aiohttp

from chatcore.adapters.stdin import StdinAdapter
from chatcore.testing import ScriptedEngine, make_bot

from ..adapters.conftest import eventually
from .conftest import tally
from ..adapters.fake_discord import user

NO_LIMIT = {"plugins": {"commands": {"rate_limit": {"messages": 0}}}}
CHUNK = 32  # events in flight at once: well under the model queue, so every answer is a real reply


def odd_values(naughty: list[str]) -> list:
    """Values of every wrong type and size, for any field."""
    return [None, True, -1, 0, 2**64, -(2**63) - 1, 10**30, 1e308, -0.0, 3.7, "", " ", "\x00", "\ud7ff",
            "x" * 20_000, [], [1], [[[[]]]], {}, {"a": {"b": {}}}, ["a"] * 10, *naughty[::25]]


def bodies(naughty: list[str]) -> list[tuple[str, bytes]]:
    """(path, raw body) cases for every POST endpoint."""
    cases: list[tuple[str, bytes]] = []
    fields = ["seed", "temperature", "top_p", "top_k", "max_tokens", "max_completion_tokens", "stop", "n",
              "stream", "model", "user", "messages"]
    base = {"model": "x", "messages": [{"role": "user", "content": "hi"}]}
    for field in fields:
        for value in odd_values(naughty):
            cases.append(("/v1/chat/completions", json.dumps({**base, field: value}).encode()))
    for value in odd_values(naughty):
        for content in (value, [value], [{"type": "text", "text": value}], [{"type": value, "text": "x"}]):
            message = {"role": "user", "content": content}
            cases.append(("/v1/chat/completions", json.dumps({**base, "messages": [message]}).encode()))
            cases.append(("/v1/chat/completions",
                          json.dumps({**base, "stream": True, "messages": [message]}).encode()))
        cases.append(("/chat", json.dumps({"message": value, "user": value, "conversation": value}).encode()))
        cases.append(("/feedback", json.dumps({"id": value, "value": value, "user": value}).encode()))
    raw = [b"[" * 60_000 + b"]" * 60_000, b'{"seed": ' + b"1" * 6000 + b"}", b'{"message": "\\udc00"}',
           b"\xff\xfe\x00", b"", b"null", b"NaN", b"Infinity", b"1e999999", b'{"message": "a"' * 1000,
           b'{"message": "hi", "message": 5}', b"\xef\xbb\xbf" + b'{"message": "bom"}']
    for path in ("/v1/chat/completions", "/chat", "/feedback"):
        cases += [(path, r) for r in raw]
    return cases


async def test_http_hostile_fields_and_shapes(http_bot, naughty_strings):
    bot, _, url = await http_bot({"max_request_bytes": 256 * 1024}, config=NO_LIMIT)
    statuses: Counter = Counter()
    cases = bodies(naughty_strings)
    # the naughty strings as real content, through every text-carrying field and both completion modes
    for s in naughty_strings:
        cases.append(("/chat", json.dumps({"message": s, "user": s[:256] or None}).encode()))
        cases.append(("/v1/chat/completions", json.dumps(
            {"model": s, "user": s[:256], "stop": s or None, "messages": [{"role": "user", "content": s}]}).encode()))
        cases.append(("/v1/chat/completions", json.dumps(
            {"model": "x", "stream": True, "messages": [{"role": "user", "content": [{"type": "text", "text": s}]}]}
        ).encode()))
        cases.append(("/feedback", json.dumps({"id": s, "value": 1, "user": s[:256]}).encode()))

    async with aiohttp.ClientSession() as session:
        async def one(path: str, body: bytes) -> int:
            async with session.post(url + path, data=body, headers={"Content-Type": "application/json"}) as r:
                await r.read()
                return r.status

        for i in range(0, len(cases), CHUNK):
            for status in await asyncio.gather(*(one(p, b) for p, b in cases[i:i + CHUNK])):
                statuses[status] += 1
        async with session.post(f"{url}/chat", json={"message": "still there?", "user": "ann"}) as r:
            assert (r.status, await r.json()) == (200, {"response": "You said: still there?"})
        async with session.get(f"{url}/health") as r:
            assert r.status == 200
    held = sum(n for status, n in statuses.items() if status < 500)
    tally("http", len(cases), held)
    assert held == len(cases), f"server errors: {statuses}"
    assert bot.health()["status"] == "ok"


async def test_stdin_hostile_lines(tmp_path, naughty_strings):
    bot = make_bot(tmp_path, engine=ScriptedEngine(), config=NO_LIMIT)
    try:
        lines = [s.encode("utf-8", "surrogatepass") for s in naughty_strings]
        lines += [b"x" * 200_000, b"\x00\x01\x02", b"\xff\xfe\xfd", b"\xed\xa0\x80 lone surrogate bytes",
                  "🙂".encode() * 5000, b"/forget", b"/reset", b"/status", b"/" + b"a" * 5000, b"\r", b"\x1b[2J"]
        answered = [line for line in lines if line.decode("utf-8", "replace").strip()]
        out = io.StringIO()
        adapter = StdinAdapter(bot, {"user": "ann", "stream": True},
                               stdin=io.BytesIO(b"\n".join(lines + [b"still there?"]) + b"\n"), stdout=out)
        await asyncio.wait_for(adapter.start(), 60)
        replies = out.getvalue().splitlines()
        assert replies[-1] == "You said: still there?"
        held = min(len(replies) - 1, len(answered))
        tally("stdin", len(lines), held + (len(lines) - len(answered)))
        assert len(replies) - 1 == len(answered)
        assert bot.generator.health() is None
    finally:
        await bot.close()


async def test_discord_hostile_messages_and_reactions(discord_bot, fake_discord, naughty_strings):
    bot, _ = await discord_bot(config=NO_LIMIT)
    author = user(5, "alice")
    odd = ["x" * 4000, "<@0>", "<@!99999999999999999999>", "@everyone @here", "```" * 300, "\u202e" * 50, "\x00"]
    texts = naughty_strings + odd
    expected = sum(1 for t in texts if t.strip())
    for i in range(0, len(texts), CHUNK):
        for t in texts[i:i + CHUNK]:
            await fake_discord.send_message(t, author=author, dm=True)
        await fake_discord.wait_sent(sum(1 for t in texts[:i + CHUNK] if t.strip()), timeout=30)
    replies = fake_discord.sent()
    assert all(0 < len(r["content"]) <= 2000 for r in replies)
    reply_id = replies[0]["response"]["id"]
    for emoji in naughty_strings[::10] + ["\N{THUMBS UP SIGN}" * 3, ""]:  # odd reactions: ignored or rated
        await fake_discord.react(reply_id, emoji, author["id"])
        await fake_discord.dispatch("MESSAGE_REACTION_REMOVE", {
            "user_id": str(author["id"]), "channel_id": str(fake_discord.dm_channel_id), "message_id": reply_id,
            "emoji": {"id": None, "name": emoji}, "burst": False, "type": 0})
    await fake_discord.send_message("still there?", author=author, dm=True)
    await eventually(lambda: any(r["content"] == "You said: still there?" for r in fake_discord.sent()), 15)
    tried = len(texts) + len(naughty_strings[::10]) + 2
    held = min(len(replies), expected) + (len(texts) - expected) + len(naughty_strings[::10]) + 2
    tally("discord", tried, held)
    assert len(replies) >= expected and bot.generator.health() is None


async def test_slack_hostile_messages_and_events(slack_bot, fake_slack, naughty_strings):
    bot, _ = await slack_bot(config=NO_LIMIT)
    odd_text = ["x" * 50_000, "<!channel> <!here> <@U1|x>", "&lt;&amp;", "<" * 500, "\x00"]
    texts = naughty_strings + odd_text
    expected = sum(1 for t in texts if t.strip())
    for i in range(0, len(texts), CHUNK):
        for t in texts[i:i + CHUNK]:
            await fake_slack.push(fake_slack.event_body(fake_slack.message(t, "UALICE001")))
        await fake_slack.wait_posts(sum(1 for t in texts[:i + CHUNK] if t.strip()), timeout=30)
    posts = fake_slack.posts()
    # events Slack would not send, but a forged or broken one must not take the adapter down
    odd_events = [
        {"type": "message", "channel": "D0000001", "user": "UALICE001", "ts": "1.1", "text": None},
        {"type": "message", "channel": "D0000001", "user": "UALICE001", "ts": "1.2", "subtype": "weird"},
        {"type": "message", "channel": "D0000001", "ts": "1.3", "text": "no user"},
        {"type": "reaction_added", "user": "UALICE001", "reaction": "+1", "item": {"type": "message"}},
        {"type": "reaction_removed", "user": "UALICE001", "reaction": "-1",
         "item": {"type": "message", "channel": "D0000001", "ts": "9.9"}},
        {"type": "reaction_added", "user": "UALICE001", "reaction": "-1", "item": {"type": "file"}},
    ]
    for event in odd_events:
        await fake_slack.push(fake_slack.event_body(event))
    await fake_slack.push(fake_slack.event_body(fake_slack.message("still there?", "UALICE001")))
    await eventually(lambda: any(p["text"] == "You said: still there?" for p in fake_slack.posts()), 15)
    tried = len(texts) + len(odd_events)
    held = min(len(posts), expected) + (len(texts) - expected) + len(odd_events)
    tally("slack", tried, held)
    assert len(posts) >= expected and bot.generator.health() is None
