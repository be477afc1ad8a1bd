"""The hook system: documented specs, built-ins on the same hooks, async hooks, tracing."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

from chatcore import DROP, hookimpl, hookspecs
from chatcore.plugin_manager import DEFAULT_PLUGINS, make_plugin_manager


def _specs():
    return [(name, fn) for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
            if hasattr(fn, "chatcore_spec")]


def test_every_hook_has_a_one_line_docstring():
    specs = _specs()
    assert len(specs) >= 14
    for name, fn in specs:
        doc = inspect.getdoc(fn)
        assert doc, f"hook {name} has no docstring"
        assert len(doc.strip().splitlines()) == 1, f"hook {name}: docstring should be one line"


def test_builtins_register_through_the_same_hooks():
    pm = make_plugin_manager(entry_points=False)
    assert {"stdin", "commands"} <= {pm.get_name(p) for p in pm.get_plugins()}
    assert "stdin" in pm.adapters()
    assert {"help", "reset", "forget", "status"} <= set(pm.commands())
    for name in DEFAULT_PLUGINS:
        assert name in {pm.get_name(p) for p in pm.get_plugins()} or name in pm.unavailable


class Recorder:
    def __init__(self):
        self.calls = []

    @hookimpl
    def message_received(self, bot, message):
        self.calls.append(("message_received", message.text))

    @hookimpl
    def prompt_built(self, bot, message, prompt):
        self.calls.append(("prompt_built", prompt.text))

    @hookimpl
    async def reply_ready(self, bot, message, reply):  # async hooks are awaited
        self.calls.append(("reply_ready", reply.text))
        reply.text = reply.text.upper()

    @hookimpl
    def exchange_logged(self, bot, exchange):
        self.calls.append(("exchange_logged", exchange.reply_text))


@pytest.fixture
def recorder():
    return Recorder()


@pytest.fixture
def testbot_plugins(recorder):
    return [recorder]


@pytest.fixture
def testbot_replies():
    return ["hello there"]


def test_hooks_see_each_step_and_reply_ready_rewrites(testbot, recorder):
    assert testbot.ask("hi bot") == "HELLO THERE"
    names = [c[0] for c in recorder.calls]
    assert names == ["message_received", "prompt_built", "reply_ready", "exchange_logged"]
    assert recorder.calls[1][1] == "Human: hi bot\nAssistant:"
    assert recorder.calls[3][1] == "HELLO THERE"  # what was delivered is what was stored


class Dropper:
    @hookimpl
    async def message_received(self, bot, message):
        if "spam" in message.text:
            return DROP
        if message.text == "ping":
            return "pong"
        return None


def test_message_received_can_drop_or_answer(tmp_path):
    from chatcore.testing import ScriptedEngine, TestBot, make_bot

    engine = ScriptedEngine(["from the model"])
    bot = TestBot(make_bot(tmp_path, engine=engine, plugins=[Dropper()]))
    try:
        assert bot.ask("buy spam now") is None
        assert bot.ask("ping") == "pong"
        assert bot.ask("hello") == "from the model"
        assert len(engine.prompts) == 1  # only the last one reached the model
        assert bot.bot.store.stats()["exchanges"] == 1
    finally:
        bot.close()


def test_disabled_plugin_is_not_called(tmp_path):
    from chatcore.testing import TestBot, make_bot

    bot = TestBot(make_bot(tmp_path, plugins=[Dropper()], config={"plugins": {"disabled": ["commands"]}}))
    try:
        assert "commands" not in {bot.bot.pm.get_name(p) for p in bot.bot.pm.get_plugins()}
        assert bot.ask("/help").startswith("You said")  # no command plugin: the model answers
    finally:
        bot.close()


def test_trace_env_var_prints_hook_calls(tmp_path):
    code = (
        "import asyncio\n"
        "from chatcore.testing import make_bot\n"
        f"bot = make_bot({str(tmp_path)!r})\n"
        "asyncio.run(bot.handle(bot_message := __import__('chatcore').Message('hi', 'test', 'c', 'u')))\n"
    )
    env = {"CHATCORE_TRACE_HOOKS": "1", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "[chatcore hook] register_adapters(" in out.stderr
    assert "[chatcore hook] message_received [commands] returned None" in out.stderr
    assert "[chatcore hook] exchange_logged(" in out.stderr and "returned" in out.stderr
