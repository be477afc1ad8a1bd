"""Built-in slash commands and the per-user rate limit.

Over the limit, `message_received` raises `RateLimited`: the first refusal in a
window carries a polite notice, later ones none (chat adapters stay quiet; HTTP
answers 429 every time). Senders whose id is free to change (HTTP without an API
key, anonymous requests) are counted by client address (`Message.limit_key`).
The counts live in the history store (`Store.rate_limit`), so the limit holds
across every `chatcore run` process sharing one history.
Commands act on the sender's data, so without an identity (`Message.anonymous`)
only those registered with ``anonymous=True`` run.

Every command is registered through `register_commands`, exactly as a
third-party plugin would; `/help` is built from the handlers' docstrings.
"""

from __future__ import annotations

import time
from typing import Any

from chatcore import DROP, hookimpl
from chatcore.plugin_manager import await_me_maybe
from chatcore.config import Field
from chatcore.consent import describe
from chatcore.message import RateLimited, Reply
from chatcore.store import Store


@hookimpl
def register_config(register):
    register("plugins.commands", {
        "prefix": Field(str, "/", help="What starts a command."),
        "rate_limit": {
            "messages": Field(int, 20, help="Messages one user may send per window (0: no limit; admins exempt)."),
            "seconds": Field((int, float), 60, help="The window, in seconds."),
        },
    })


@hookimpl
def register_commands(register):
    register("help", help_, anonymous=True)
    register("reset", reset)
    register("forget", forget)
    register("status", status, anonymous=True)
    register("good", good)
    register("bad", bad)
    register("retry", retry)
    register("persona", persona)


@hookimpl(tryfirst=True)
async def message_received(bot, message):
    limiter = RateLimiter(bot.config.get("plugins.commands.rate_limit.messages"),
                          bot.config.get("plugins.commands.rate_limit.seconds"), store=bot.store)
    if limiter.messages > 0 and not bot.is_admin(message):
        refused = await bot.store.run(limiter.refusal, message.limit_key)
        if refused is not None:
            raise refused
    prefix = bot.config.get("plugins.commands.prefix")
    text = message.text.strip()
    if not text.startswith(prefix) or len(text) == len(prefix):
        return None
    name, _, args = text[len(prefix):].partition(" ")
    command = bot.commands.get(name.lower())
    if command is None or (command.admin and not bot.is_admin(message)):
        return f"Unknown command {prefix}{name}. Try {prefix}help."
    if message.anonymous and not command.anonymous:
        # a one-off id owns no data: acting on "my data" without an identity could only hit someone else's
        return (f"{prefix}{command.name} needs to know who you are, and this message came without a user id "
                f"(over HTTP: send a \"user\"). Nothing was changed.")
    return await _run(command, bot, message, args.strip())


async def _run(command, bot, message, args: str) -> str | Reply:
    answer = await await_me_maybe(command.handler(bot, message, args))
    return answer if isinstance(answer, Reply) else str(answer)  # a Reply may carry files, or be a logged /retry


class RateLimiter:
    """A sliding window per sender, counted in the history store; the first refusal in a window is answered, the rest dropped."""

    def __init__(self, messages: int, seconds: float, clock=time.time, store: Store | None = None) -> None:
        # Wall-clock time: instances on several machines compare their timestamps in one table.
        self.messages, self.seconds, self.clock = messages, seconds, clock
        self.store = store if store is not None else Store(":memory:")

    def refusal(self, limit_key: str) -> RateLimited | None:
        """None if `limit_key` may send now (the message then counts), else the refusal to raise."""
        if self.messages <= 0:
            return None
        over = self.store.rate_limit(limit_key, self.messages, self.seconds, now=self.clock())
        if over is None:
            return None
        wait, tell = max(1, round(over[0])), over[1]
        notice = f"You're sending messages faster than I can keep up with. Please wait {wait} s and try again."
        return RateLimited(wait, notice if tell else None)

    def check(self, limit_key: str) -> Any:
        """None if allowed, the notice for the first refusal in a window, `DROP` for the later ones."""
        refused = self.refusal(limit_key)
        return None if refused is None else refused.notice or DROP


# --- commands --------------------------------------------------------------------


def help_(bot, message, args):
    """List the commands you can use."""
    prefix = bot.config.get("plugins.commands.prefix")
    admin = bot.is_admin(message)
    lines = [f"{prefix}{c.name} - {c.help}" + (" (admin)" if c.admin else "")
             for c in sorted(bot.commands.values(), key=lambda c: c.name) if admin or not c.admin]
    return "Commands:\n" + "\n".join(lines)


async def reset(bot, message, args):
    """Start a new conversation: I forget the earlier turns of this one."""
    await bot.store.run(bot.store.reset_conversation, message)
    return "OK, starting a new conversation."


async def forget(bot, message, args):
    """Delete everything I stored from you, and never train on your messages."""
    deleted = await bot.store.run(bot.store.forget_user, message.user_key)
    extra = []
    for result in bot.pm.hook.user_forgotten(bot=bot, user_key=message.user_key, deleted=deleted):
        note = await await_me_maybe(result)
        if note:
            extra.append(str(note))
    return " ".join([f"Done: I deleted {deleted} stored message(s) of yours and won't learn from you.", *extra])


async def status(bot, message, args):
    """Show which model is serving and what I have learned so far."""
    stats = await bot.store.run(bot.store.stats)
    days = bot.config.get("history.retention_days")
    kept = f"I keep history for {days:g} days." if days else "I keep history until you /forget it."
    return (f"{bot.name} on model {bot.engine.model_id}: {stats['exchanges']} exchanges stored, "
            f"{stats['since_finetune']} new since the last fine-tune. {kept} "
            f"{await bot.store.run(describe, bot, message)}")


async def good(bot, message, args):
    """Mark my last reply in this conversation as good."""
    return await _rate_last(bot, message, +1)


async def bad(bot, message, args):
    """Mark my last reply in this conversation as bad: I won't learn from it."""
    return await _rate_last(bot, message, -1)


async def _rate_last(bot, message, value: int) -> str:
    exchange = await bot.store.run(bot.store.last_exchange, message)
    if exchange is None:
        return "There is no reply of mine in this conversation to rate yet."
    await bot.rate(exchange, message.user_key, value)
    return "Thanks for the feedback."


async def retry(bot, message, args):
    """Answer my last reply again, differently (then rate one, or just carry on with the new one)."""
    reply = await bot.retry(message)
    return reply if reply is not None else "There is no reply of mine in this conversation to retry yet."


async def persona(bot, message, args):
    """Show this channel's persona (admins: /persona set TEXT, /persona clear)."""
    scopes = bot.scopes
    scope = scopes.resolve(message)
    if scope is None:
        return "This channel is in no scope, so it has no persona (see scopes: in the config)."
    verb, _, text = args.partition(" ")
    if verb in ("set", "clear"):
        if not bot.is_admin(message):
            return "Only admins can change the persona."
        if verb == "set" and not text.strip():
            return "Usage: /persona set TEXT"
        try:
            scopes.set_persona(scope, text.strip() if verb == "set" else None)
        except ValueError as exc:
            return str(exc)
    elif verb:
        return "Usage: /persona, /persona set TEXT, /persona clear"
    current = scopes.persona(scope)
    return f"Persona of {scope.name}: {current}" if current else f"{scope.name} has no persona."
