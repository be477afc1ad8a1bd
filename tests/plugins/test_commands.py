"""Built-in commands, admin gating and the per-user rate limit, through a whole bot."""

from __future__ import annotations

import pytest

from chatcore import hookimpl


class AdminPlugin:
    def __init__(self):
        self.ran = []

    @hookimpl
    def register_commands(self, register):
        def shutdown_now(bot, message, args):
            """Pretend to do something only admins may do."""
            self.ran.append(args)
            return f"done {args}"

        register("danger", shutdown_now, admin=True)


@pytest.fixture
def admin_plugin():
    return AdminPlugin()


@pytest.fixture
def testbot_plugins(admin_plugin):
    return [admin_plugin]


@pytest.fixture
def testbot_config():
    return {"bot": {"admins": ["test:root"]},
            "plugins": {"commands": {"rate_limit": {"messages": 5, "seconds": 3600}}}}


def test_help_lists_commands_from_docstrings(testbot):
    text = testbot.ask("/help")
    assert "/reset - Start a new conversation" in text
    assert "/forget - Delete everything I stored from you" in text
    assert "/danger" not in text  # admin-only, hidden from others
    assert "/danger - Pretend to do something only admins may do. (admin)" in testbot.ask("/help", user="root")


def test_admin_commands_are_gated(testbot, admin_plugin):
    assert testbot.ask("/danger now") == "Unknown command /danger. Try /help."
    assert admin_plugin.ran == []
    assert testbot.ask("/danger now", user="root") == "done now"
    assert admin_plugin.ran == ["now"]


def test_reset_starts_a_new_conversation(testbot):
    testbot.ask("my name is Ada")
    engine = testbot.bot.engine
    testbot.ask("what is my name?")
    assert "my name is Ada" in engine.prompts[-1]  # earlier turn carried
    assert testbot.ask("/reset").startswith("OK")
    testbot.ask("what is my name?", user="alice")
    assert "my name is Ada" not in engine.prompts[-1]


def test_forget_deletes_my_data_only(testbot):
    testbot.ask("secret of alice", user="alice")
    testbot.ask("hello from bob", user="bob")
    assert "deleted 1 stored message" in testbot.ask("/forget", user="alice")
    texts = [e.user_text for e in testbot.bot.store.exchanges(include_opted_out=True)]
    assert texts == ["hello from bob"]
    assert testbot.bot.store.is_opted_out("test:alice")


def test_status_names_the_model(testbot):
    testbot.ask("hi")
    assert "scripted" in testbot.ask("/status") and "1 exchanges stored" in testbot.ask("/status")


def test_rate_limit_answers_politely_once_then_drops(testbot):
    for _ in range(5):
        assert testbot.ask("hello", user="carol").startswith("You said")
    polite = testbot.ask("hello", user="carol")
    assert "faster than I can keep up" in polite
    assert testbot.ask("hello", user="carol") is None  # no reply storm
    assert testbot.ask("hello", user="dave").startswith("You said")  # per user
    for _ in range(8):
        assert testbot.ask("hello", user="root") is not None  # admins are exempt


def test_feedback_commands_mark_the_last_reply(testbot):
    assert testbot.ask("/bad").startswith("There is no reply")
    testbot.ask("tell me a joke")
    assert testbot.ask("/bad") == "Thanks for the feedback."
    exchange = testbot.bot.store.last_exchange(testbot.message("x"))
    assert exchange.feedback == -1


def test_unknown_command(testbot):
    assert testbot.ask("/nope") == "Unknown command /nope. Try /help."


def test_rate_limiter_window_slides():
    from chatcore.plugins.commands import RateLimiter

    now = [0.0]
    limiter = RateLimiter(2, 10, clock=lambda: now[0])
    assert limiter.check("u") is None and limiter.check("u") is None
    assert "wait 10 s" in limiter.check("u")
    now[0] = 10.5
    assert limiter.check("u") is None
