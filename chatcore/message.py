"""The one message type every adapter translates its platform's events into, and what the core answers.

Torch-free, like everything an adapter imports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Message:
    """A user's message as the core sees it, whatever platform it came from."""

    text: str
    adapter: str  # adapter name: "stdin", "discord", "slack", "http", ...
    channel: str  # channel, thread or session id: with `user`, it keys the conversation
    user: str  # the platform's user id
    user_name: str | None = None
    is_direct: bool = False  # a DM, or a one-to-one surface such as stdin
    mentions_bot: bool = False
    id: str | None = None  # the platform's message id, when it has one
    workspace: str | None = None  # Discord guild / Slack team id: training policy and scopes follow it
    parent: str | None = None  # a thread's parent channel: the thread shares its scope (chatcore.scopes)
    raw: Any = field(default=None, compare=False, repr=False)  # the platform event, for plugins
    # Who vouches for `user`. A chat platform does; an HTTP client without an API key names itself,
    # so its text is untrusted (for training too) and its `user` is free to rotate.
    authenticated: bool = True
    anonymous: bool = False  # no identity at all: `user` is a one-off id, so "my data" commands are refused
    client: str | None = None  # the sender's network address, where the platform has one (HTTP)

    @property
    def conversation_key(self) -> str:
        return f"{self.adapter}:{self.channel}:{self.user}"

    @property
    def user_key(self) -> str:
        """The user's id across the bot: admin lists and /forget use this form."""
        return f"{self.adapter}:{self.user}"

    @property
    def limit_key(self) -> str:
        """Whom rate limits count against: the user, or the client address when the id costs nothing to change."""
        if (self.anonymous or not self.authenticated) and self.client:
            return f"{self.adapter}:client:{self.client}"
        return self.user_key


@dataclass
class Prompt:
    """The rendered model prompt; `prompt_built` hooks may rewrite `text`."""

    text: str
    turns: list[tuple[str, str]]  # earlier (user, assistant) turns that made it in


@dataclass
class Reply:
    """The bot's answer to a message; `reply_ready` hooks may rewrite `text`."""

    text: str
    message: Message
    exchange_id: int | None = None  # row id in the history store once logged
    model_id: str | None = None
    from_model: bool = True  # False when a command or plugin answered
    files: tuple["File", ...] = ()  # attachments (e.g. /mydata); adapters deliver them as the platform allows


@dataclass(frozen=True)
class File:
    """A file a reply carries: discord.File, Slack files_upload_v2, a path on stdin, inline JSON on HTTP."""

    name: str
    data: bytes = field(repr=False)
    mime: str = "application/octet-stream"


class _Drop:
    def __repr__(self) -> str:
        return "DROP"


DROP = _Drop()
"""Returned by a `message_received` hook to ignore a message."""


class Busy(RuntimeError):
    """The model's queue is full: answer `BUSY_REPLY` (chat) or 503 (HTTP) and let the user retry."""


BUSY_REPLY = "I'm answering a lot of messages right now; please try again in a moment."
"""What chat adapters tell a user whose message found the queue full."""


class RateLimited(Exception):
    """The sender is over the rate limit: chat adapters say `notice` (None: stay quiet), HTTP answers 429."""

    def __init__(self, retry_after: float, notice: str | None = None) -> None:
        super().__init__(notice or f"rate limited; retry after {retry_after:g} s")
        self.retry_after, self.notice = retry_after, notice
