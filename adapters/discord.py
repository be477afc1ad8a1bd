"""Discord adapter (discord.py): DMs, mentions, and optionally whole channels.

Thin by design: a Discord message becomes a `Message`, the reply goes back in
chunks of at most 2000 characters with every mention disabled, 👍/👎
reactions on a reply become feedback (removing the reaction withdraws it), and 🔁 on one's
last reply asks for another answer. The conversation is the channel (a
thread is its own channel) plus the user. Reconnects are discord.py's job.

Intents: the default ones (guilds, messages, reactions). Discord delivers the
text of DMs and of messages that mention the bot without the privileged
Message Content intent, so it is requested only when `channels` is set (the
bot must then read messages that do not mention it).

Sharding: with `shard_count` set, discord.py's `AutoShardedClient` runs the
gateway shards listed in `shard_ids` (default: all of them), so several
instances on one history split a large bot's shards between them; Discord
sends each guild's events to one shard, DMs to shard 0 (docs/deployment.md).

discord.py is imported when the adapter is created, not with this module: the
plugin manager loads every built-in for its config section, and importing
discord.py (~0.3 s) would slow the start of every bot, Discord enabled or not.
"""

from __future__ import annotations

import asyncio
import functools
import io
import logging
import re
from typing import TYPE_CHECKING, Any

from chatcore import hookimpl
from chatcore.adapter import Adapter, AdapterError, BotSurface, require

if TYPE_CHECKING:
    import discord

require("discord")  # a missing discord.py makes the adapter unavailable (config check says so), as an import would
from chatcore.config import ConfigError, Field
from chatcore.message import BUSY_REPLY, Busy, Message, RateLimited, Reply
from chatcore.text import split_message

log = logging.getLogger("chatcore.discord")

MESSAGE_LIMIT = 2000
# Reactions that rate a reply; skin tones and the emoji variation selector are ignored.
FEEDBACK = {"\N{THUMBS UP SIGN}": 1, "\N{THUMBS DOWN SIGN}": -1}
RETRY = "\N{CLOCKWISE RIGHTWARDS AND LEFTWARDS OPEN CIRCLE ARROWS}"  # 🔁: answer that again (/retry)
_EMOJI_MODIFIERS = re.compile("[\U0001F3FB-\U0001F3FF\uFE0F]")
_ANSWERED_TYPES = ("default", "reply")  # discord.MessageType names: ordinary messages and replies


class _Events:
    """The adapter's gateway events, on a plain or a sharded client."""

    def __init__(self, adapter: "DiscordAdapter", **options: Any) -> None:
        super().__init__(**options)
        self.adapter = adapter

    async def on_ready(self) -> None:
        shards = f", shards {self.shard_ids} of {self.shard_count}" if self.shard_count else ""
        log.info("discord: logged in as %s (%s) in %d servers%s", self.user, self.user.id, len(self.guilds), shards)
        self.adapter.ready.set()

    async def on_message(self, message: discord.Message) -> None:
        await self.adapter.on_message(message)

    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        await self.adapter.on_reaction(payload)

    async def on_raw_reaction_remove(self, payload: discord.RawReactionActionEvent) -> None:
        await self.adapter.on_reaction(payload, removed=True)


@functools.cache
def _client_classes() -> tuple[type, type]:
    """The gateway clients, plain and sharded: defined on first use, as they subclass discord.py's."""
    import discord  # late: see the module docstring

    class Client(_Events, discord.Client):
        pass

    class ShardedClient(_Events, discord.AutoShardedClient):
        pass

    return Client, ShardedClient


def shard_settings(config: dict[str, Any]) -> tuple[list[int] | None, int | None]:
    """(shard_ids, shard_count) from the adapter's config, checked; (None, None): one unsharded connection."""
    ids, count = config.get("shard_ids"), config.get("shard_count")
    if count is None:
        if ids is not None:
            raise ConfigError("needs shard_count too (the total number of shards across every instance)",
                              key="adapters.discord.shard_ids")
        return None, None
    if type(count) is not int or count < 1:
        raise ConfigError(f"must be a whole number of at least 1 (got {count!r})", key="adapters.discord.shard_count")
    if ids is None:
        return list(range(count)), count
    # From an environment variable ("0,1"), a list arrives as strings.
    ids = [int(i) if isinstance(i, str) and re.fullmatch(r"\s*\d+\s*", i) else i for i in ids]
    if not ids or any(type(i) is not int for i in ids):
        raise ConfigError(f"must be a non-empty list of shard numbers (got {ids!r})", key="adapters.discord.shard_ids")
    if bad := [i for i in ids if not 0 <= i < count]:
        raise ConfigError(f"shard ids run from 0 to shard_count - 1 = {count - 1}: {bad} out of range",
                          key="adapters.discord.shard_ids")
    if len(set(ids)) != len(ids):
        raise ConfigError(f"lists a shard twice: {ids}", key="adapters.discord.shard_ids")
    return sorted(ids), count


