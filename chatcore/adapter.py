"""The base class every chat adapter implements.

An adapter only translates: platform events in (as `chatcore.message.Message`,
handed to `Bot.handle`), replies out (split to the platform's limits with
`chatcore.text.split_message`). Everything else lives in the core, tested once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from .bot import Bot


class AdapterError(RuntimeError):
    """An adapter cannot start; the message says what to fix (bad token, missing intent or secret)."""


class Adapter:
    name: ClassVar[str] = ""
    config_schema: ClassVar[dict[str, Any]] = {}  # {key: chatcore.config.Field}; `enabled` is added for you

    def __init__(self, bot: "Bot", config: dict[str, Any]) -> None:
        self.bot = bot
        self.config = config

    async def start(self) -> None:
        """Connect and serve until `stop` is called (or the input ends)."""
        raise NotImplementedError

    async def stop(self) -> None:
        """Disconnect; must be safe to call more than once."""
