"""The stdin adapter: piped chat answers each line and ends at EOF; bad bytes never crash it."""

from __future__ import annotations

import io

import pytest

from chatcore.adapters.stdin import StdinAdapter
from chatcore.testing import ScriptedEngine, make_bot


@pytest.fixture
def bot(tmp_path):
    bot = make_bot(tmp_path, engine=ScriptedEngine())
    yield bot
    bot.store.close()


async def chat(bot, data: bytes) -> str:
    out = io.StringIO()
    adapter = StdinAdapter(bot, {"user": "ada", "operator_is_admin": True, "stream": True},
                           stdin=io.BytesIO(data), stdout=out)
    await adapter.start()
    return out.getvalue()


async def test_piped_lines_each_get_one_reply_line(bot):
    out = await chat(bot, b"hi\n\n   \nbye\n")
    assert out.splitlines() == ["You said: hi", "You said: bye"]  # blank lines ignored
    assert bot.store.history(("stdin", "terminal", "ada")) == [("hi", "You said: hi"), ("bye", "You said: bye")]


async def test_invalid_utf8_is_replaced_not_fatal(bot):
    out = await chat(bot, b"caf\xe9 \xff\xfe ok\nnext\n")
    lines = out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("You said: caf\ufffd") and lines[1] == "You said: next"


async def test_last_line_without_newline_and_crlf(bot):
    out = await chat(bot, b"one\r\ntwo")
    assert out.splitlines() == ["You said: one", "You said: two"]


async def test_commands_work_on_stdin(bot):
    out = await chat(bot, b"/help\n")
    assert "/reset" in out and "/forget" in out


async def test_huge_message_is_stored_whole(bot):
    big = "x" * 1_000_000
    await chat(bot, big.encode() + b"\n")
    (exchange,) = list(bot.store.exchanges())
    assert len(exchange.user_text) == 1_000_000
    prompt = bot.engine.prompts[-1]
    assert bot.engine.count_tokens(prompt) <= bot.engine.block_size  # truncated for the model
