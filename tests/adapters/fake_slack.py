"""A small fake Slack on loopback: the Web API, a Socket Mode websocket, and a signing client.

The real slack-bolt `AsyncApp` and slack-sdk clients talk to it: their Web API
calls (`auth.test`, `chat.postMessage`, `apps.connections.open`) go to
`api_url` and are recorded; `apps.connections.open` hands out this server's
own websocket, over which tests push Socket Mode envelopes and see the acks.
For the HTTP Events API, `post_signed` sends properly signed requests.

What it does not emulate: rate limits, scopes and channel membership, most
Web API methods (anything else answers ok=false, unknown_method, and is
recorded in `unhandled`), Slack's own retry timing, interactivity, slash
commands, and the text length limits.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web


@dataclass
class Call:
    method: str
    params: dict[str, Any]
    token: str | None


class FakeSlack:
    def __init__(self) -> None:
        self.bot_token = "xoxb-test-token"
        self.app_token = "xapp-test-token"
        self.signing_secret = "test-signing-secret"
        self.team_id, self.app_id = "T0000001", "A0000001"
        self.bot_user_id, self.bot_id = "UBOT00001", "BBOT00001"
        self.calls: list[Call] = []
        self.unhandled: list[Call] = []
        self.acks: dict[str, float] = {}  # envelope id -> when the app acked it
        self.files: dict[str, dict[str, Any]] = {}  # file id -> filename, data, channel, thread_ts (files_upload_v2)
        self.socket_connected = asyncio.Event()
        self._ws: web.WebSocketResponse | None = None
        self._ts = itertools.count(1)
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> "FakeSlack":
        app = web.Application()
        app.router.add_post("/api/{method}", self._api)
        app.router.add_get("/socket", self._socket)
        app.router.add_post("/upload/{file_id}", self._upload)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        return self

    @property
    def api_url(self) -> str:
        return self.url + "/api/"

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    # --- building events -----------------------------------------------------------------

    def ts(self) -> str:
        return f"1700000000.{next(self._ts):06d}"

    def event_body(self, event: dict[str, Any], event_id: str | None = None) -> dict[str, Any]:
        return {
            "token": "legacy-verification-token", "team_id": self.team_id, "api_app_id": self.app_id,
            "event": event, "type": "event_callback", "event_id": event_id or f"Ev{next(self._ids):08d}",
            "event_time": int(time.time()),
            "authorizations": [{"team_id": self.team_id, "user_id": self.bot_user_id, "is_bot": True}],
        }

    def mention(self, text: str, user: str, *, channel: str = "C0000001", thread_ts: str | None = None,
                **extra: Any) -> dict[str, Any]:
        event = {"type": "app_mention", "user": user, "text": f"<@{self.bot_user_id}> {text}", "ts": self.ts(),
                 "channel": channel, "event_ts": "", **extra}
        if thread_ts:
            event["thread_ts"] = thread_ts
        return event

    def message(self, text: str, user: str | None, *, channel: str = "D0000001", channel_type: str = "im",
                **extra: Any) -> dict[str, Any]:
        event = {"type": "message", "text": text, "ts": self.ts(), "channel": channel,
                 "channel_type": channel_type, "event_ts": "", **extra}
        if user is not None:
            event["user"] = user
        return event

    def reaction(self, name: str, user: str, channel: str, ts: str, item_user: str | None = None) -> dict[str, Any]:
        return {"type": "reaction_added", "user": user, "reaction": name, "item_user": item_user or self.bot_user_id,
                "item": {"type": "message", "channel": channel, "ts": ts}, "event_ts": self.ts()}

    # --- delivering events -----------------------------------------------------------------

    async def push(self, body: dict[str, Any], *, retry_attempt: int = 0) -> str:
        """Deliver an Events API body over Socket Mode; returns the envelope id."""
        assert self._ws is not None, "no Socket Mode client is connected"
        envelope_id = f"env-{next(self._ids)}"
        await self._ws.send_str(json.dumps({
            "envelope_id": envelope_id, "type": "events_api", "accepts_response_payload": False,
            "retry_attempt": retry_attempt, "retry_reason": "timeout" if retry_attempt else "", "payload": body,
        }))
        return envelope_id

    def sign(self, body: bytes, timestamp: int | None = None, secret: str | None = None) -> dict[str, str]:
        timestamp = int(time.time()) if timestamp is None else timestamp
        base = b"v0:" + str(timestamp).encode() + b":" + body
        digest = hmac.new((secret or self.signing_secret).encode(), base, hashlib.sha256).hexdigest()
        return {"X-Slack-Request-Timestamp": str(timestamp), "X-Slack-Signature": f"v0={digest}",
                "Content-Type": "application/json"}

    async def post_signed(self, url: str, body: dict[str, Any], *, retry_num: int | None = None,
                          secret: str | None = None, timestamp: int | None = None) -> tuple[int, str]:
        """POST an Events API body to an app's HTTP endpoint, signed like Slack does."""
        raw = json.dumps(body).encode()
        headers = self.sign(raw, timestamp, secret)
        if retry_num is not None:
            headers.update({"X-Slack-Retry-Num": str(retry_num), "X-Slack-Retry-Reason": "http_timeout"})
        async with aiohttp.ClientSession() as session:
            async with session.post(url, data=raw, headers=headers) as response:
                return response.status, await response.text()

    # --- what the app sent -------------------------------------------------------------------

    def posts(self) -> list[dict[str, Any]]:
        return [c.params for c in self.calls if c.method == "chat.postMessage"]

    async def wait_posts(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        async def poll() -> None:
            while len(self.posts()) < count:
                await asyncio.sleep(0.01)
        await asyncio.wait_for(poll(), timeout)
        return self.posts()

    async def wait_ack(self, envelope_id: str, timeout: float = 5.0) -> float:
        async def poll() -> None:
            while envelope_id not in self.acks:
                await asyncio.sleep(0.005)
        await asyncio.wait_for(poll(), timeout)
        return self.acks[envelope_id]

    # --- server side ------------------------------------------------------------------------------

    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        if request.content_type == "application/json":
            params = await request.json()
        else:
            params = dict(await request.post())
        params.update(request.query)
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ") or params.get("token")
        call = Call(method, params, token)
        self.calls.append(call)
        if method == "apps.connections.open":
            if token != self.app_token:
                return web.json_response({"ok": False, "error": "invalid_auth"})
            return web.json_response({"ok": True, "url": self.url.replace("http", "ws", 1) + "/socket"})
        if token != self.bot_token:
            return web.json_response({"ok": False, "error": "invalid_auth"})
        if method == "auth.test":
            return web.json_response({
                "ok": True, "url": "https://fake.slack.test/", "team": "Fake", "user": "chatbot",
                "team_id": self.team_id, "user_id": self.bot_user_id, "bot_id": self.bot_id,
                "is_enterprise_install": False})
        if method == "chat.postMessage":
            ts = self.ts()
            params["response_ts"] = ts
            return web.json_response({"ok": True, "channel": params["channel"], "ts": ts, "message": {
                "type": "message", "text": params.get("text", ""), "user": self.bot_user_id,
                "bot_id": self.bot_id, "ts": ts}})
        if method == "files.getUploadURLExternal":  # files_upload_v2, step 1 of 3
            file_id = f"F{next(self._ids):08d}"
            self.files[file_id] = {"filename": params.get("filename"), "data": None}
            return web.json_response({"ok": True, "upload_url": f"{self.url}/upload/{file_id}", "file_id": file_id})
        if method == "files.completeUploadExternal":  # step 3: share the uploaded files in a channel
            listed = params.get("files")
            listed = json.loads(listed) if isinstance(listed, str) else listed
            for f in listed:
                self.files[f["id"]].update(channel=params.get("channel_id"), thread_ts=params.get("thread_ts"))
            return web.json_response({"ok": True, "files": [{"id": f["id"], "title": f.get("title")} for f in listed]})
        self.unhandled.append(call)
        return web.json_response({"ok": False, "error": "unknown_method"})

    async def _upload(self, request: web.Request) -> web.Response:
        """Step 2 of files_upload_v2: the bytes, posted to the URL step 1 issued."""
        self.files[request.match_info["file_id"]]["data"] = await request.read()
        return web.Response(text="OK - 1")

    async def _socket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        self._ws = ws
        await ws.send_str(json.dumps({"type": "hello", "num_connections": 1,
                                      "debug_info": {"host": "fake", "approximate_connection_time": 3600},
                                      "connection_info": {"app_id": self.app_id}}))
        self.socket_connected.set()
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                data = json.loads(msg.data)
                if "envelope_id" in data:
                    self.acks[data["envelope_id"]] = time.monotonic()
        return ws