class DiscordAdapter(Adapter):
    name = "discord"
    config_schema = {
        "token": Field(str, required=True, secret=True, help="Bot token: token: ${DISCORD_TOKEN}"),
        "channels": Field(list, [], help="Channel ids where every message is answered, not only mentions "
                                         "(needs the Message Content intent)."),
        "answer_dms": Field(bool, True, help="Answer direct messages."),
        "shard_count": Field(int, None, help="Gateway shards across all instances (null: one unsharded "
                                             "connection). Every instance sets the same number."),
        "shard_ids": Field(list, None, help="The shards this instance runs, e.g. [0, 1] (null: all of them); "
                                            "needs shard_count. DMs arrive on shard 0."),
    }
    guild_ready_timeout: float = 2.0  # discord.py's wait for guilds before on_ready; tests lower it

    @classmethod
    def check_config(cls, config: dict[str, Any]) -> None:
        shard_settings(config)

    def __init__(self, bot: BotSurface, config: dict[str, Any]) -> None:
        import discord  # late: see the module docstring

        super().__init__(bot, config)
        self.channels = {int(c) for c in config.get("channels") or []}
        intents = discord.Intents.default()
        intents.message_content = bool(self.channels)
        options = dict(intents=intents, allowed_mentions=discord.AllowedMentions.none(),
                       guild_ready_timeout=self.guild_ready_timeout)
        shard_ids, shard_count = shard_settings(config)
        client, sharded_client = _client_classes()
        if shard_count is None:
            self.client: discord.Client = client(self, **options)
        else:
            self.client = sharded_client(self, shard_ids=shard_ids, shard_count=shard_count, **options)
        self.ready = asyncio.Event()

    async def start(self) -> None:
        import discord  # late: see the module docstring

        try:
            await self.client.start(self.config["token"])
        except discord.LoginFailure:
            raise AdapterError(
                "discord: Discord rejected the bot token (401 Unauthorized). Copy the token from the "
                "Developer Portal (Applications > your app > Bot > Reset Token) into DISCORD_TOKEN."
            ) from None
        except discord.PrivilegedIntentsRequired:
            raise AdapterError(
                "discord: Discord closed the connection with code 4014: the Message Content intent is not "
                "enabled. `channels` is set, so the bot must read messages that do not mention it: enable "
                "Developer Portal > your app > Bot > Privileged Gateway Intents > MESSAGE CONTENT INTENT, "
                "or remove `channels` to answer only DMs and mentions."
            ) from None
        finally:
            await self.client.close()

    async def stop(self) -> None:
        await self.client.close()

    # --- events -------------------------------------------------------------------

    def to_message(self, message: discord.Message) -> Message | None:
        """The core's view of a Discord message, or None when the bot should not answer it."""
        me = self.client.user
        if me is None or message.author.bot or message.author.id == me.id or message.type.name not in _ANSWERED_TYPES:
            return None
        is_dm = message.guild is None
        mentioned = any(u.id == me.id for u in message.mentions) or me.id in message.raw_mentions
        channel = message.channel
        listened = channel.id in self.channels or getattr(channel, "parent_id", None) in self.channels
        if not (mentioned or listened or (is_dm and self.config.get("answer_dms", True))):
            return None
        text = re.sub(r"[ \t]{2,}", " ", re.sub(rf"<@!?{me.id}>", " ", message.content))
        return Message(
            text=text.strip(),
            adapter=self.name,
            channel=str(channel.id),
            user=str(message.author.id),
            user_name=message.author.display_name,
            is_direct=is_dm,
            mentions_bot=mentioned,
            id=str(message.id),
            workspace=None if is_dm else str(message.guild.id),
            parent=None if getattr(channel, "parent_id", None) is None else str(channel.parent_id),
            raw=message,
        )

    async def on_message(self, message: discord.Message) -> None:
        msg = self.to_message(message)
        if msg is None or not msg.text:
            return
        try:
            async with message.channel.typing():
                reply = await self.bot.handle(msg)
        except Busy:
            await message.channel.send(BUSY_REPLY, reference=self._reference(message))
            return
        except RateLimited as refused:
            if refused.notice:
                await message.channel.send(refused.notice, reference=self._reference(message))
            return
        if reply is not None:
            await self.deliver(message, reply)

    async def deliver(self, message: discord.Message, reply: Reply) -> None:
        """Send `reply` in chunks that fit; the first one answers `message` in servers."""
        import discord  # late: see the module docstring

        for i, chunk in enumerate(split_message(reply.text, MESSAGE_LIMIT)):
            files = [discord.File(io.BytesIO(f.data), filename=f.name) for f in reply.files] if i == 0 else []
            sent = await message.channel.send(chunk, reference=self._reference(message) if i == 0 else None,
                                              files=files or None)
            await self.bot.record_delivery(reply, str(sent.id))

    @staticmethod
    def _reference(message: discord.Message) -> discord.MessageReference | None:
        # In a DM the reply is obvious; in a server, quote the question (without pinging its author).
        return None if message.guild is None else message.to_reference(fail_if_not_exists=False)

    async def on_reaction(self, payload: discord.RawReactionActionEvent, removed: bool = False) -> None:
        me = self.client.user
        if me is None or payload.user_id == me.id:
            return
        author = getattr(payload, "message_author_id", None)  # sent by Discord since 2024 (discord.py 2.4)
        if author is not None and author != me.id:
            return
        emoji = _EMOJI_MODIFIERS.sub("", payload.emoji.name or "")
        if emoji == RETRY:
            if not removed:
                await self.retry(payload)
            return
        value = FEEDBACK.get(emoji)
        if value is not None and removed:
            await self.bot.withdraw_feedback(self.name, str(payload.message_id), str(payload.user_id), value)
        elif value is not None:
            await self.bot.feedback(self.name, str(payload.message_id), str(payload.user_id), value)

    async def retry(self, payload: discord.RawReactionActionEvent) -> None:
        """🔁 on the last reply of the reacting user's conversation: the core answers again; send it there."""
        channel = self.client.get_partial_messageable(payload.channel_id)
        try:
            reply = await self.bot.retry_reply(self.name, str(payload.message_id), str(payload.user_id))
        except Busy:
            await channel.send(BUSY_REPLY)
            return
        if reply is not None:
            for chunk in split_message(reply.text, MESSAGE_LIMIT):
                sent = await channel.send(chunk)
                await self.bot.record_delivery(reply, str(sent.id))


@hookimpl
def register_adapters(register):
    register("discord", DiscordAdapter)
