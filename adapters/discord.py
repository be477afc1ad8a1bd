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
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
from typing import Any

import discord

from chatcore import hookimpl
from chatcore.adapter import Adapter, AdapterError, BotSurface
from chatcore.config import Field
from chatcore.message import BUSY_REPLY, Busy, Message, RateLimited, Reply
from chatcore.text import split_message

log = logging.getLogger("chatcore.discord")

MESSAGE_LIMIT = 2000
# Reactions that rate a reply; skin tones and the emoji variation selector are ignored.
FEEDBACK = {"\N{THUMBS UP SIGN}": 1, "\N{THUMBS DOWN SIGN}": -1}
RETRY = "\N{CLOCKWISE RIGHTWARDS AND LEFTWARDS OPEN CIRCLE ARROWS}"  # 🔁: answer that again (/retry)
_EMOJI_MODIFIERS = re.compile("[\U0001F3FB-\U0001F3FF\uFE0F]")
_ANSWERED_TYPES = (discord.MessageType.default, discord.MessageType.reply)


class _Client(discord.Client):
    def __init__(self, adapter: "DiscordAdapter", **options: Any) -> None:
        super().__init__(**options)
        self.adapter = adapter

    async def on_ready(self) -> None:
        log.info("discord: logged in as %s (%s) in %d servers", self.user, self.user.id, len(self.guilds))
        self.adapter.ready.set()

    async def on_message(self, message: discord.Message) -> None:
        await self.adapter.on_message(message)

    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        await self.adapter.on_reaction(payload)

    async def on_raw_reaction_remove(self, payload: discord.RawReactionActionEvent) -> None:
        await self.adapter.on_reaction(payload, removed=True)


class DiscordAdapter(Adapter):
    name = "discord"
    config_schema = {
        "token": Field(str, required=True, secret=True, help="Bot token: token: ${DISCORD_TOKEN}"),
        "channels": Field(list, [], help="Channel ids where every message is answered, not only mentions "
                                         "(needs the Message Content intent)."),
        "answer_dms": Field(bool, True, help="Answer direct messages."),
    }
    guild_ready_timeout: float = 2.0  # discord.py's wait for guilds before on_ready; tests lower it

    def __init__(self, bot: BotSurface, config: dict[str, Any]) -> None:
        super().__init__(bot, config)
        self.channels = {int(c) for c in config.get("channels") or []}
        intents = discord.Intents.default()
        intents.message_content = bool(self.channels)
        self.client = _Client(self, intents=intents, allowed_mentions=discord.AllowedMentions.none(),
                              guild_ready_timeout=self.guild_ready_timeout)
        self.ready = asyncio.Event()

    async def start(self) -> None:
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
        if me is None or message.author.bot or message.author.id == me.id or message.type not in _ANSWERED_TYPES:
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
