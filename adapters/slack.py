"""Slack adapter (slack-bolt, async): Socket Mode or the HTTP Events API.

Thin by design: `app_mention` in channels and `message` in DMs become a
`Message` (a channel mention also arrives as a `message` event: only the
mention is answered). Bolt acknowledges each event before the listener runs,
so Slack gets its ack within 3 s and generation happens after it. Slack
retries unacknowledged events with the same `event_id`, and Socket Mode
deliveries carry a retry header even the first time, so duplicates are
dropped by `event_id`, through the bot (`BotSurface.first_delivery`), so that
an event is answered once across every instance sharing one history.

Replies go in the thread of the message (a thread is its own conversation;
a top-level DM is answered in the DM itself), split to ~4000 characters,
with `&`, `<` and `>` escaped so generated text can never form a mention such
as ``<!channel>``. 👍/👎 reactions on a reply become feedback; removing one withdraws it.
🔁 (``:repeat:``) on one's last reply asks for another answer.

slack-bolt and slack-sdk are imported when the adapter is created, not with
this module: the plugin manager loads every built-in for its config section,
and importing them (~0.15 s) would slow the start of every bot, Slack enabled or not.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import TYPE_CHECKING, Any

from chatcore import hookimpl
from chatcore.adapter import Adapter, AdapterError, BotSurface, require

if TYPE_CHECKING:
    from aiohttp import web
    from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
    from slack_bolt.app.async_app import AsyncApp
    from slack_bolt.authorization import AuthorizeResult

# A missing library makes the adapter unavailable (config check says so), as importing it would.
require("slack_bolt", "slack_sdk")
from chatcore.config import Field
from chatcore.message import BUSY_REPLY, Busy, Message, RateLimited, Reply
from chatcore.text import split_message

log = logging.getLogger("chatcore.slack")

FEEDBACK = {"+1": 1, "thumbsup": 1, "-1": -1, "thumbsdown": -1}
RETRY = "repeat"  # 🔁: answer that again (/retry)
ANSWERED_SUBTYPES = (None, "thread_broadcast", "file_share")


def escape(text: str) -> str:
    """Slack's three control characters: escaped, `<!here>` or `<@U1>` in generated text stays plain text."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class SlackAdapter(Adapter):
    name = "slack"
    config_schema = {
        "mode": Field(str, "socket", choices=("socket", "http"),
                      help="socket: Socket Mode (needs app_token); http: Events API (needs signing_secret)."),
        "bot_token": Field(str, required=True, secret=True, help="Bot User OAuth Token (xoxb-): ${SLACK_BOT_TOKEN}"),
        "app_token": Field(str, None, secret=True, help="App-level token (xapp-) for Socket Mode: ${SLACK_APP_TOKEN}"),
        "signing_secret": Field(str, None, secret=True, help="Signing secret for HTTP mode: ${SLACK_SIGNING_SECRET}"),
        "host": Field(str, "0.0.0.0", help="HTTP mode: address to listen on."),
        "port": Field(int, 3000, help="HTTP mode: port to listen on (0 picks a free one)."),
        "path": Field(str, "/slack/events", help="HTTP mode: the Request URL path set in the Slack app."),
        "max_chars": Field(int, 3900, help="Split replies longer than this (Slack advises ~4000)."),
        "api_url": Field(str, "https://slack.com/api/", help="Slack Web API base URL (GovSlack, tests)."),
    }

    def __init__(self, bot: BotSurface, config: dict[str, Any]) -> None:
        from slack_sdk.web.async_client import AsyncWebClient  # late: see the module docstring

        super().__init__(bot, config)
        self.mode = config.get("mode", "socket")
        self.client = AsyncWebClient(token=config["bot_token"], base_url=config.get("api_url") or "https://slack.com/api/")
        self.app: AsyncApp | None = None
        self.bot_user_id: str | None = None
        self.port: int | None = None  # HTTP mode: the port actually bound
        self.ready = asyncio.Event()
        self._stopped = asyncio.Event()
        self._socket: AsyncSocketModeHandler | None = None
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task] = set()

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        if self.mode == "http" and not self.config.get("signing_secret"):
            raise AdapterError(
                "slack: mode http needs signing_secret (Slack app > Basic Information > Signing Secret, "
                "in SLACK_SIGNING_SECRET); without it every request would be refused. "
                "Use mode: socket with an app_token to run without a public URL.")
        if self.mode == "socket" and not self.config.get("app_token"):
            raise AdapterError(
                "slack: mode socket needs app_token (Slack app > Basic Information > App-Level Tokens, "
                "scope connections:write, in SLACK_APP_TOKEN), or use mode: http with a signing_secret.")
        from slack_bolt.authorization import AuthorizeResult  # late: see the module docstring

        auth = await self._auth_test()
        self.bot_user_id = auth.get("user_id")
        self.app = self._build_app(AuthorizeResult.from_auth_test_response(
            auth_test_response=auth, bot_token=self.config["bot_token"]))
        self._stopped.clear()
        try:
            if self.mode == "socket":
                await self._start_socket_mode()
            else:
                await self._start_http()
            log.info("slack: connected as %s (%s mode)", auth.get("user"), self.mode)
            self.ready.set()
            await self._stopped.wait()
        finally:
            await self._shutdown()

    async def stop(self) -> None:
        self._stopped.set()

    async def _auth_test(self) -> Any:
        from slack_sdk.errors import SlackApiError  # late: see the module docstring

        try:
            return await self.client.auth_test()
        except SlackApiError as exc:
            raise AdapterError(
                f"slack: Slack rejected the bot token ({exc.response.get('error')}). Copy the Bot User OAuth "
                "Token (xoxb-...) from Slack app > OAuth & Permissions into SLACK_BOT_TOKEN.") from None

    async def _start_socket_mode(self) -> None:
        from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler  # late: see the module docstring
        from slack_sdk.errors import SlackApiError

        self._socket = AsyncSocketModeHandler(self.app, self.config["app_token"], web_client=self.client,
                                              logger=logging.getLogger("chatcore.slack.socket"))
        try:
            # Once here, so a bad app token is an error rather than slack-sdk's endless reconnect loop.
            self._socket.client.wss_uri = await self._socket.client.issue_new_wss_url()
        except SlackApiError as exc:
            raise AdapterError(
                f"slack: Slack rejected the app-level token ({exc.response.get('error')}). Create one with the "
                "connections:write scope (Basic Information > App-Level Tokens) and put it in SLACK_APP_TOKEN; "
                "Socket Mode must be enabled for the app.") from None
        await self._socket.connect_async()

    async def _start_http(self) -> None:
        from aiohttp import web  # late: see the module docstring
        from slack_bolt.app.async_server import AsyncSlackAppServer

        server = AsyncSlackAppServer(port=self.config.get("port", 3000), path=self.config.get("path", "/slack/events"),
                                     app=self.app, host=self.config.get("host", "0.0.0.0"))
        self._runner = web.AppRunner(server.web_app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, server.host, server.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        if self._socket is not None:
            await self._socket.close_async()
            self._socket = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _build_app(self, authorized: AuthorizeResult) -> AsyncApp:
        from slack_bolt.app.async_app import AsyncApp  # late: see the module docstring
        from slack_sdk.web.async_client import AsyncWebClient

        async def authorize(**_: Any) -> AuthorizeResult:
            return authorized  # auth.test already ran at start: no call per request

        # Bolt's own client gets its token from `authorize`; given one here too, it warns that it ignores it.
        app = AsyncApp(client=AsyncWebClient(base_url=self.client.base_url), authorize=authorize, signing_secret=self.config.get("signing_secret") or "",
                       request_verification_enabled=self.mode == "http",
                       logger=logging.getLogger("chatcore.slack.bolt"))
        app.event("app_mention")(self._on_app_mention)
        app.event("message")(self._on_message)
        app.event("reaction_added")(self._on_reaction)
        app.event("reaction_removed")(self._on_reaction)
        return app

    # --- events -------------------------------------------------------------------------------

    async def _first_delivery(self, body: dict[str, Any]) -> bool:
        event_id = body.get("event_id")
        if not event_id:
            return True
        # Event ids are Slack's, per app: two apps on one history never collide.
        if await self.bot.first_delivery(f"{self.name}:{body.get('api_app_id') or ''}", event_id):
            return True
        log.debug("slack: dropping duplicate delivery of %s", event_id)
        return False

    def to_message(self, event: dict[str, Any], *, mention: bool,
                   team: str | None = None) -> tuple[Message, str | None] | None:
        """The core's view of a Slack event and the thread to answer in, or None to ignore it."""
        if event.get("bot_id") or event.get("subtype") not in ANSWERED_SUBTYPES:
            return None
        user = event.get("user")
        if not user or user == self.bot_user_id or not event.get("channel") or not event.get("ts"):
            return None
        channel = event["channel"]
        is_dm = event.get("channel_type") == "im" or channel.startswith("D")
        if mention and is_dm:
            return None  # a mention inside a DM also arrives as a DM message: answer that one
        if not mention and not is_dm:
            return None  # channel messages are answered only when they mention the bot (app_mention)
        thread = event.get("thread_ts") or (None if is_dm else event["ts"])
        text = event.get("text") or ""
        if self.bot_user_id:
            text = re.sub(rf"<@{self.bot_user_id}(\|[^>]*)?>", " ", text)
        message = Message(
            text=re.sub(r"[ \t]{2,}", " ", text).strip(),
            adapter=self.name,
            channel=f"{channel}/{thread}" if thread else channel,
            user=user,
            is_direct=is_dm,
            mentions_bot=mention,
            id=f"{channel}:{event['ts']}",
            workspace=event.get("team") or team,
            parent=channel if thread else None,
            raw=event,
        )
        return message, thread

    async def _on_app_mention(self, body: dict[str, Any], event: dict[str, Any]) -> None:
        await self._answer(body, event, mention=True)

    async def _on_message(self, body: dict[str, Any], event: dict[str, Any]) -> None:
        await self._answer(body, event, mention=False)

    async def _answer(self, body: dict[str, Any], event: dict[str, Any], *, mention: bool) -> None:
        # Bolt has already acked: this runs after Slack got its answer.
        translated = self.to_message(event, mention=mention, team=body.get("team_id"))
        if translated is None or not await self._first_delivery(body):
            return
        message, thread = translated
        if not message.text:
            return
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            try:
                reply = await self.bot.handle(message)
            except Busy:
                await self._post(event["channel"], thread, BUSY_REPLY)
                return
            except RateLimited as refused:
                if refused.notice:
                    await self._post(event["channel"], thread, refused.notice)
                return
            if reply is not None:
                await self.deliver(event["channel"], thread, reply)
        finally:
            if task is not None:
                self._tasks.discard(task)

    async def deliver(self, channel: str, thread: str | None, reply: Reply) -> None:
        for chunk in split_message(reply.text, self.config.get("max_chars", 3900)):
            posted = await self._post(channel, thread, chunk)
            await self.bot.record_delivery(reply, f"{posted['channel']}:{posted['ts']}")
        for f in reply.files:
            await self.client.files_upload_v2(channel=channel, thread_ts=thread, filename=f.name, content=f.data,
                                              title=f.name)

    async def _post(self, channel: str, thread: str | None, text: str) -> Any:
        return await self.client.chat_postMessage(channel=channel, thread_ts=thread, text=escape(text),
                                                  unfurl_links=False, unfurl_media=False)

    async def _on_reaction(self, body: dict[str, Any], event: dict[str, Any]) -> None:
        item = event.get("item") or {}
        if item.get("type") != "message" or not item.get("channel") or not item.get("ts") \
                or not event.get("user") or event.get("user") == self.bot_user_id:
            return
        if event.get("item_user") and event["item_user"] != self.bot_user_id:
            return
        name = (event.get("reaction") or "").split("::", 1)[0]
        if name == RETRY and event.get("type") == "reaction_added" and await self._first_delivery(body):
            await self._retry(item["channel"], item["ts"], event["user"])
            return
        value = FEEDBACK.get(name)
        if value is None or not await self._first_delivery(body):
            return
        if event.get("type") == "reaction_removed":
            await self.bot.withdraw_feedback(self.name, f"{item['channel']}:{item['ts']}", event["user"], value)
        else:
            await self.bot.feedback(self.name, f"{item['channel']}:{item['ts']}", event["user"], value)

    async def _retry(self, channel: str, ts: str, user: str) -> None:
        """🔁 on the last reply of the reacting user's conversation: the core answers again, in the same thread."""
        try:
            reply = await self.bot.retry_reply(self.name, f"{channel}:{ts}", user)
        except Busy:
            reply = None
            await self._post(channel, None, BUSY_REPLY)
        if reply is not None:
            # The conversation's channel is "C…/thread_ts" for a thread, the bare channel for a DM.
            _, _, thread = reply.message.channel.partition("/")
            await self.deliver(channel, thread or None, reply)


@hookimpl
def register_adapters(register):
    register("slack", SlackAdapter)
