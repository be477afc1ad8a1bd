"""Testing tools for chatcore and its plugins (a pytest plugin, errbot's testbot style).

Installed as a pytest plugin, it gives every project the `testbot` fixture: a
whole bot (hooks, commands, SQLite store, prompt building) around a scripted
fake model, so plugin tests need no weights::

    def test_my_plugin(testbot):
        testbot.push("hello")
        assert testbot.pop() == "..."

Override the `testbot_plugins`, `testbot_config` or `testbot_replies` fixtures
to register your plugin, change the config, or script the model's answers.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from .message import Message, RateLimited, Reply
from .params import SamplingParams

Script = Iterable[str] | Callable[[str], str] | None


class ScriptedEngine:
    """A fake model with the Engine's shape: answers from a script and records every prompt.

    `replies` is a list (used in turn, cycling), a function of the prompt, or None
    (echo the last human turn). Output streams word by word and obeys the same
    stop rules as the real engine: newline, stop strings, max_new_tokens (in words).
    """

    def __init__(self, replies: Script = None, *, model_id: str = "scripted", block_size: int = 1024,
                 delay: float = 0.0) -> None:
        if replies is None:
            self._reply: Callable[[str], str] = _echo
        elif callable(replies):
            self._reply = replies
        else:
            cycle = itertools.cycle(list(replies))
            self._reply = lambda prompt: next(cycle)
        self.model_id = model_id
        self.block_size = block_size
        self.delay = delay
        self.prompts: list[str] = []

    def count_tokens(self, text: str) -> int:
        # About four bytes a token, like GPT-2 on English; good enough for budget tests.
        return (len(text.encode("utf-8")) + 3) // 4

    def stream(self, prompt: str, params: SamplingParams, cancelled: Callable[[], bool] | None = None) -> Iterator[str]:
        import time

        self.prompts.append(prompt)
        text = self._reply(prompt)
        if params.stop_at_newline:
            text = text.split("\n", 1)[0]
        for stop in params.stop:
            text = text.split(stop, 1)[0]
        for word in text.split(" ")[: params.max_new_tokens]:
            if cancelled is not None and cancelled():
                return
            if self.delay:
                time.sleep(self.delay)
            yield " " + word

    def generate(self, prompt: str, params: SamplingParams) -> str:
        return "".join(self.stream(prompt, params))


def _echo(prompt: str) -> str:
    last = prompt.rsplit("Human: ", 1)[-1].split("\nAssistant:", 1)[0]
    return f"You said: {last}"


def make_bot(tmp_path: str | Path, *, engine: Any = None, config: dict | str | None = None,
             plugins: Iterable[Any] = (), environ: dict[str, str] | None = None) -> Any:
    """A full Bot around `engine` (a ScriptedEngine by default) with its store under `tmp_path`."""
    from .bot import Bot
    from .config import parse_config
    from .plugin_manager import make_plugin_manager

    tmp_path = Path(tmp_path)
    if isinstance(config, str):
        config = yaml.safe_load(config) or {}
    config = dict(config or {})
    config.setdefault("bot", {}).setdefault("data_dir", str(tmp_path))
    pm = make_plugin_manager(plugins)
    cfg = parse_config(yaml.safe_dump(config), pm.schema(), environ=environ)
    return Bot.from_config(cfg, engine=engine or ScriptedEngine(), pm=pm)


async def until_registry_listening(bot: Any, timeout: float = 10.0) -> None:
    """Wait until a following bot hears other instances' announcements: a NOTIFY sent before that is lost."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not bot.registry_listening:
        if loop.time() > deadline:
            raise AssertionError(f"the bot was not listening for registry announcements after {timeout:g} s")
        await asyncio.sleep(0.05)


class TestBot:
    """Push messages through a whole bot and pop its replies."""

    __test__ = False  # not a test class, whatever pytest thinks of the name

    def __init__(self, bot: Any) -> None:
        self.bot = bot
        self.replies: deque[Reply | None] = deque()
        self._loop = asyncio.new_event_loop()

    def message(self, text: str, **fields: Any) -> Message:
        fields = {"adapter": "test", "channel": "general", "user": "alice", "is_direct": True, **fields}
        return Message(text=text, **fields)

    def push(self, text: str, **fields: Any) -> Reply | None:
        """Send `text` as a user (fields override adapter, channel, user, ...); queue the reply."""
        message = self.message(text, **fields)
        try:
            reply = self._loop.run_until_complete(self.bot.handle(message))
        except RateLimited as refused:  # as a chat adapter does: say the notice once, then stay quiet
            reply = Reply(refused.notice, message, from_model=False) if refused.notice else None
        self.replies.append(reply)
        return reply

    def pop(self) -> str | None:
        """The oldest reply not popped yet (None where the bot stayed silent)."""
        reply = self.replies.popleft()
        return None if reply is None else reply.text

    def ask(self, text: str, **fields: Any) -> str | None:
        self.push(text, **fields)
        return self.pop()

    async def ahandle(self, text: str, **fields: Any) -> Reply | None:
        """For async tests: handle on the running event loop."""
        return await self.bot.handle(self.message(text, **fields))

    def close(self) -> None:
        self._loop.run_until_complete(self.bot.close())
        self._loop.close()


@pytest.fixture
def testbot_plugins() -> list[Any]:
    """Plugins to register on the test bot (override in your conftest)."""
    return []


@pytest.fixture
def testbot_config() -> dict:
    """Config for the test bot, as a dict (override in your conftest)."""
    return {}


@pytest.fixture
def testbot_replies() -> Script:
    """The scripted model's replies: a list, a function of the prompt, or None to echo."""
    return None


@pytest.fixture
def testbot(tmp_path: Path, testbot_plugins: list[Any], testbot_config: dict, testbot_replies: Script) -> Iterator[TestBot]:
    """A whole chatcore bot with a scripted model: `push(text)` a message, `pop()` the reply."""
    bot = TestBot(make_bot(tmp_path, engine=ScriptedEngine(testbot_replies), config=testbot_config,
                           plugins=testbot_plugins))
    yield bot
    bot.close()
