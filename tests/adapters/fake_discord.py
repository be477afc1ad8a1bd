"""A small fake Discord on loopback: REST API (/api/v10) and gateway websocket.

The real `discord.Client` talks to it through its own HTTP and gateway code:
point `discord.http.Route.BASE` and `DiscordWebSocket.DEFAULT_GATEWAY` at it
(`install`). It answers HELLO/IDENTIFY/heartbeats, sends READY and one
GUILD_CREATE, lets a test dispatch gateway events, and records every REST call.
Several connections may identify as shards (``[shard_id, shard_count]``): each
gets READY, the guild goes to the shard Discord would give it
(``(guild_id >> 22) % shard_count``), and so do its events; DMs go to shard 0.

What it does not emulate: permissions, rate limits (no 429s), resume after a
dropped connection, zlib/zstd transport compression (it sends text frames,
which discord.py accepts), the identify rate limit, slash commands, attachments and embeds.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import discord
import yarl
from aiohttp import WSMsgType, web

MESSAGE_CONTENT = 1 << 15
SNOWFLAKE = 10**17
PRIVILEGED = MESSAGE_CONTENT | (1 << 1) | (1 << 8)  # message content, members, presences


def _json(data: Any, status: int = 200) -> web.Response:
    # discord.py decodes JSON only for exactly "application/json": json_response adds a charset.
    return web.Response(body=json.dumps(data).encode(), status=status, headers={"Content-Type": "application/json"})


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def user(id: int, name: str, *, bot: bool = False) -> dict[str, Any]:
    """A Discord user object; small ids are made snowflake-sized."""
    id = id if id >= SNOWFLAKE else SNOWFLAKE + id
    return {"id": str(id), "username": name, "discriminator": "0", "global_name": name.title(),
            "avatar": None, "bot": bot}


@dataclass
class Call:
    method: str
    path: str
    json: Any
    headers: dict[str, str] = field(repr=False, default_factory=dict)


class FakeDiscord:
    def __init__(self, token: str = "test-token", *, allow_privileged: bool = True) -> None:
        self.token = token
        self.allow_privileged = allow_privileged
        self._ids = itertools.count(9_000_000_000_000_000)
        # Real snowflakes have 17-20 digits; discord.py's mention parsing relies on it.
        self.bot_user = user(SNOWFLAKE + 1000, "chatbot", bot=True)
        self.guild_id = SNOWFLAKE + 2000
        self.channel_id = SNOWFLAKE + 2001  # a text channel in the guild
        self.other_channel_id = SNOWFLAKE + 2002
        self.thread_id = SNOWFLAKE + 2003  # a public thread under channel_id
        self.dm_channel_id = SNOWFLAKE + 3001
        self.calls: list[Call] = []
        self.unhandled: list[Call] = []
        self.identify: dict[str, Any] | None = None  # the latest IDENTIFY payload
        self.identifies: list[dict[str, Any]] = []  # every one, in order
        self.shards: dict[int, web.WebSocketResponse] = {}  # shard id -> the connection that identified as it
        self.shard_count = 1
        self.heartbeats = 0
        self.ready = asyncio.Event()  # READY was sent
        self._ws: web.WebSocketResponse | None = None
        self._seq = 0
        self._runner: web.AppRunner | None = None
        self.url = ""

    # --- lifecycle ------------------------------------------------------------------

    async def start(self) -> "FakeDiscord":
        app = web.Application()
        app.router.add_get("/gateway", self._gateway)
        app.router.add_route("*", "/api/v10/{tail:.*}", self._rest)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def install(self, monkeypatch) -> None:
        monkeypatch.setattr(discord.http.Route, "BASE", f"{self.url}/api/v10")
        monkeypatch.setattr(discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY",
                            yarl.URL(self.url.replace("http", "ws", 1) + "/gateway"))

    async def close(self) -> None:
        for ws in {*self.shards.values(), self._ws} - {None}:
            await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    # --- what tests call ------------------------------------------------------------

    def next_id(self) -> int:
        return next(self._ids)

    def shard_of(self, guild_id: int | str | None) -> int:
        """The shard Discord sends a guild's events to (DMs: shard 0)."""
        return 0 if guild_id is None else (int(guild_id) >> 22) % self.shard_count

    async def dispatch(self, event: str, data: dict[str, Any], ws: web.WebSocketResponse | None = None) -> None:
        ws = ws or self.shards.get(self.shard_of(data.get("guild_id")))
        assert ws is not None, "no client connected to the fake gateway runs the shard of this event"
        self._seq += 1
        await ws.send_str(json.dumps({"op": 0, "t": event, "s": self._seq, "d": data}))

    def message_payload(self, content: str, *, author: dict[str, Any], channel_id: int | None = None,
                        dm: bool = False, mentions: list[dict[str, Any]] = (), type: int = 0) -> dict[str, Any]:
        data = {
            "id": str(self.next_id()), "channel_id": str(channel_id or (self.dm_channel_id if dm else self.channel_id)),
            "author": author, "content": content, "timestamp": _now(), "edited_timestamp": None,
            "tts": False, "mention_everyone": False, "mentions": list(mentions), "mention_roles": [],
            "attachments": [], "embeds": [], "pinned": False, "type": type, "flags": 0,
        }
        if not dm:
            data["guild_id"] = str(self.guild_id)
            data["member"] = {"roles": [], "joined_at": _now(), "deaf": False, "mute": False, "flags": 0}
        return data

    async def send_message(self, content: str, **kwargs: Any) -> dict[str, Any]:
        data = self.message_payload(content, **kwargs)
        await self.dispatch("MESSAGE_CREATE", data)
        return data

    async def react(self, message_id: str, emoji: str, user_id: int, *, channel_id: int | None = None,
                    message_author_id: str | None = None) -> None:
        data = {"user_id": str(user_id), "channel_id": str(channel_id or self.channel_id),
                "message_id": str(message_id), "guild_id": str(self.guild_id),
                "emoji": {"id": None, "name": emoji}, "burst": False, "type": 0}
        if message_author_id is not None:
            data["message_author_id"] = message_author_id
        await self.dispatch("MESSAGE_REACTION_ADD", data)

    def sent(self, channel_id: int | None = None) -> list[dict[str, Any]]:
        """JSON bodies of the messages the bot posted (optionally in one channel), oldest first."""
        return [c.json for c in self.calls if c.method == "POST" and c.path.endswith("/messages")
                and (channel_id is None or c.path == f"/channels/{channel_id}/messages")]

    def typing(self, channel_id: int) -> int:
        return sum(c.method == "POST" and c.path == f"/channels/{channel_id}/typing" for c in self.calls)

    async def wait_sent(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        async def poll() -> None:
            while len(self.sent()) < count:
                await asyncio.sleep(0.01)
        await asyncio.wait_for(poll(), timeout)
        return self.sent()

    # --- REST -------------------------------------------------------------------------

    async def _rest(self, request: web.Request) -> web.Response:
        path = "/" + request.match_info["tail"]
        if request.content_type == "multipart/form-data":  # a message with attachments
            form = await request.post()
            payload = json.loads(form.get("payload_json") or "{}")
            payload["uploaded"] = [{"filename": v.filename, "data": v.file.read()}
                                   for v in form.values() if hasattr(v, "filename")]
            call = Call(request.method, path, payload, dict(request.headers))
        else:
            body = await request.read()
            call = Call(request.method, path, json.loads(body) if body else None, dict(request.headers))
        self.calls.append(call)
        if request.headers.get("Authorization") != f"Bot {self.token}":
            return _json({"message": "401: Unauthorized", "code": 0}, status=401)
        if request.method == "GET" and path == "/users/@me":
            return _json(self.bot_user)
        if request.method == "GET" and path == "/oauth2/applications/@me":
            return _json({"id": self.bot_user["id"], "name": "chatbot", "description": "", "icon": None,
                          "rpc_origins": [], "bot_public": True, "bot_require_code_grant": False,
                          "owner": user(1, "owner"), "summary": "", "verify_key": "00", "team": None, "flags": 0})
        if request.method == "POST" and path.endswith("/typing"):
            return web.Response(status=204)
        if request.method == "POST" and path.startswith("/channels/") and path.endswith("/messages"):
            channel_id = path.split("/")[2]
            payload = call.json or {}
            sent = {
                "id": str(self.next_id()), "channel_id": channel_id, "author": self.bot_user,
                "content": payload.get("content", ""), "timestamp": _now(), "edited_timestamp": None,
                "tts": False, "mention_everyone": False, "mentions": [], "mention_roles": [],
                "attachments": [], "embeds": [], "pinned": False, "flags": 0,
                "type": 19 if payload.get("message_reference") else 0,
            }
            if int(channel_id) != self.dm_channel_id:
                sent["guild_id"] = str(self.guild_id)
            call.json = {**payload, "response": sent}
            return _json(sent)
        self.unhandled.append(call)
        return _json({"message": f"fake Discord does not emulate {request.method} {path}", "code": 0}, status=404)

    # --- gateway ---------------------------------------------------------------------

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self._ws = ws
        await ws.send_str(json.dumps({"op": 10, "d": {"heartbeat_interval": 41250}}))
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            payload = json.loads(msg.data)
            op = payload.get("op")
            if op == 1:  # heartbeat
                self.heartbeats += 1
                await ws.send_str(json.dumps({"op": 11}))
            elif op == 2:  # identify
                self.identify = payload["d"]
                self.identifies.append(self.identify)
                if self.identify.get("token") != self.token:
                    await ws.close(code=4004, message=b"Authentication failed.")
                elif self.identify.get("intents", 0) & PRIVILEGED and not self.allow_privileged:
                    await ws.close(code=4014, message=b"Disallowed intent(s).")
                else:
                    shard_id, self.shard_count = self.identify.get("shard") or (0, 1)
                    self.shards[shard_id] = ws
                    await self._ready(ws, shard_id)
        return ws

    async def _ready(self, ws: web.WebSocketResponse, shard_id: int = 0) -> None:
        gateway_url = self.url.replace("http", "ws", 1) + "/gateway"
        ours = self.shard_of(self.guild_id) == shard_id
        await self.dispatch("READY", {
            "v": 10, "user": self.bot_user, "guilds": [{"id": str(self.guild_id), "unavailable": True}] if ours else [],
            "session_id": f"fake-session-{shard_id}", "resume_gateway_url": gateway_url,
            "shard": [shard_id, self.shard_count],
            "application": {"id": "1000", "flags": 0}, "private_channels": [], "relationships": [],
        }, ws)
        if not ours:
            self.ready.set()
            return
        channel = lambda id, name: {"id": str(id), "type": 0, "name": name, "position": 0,  # noqa: E731
                                    "guild_id": str(self.guild_id), "permission_overwrites": [], "nsfw": False}
        await self.dispatch("GUILD_CREATE", {
            "id": str(self.guild_id), "name": "Test Server", "owner_id": "1", "unavailable": False,
            "member_count": 3, "large": False, "features": [], "emojis": [], "stickers": [],
            "roles": [{"id": str(self.guild_id), "name": "@everyone", "permissions": "1071698660929",
                       "position": 0, "color": 0, "hoist": False, "managed": False, "mentionable": False}],
            "channels": [channel(self.channel_id, "general"), channel(self.other_channel_id, "random")],
            "threads": [{"id": str(self.thread_id), "guild_id": str(self.guild_id), "parent_id": str(self.channel_id),
                         "owner_id": "1", "name": "a thread", "type": 11, "message_count": 0, "member_count": 1,
                         "rate_limit_per_user": 0, "thread_metadata": {
                             "archived": False, "auto_archive_duration": 60, "archive_timestamp": _now(),
                             "locked": False}}],
            "members": [{"user": self.bot_user, "roles": [], "joined_at": _now(), "deaf": False, "mute": False,
                         "flags": 0}],
            "voice_states": [], "presences": [], "stage_instances": [], "guild_scheduled_events": [],
        }, ws)
        self.ready.set()
