"""HTTP adapter (aiohttp): the seed's /chat plus an OpenAI-compatible API.

Endpoints:

- ``POST /chat``: ``{"message": "...", "user": "...", "conversation": "..."}`` -> ``{"response": "..."}``
- ``POST /v1/chat/completions``: OpenAI chat completions, plain JSON or SSE (``"stream": true``)
- ``GET /v1/models``: the one model this bot serves (``max_model_len``: its context, in tokens)
- ``POST /v1/completions``: OpenAI's legacy completions on a raw prompt, for chatcore front ends
  (``model.remote``, chatcore/remote.py) only: needs ``api_key`` (403 without one), no history, no hooks
- ``POST /feedback``: ``{"id": "<chatcmpl id>", "value": 1 | -1, "user": "..."}`` rates a reply
- ``GET /health``: liveness and the serving model (never needs the API key)

The bot keeps its own conversation history, so of the OpenAI ``messages`` only
the last ``user`` message is used. Which conversation it continues:
``http:<conversation>:<user>``, where ``user`` is the request's ``user`` field
(OpenAI's end-user id) and ``conversation`` the ``X-Chatcore-Conversation``
header (or, for /chat, the ``conversation`` field), ``default`` when absent.
A request without a user is a one-off (see below), whatever its conversation.

Sampler settings from the request (temperature, top_p, max_tokens, stop, seed)
apply to that request only; ``max_tokens`` may not exceed the configured
``max_tokens`` limit. With ``api_key`` set, every endpoint but /health needs
``Authorization: Bearer <key>``. A full model queue answers 503 and the rate
limit 429, both with Retry-After, which OpenAI clients retry. Every malformed
request is a 400 naming the field (OpenAI's error shape), never a 500.

Who is asking: with ``api_key`` the request is authenticated and its ``user``
is trusted as the key holder's end user. Without one (the default) ``user`` is
self-declared: the message is marked unauthenticated (``Message.authenticated``,
untrusted for training) and rate limits count by client address, so rotating
``user`` buys nothing (behind a reverse proxy, list it in ``trusted_proxies`` so
the address is the client's, read from X-Forwarded-For, not the proxy's). A request without ``user`` is anonymous: a one-off
identity that shares nothing with anyone, and commands about "my data"
(/forget, /reset, ...) are refused for it.

Browsers: the bot listens on 127.0.0.1 by default, where any web page the
operator opens could reach it. So POSTs must be ``application/json`` (a
cross-site form or ``text/plain`` POST is refused with 415), ``Host`` must name
this server (loopback names, the bound host, or ``allowed_hosts``: defeats DNS
rebinding), and a browser's ``Origin``, when sent, must be this server or one
of ``allowed_origins`` (403 otherwise).

aiohttp's server is imported when the adapter starts, not with this module: the
plugin manager loads every built-in for its config section, and importing
aiohttp.web (~0.2 s) would slow the start of every bot, HTTP enabled or not.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hmac
import json
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from chatcore import hookimpl
from chatcore.adapter import Adapter, BotSurface, client_address, trusted_networks
from chatcore.config import Field
from chatcore.message import Busy, Message, RateLimited
from chatcore.params import SEED_MAX, SEED_MIN, SamplingParams, validate

if TYPE_CHECKING:
    from aiohttp import web

log = logging.getLogger("chatcore.http")

CONVERSATION_HEADER = "X-Chatcore-Conversation"
RETRY_AFTER_S = 1
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
ANY_ADDRESS = ("", "0.0.0.0", "::")
ROLES = ("system", "developer", "user", "assistant", "tool", "function")


class ApiError(Exception):
    """An error answered as OpenAI's ``{"error": {...}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", *,
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.type, self.param, self.code, self.headers = status, type, param, code, headers

    def response(self) -> web.Response:
        body = {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}
        return _json_response(body, status=self.status, headers=self.headers)


class HttpAdapter(Adapter):
    name = "http"
    config_schema = {
        "host": Field(str, "127.0.0.1", help="Address to listen on (0.0.0.0: every interface; set api_key)."),
        "port": Field(int, 8080, help="Port to listen on (0 picks a free one)."),
        "api_key": Field(str, None, secret=True,
                         help="Bearer key every request but /health must carry: ${CHATCORE_API_KEY}. Empty: none."),
        "max_request_bytes": Field(int, 64 * 1024, help="Larger request bodies are refused (413)."),
        "max_tokens": Field(int, 512, help="The most new tokens one request may ask for (at most half the "
                                           "model's context, so the prompt keeps room)."),
        "model_name": Field(str, None, help="Model id shown by /v1/models (default: the serving model's id)."),
        "allowed_hosts": Field(list, [], help="Host names clients may use besides loopback and `host` (behind a "
                                              "proxy or on 0.0.0.0 with a DNS name); others are refused (403)."),
        "allowed_origins": Field(list, [], help="Web origins (https://app.example) whose pages may call the bot "
                                                "from a browser; other cross-site requests are refused (403)."),
        "trusted_proxies": Field(list, [], help="Addresses or networks of your reverse proxies (e.g. 127.0.0.1, "
                                                "10.0.0.0/8): behind them the client is read from X-Forwarded-For, "
                                                "so each client gets its own rate limit."),
    }

    @classmethod
    def check_config(cls, config: dict[str, Any]) -> None:
        trusted_networks(config.get("trusted_proxies") or [], "adapters.http.trusted_proxies")

    def __init__(self, bot: BotSurface, config: dict[str, Any]) -> None:
        super().__init__(bot, config)
        self.api_key = config.get("api_key") or None
        self.max_tokens_limit = int(config.get("max_tokens", 512))
        host = str(config.get("host", "127.0.0.1")).lower()
        allowed = [str(h).lower() for h in config.get("allowed_hosts") or []]
        # bound to every interface with no names given: the names clients use cannot be known
        self.allowed_hosts: set[str] | None = (None if host in ANY_ADDRESS and not allowed
                                               else {*LOOPBACK_HOSTS, host, *allowed})
        self.allowed_origins = {str(o).lower().rstrip("/") for o in config.get("allowed_origins") or []}
        self.trusted_proxies = trusted_networks(config.get("trusted_proxies") or [], "adapters.http.trusted_proxies")
        self.port: int | None = None  # the port actually bound
        self.ready = asyncio.Event()
        self._stopped = asyncio.Event()
        self._runner: web.AppRunner | None = None

    # --- lifecycle ------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        from aiohttp import web  # late: see the module docstring

        # aiohttp's mark of a middleware (web.middleware) is an attribute, which a bound method cannot take.
        middlewares = [web.middleware(functools.partial(m)) for m in (self._errors, self._browsers, self._auth)]
        app = web.Application(client_max_size=int(self.config.get("max_request_bytes", 64 * 1024)),
                              middlewares=middlewares)
        app.router.add_get("/health", self.health)
        app.router.add_post("/chat", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/feedback", self.feedback)
        return app

    async def start(self) -> None:
        from aiohttp import web  # late: see the module docstring

        host = self.config.get("host", "127.0.0.1")
        if not self.api_key and host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("http: listening on %s without api_key: anyone who can reach it can use the bot", host)
        self._runner = web.AppRunner(self.make_app(), access_log=None, shutdown_timeout=5.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, int(self.config.get("port", 8080)))
        try:
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]
            log.info("http: listening on http://%s:%s", host, self.port)
            self.ready.set()
            await self._stopped.wait()
        finally:
            await self._runner.cleanup()

    async def stop(self) -> None:
        self._stopped.set()

    # --- middlewares ---------------------------------------------------------------------

    async def _errors(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        from aiohttp import web  # late: see the module docstring

        try:
            return await handler(request)
        except ApiError as exc:
            return exc.response()
        except web.HTTPRequestEntityTooLarge:
            return ApiError(413, f"request body is larger than {request.app._client_max_size} bytes",
                            code="request_too_large").response()
        except web.HTTPException as exc:  # 404, 405, ...: the same JSON error shape as everything else
            if exc.status < 400:
                raise
            return ApiError(exc.status, exc.reason, "invalid_request_error").response()
        except Busy as exc:
            return ApiError(503, f"the model is busy: {exc}", "server_overloaded", code="busy",
                            headers={"Retry-After": str(RETRY_AFTER_S)}).response()
        except RateLimited as exc:
            return ApiError(429, exc.notice or "too many requests; slow down", "rate_limit_error",
                            code="rate_limit_exceeded",
                            headers={"Retry-After": str(max(1, math.ceil(exc.retry_after)))}).response()
        except (ConnectionResetError, asyncio.CancelledError):
            raise  # the client went away: nothing to answer
        except Exception:
            log.exception("http: %s %s failed", request.method, request.path)
            return ApiError(500, "internal error", "server_error").response()

    async def _browsers(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        """Refuse what only a hostile web page would send: a foreign Host, a foreign Origin, a non-JSON POST."""
        host = _host_name(request.host)
        if self.allowed_hosts is not None and host not in self.allowed_hosts:
            raise ApiError(403, f"Host {request.host!r} is not this server (add it to allowed_hosts)",
                           "permission_error", code="host_not_allowed")
        origin = request.headers.get("Origin")
        if origin is not None:
            origin = origin.lower().rstrip("/")
            same = urlsplit(origin).netloc == (request.host or "").lower()
            if not same and origin not in self.allowed_origins:
                raise ApiError(403, f"Origin {origin!r} may not call this server (add it to allowed_origins)",
                               "permission_error", code="origin_not_allowed")
        if request.method == "POST" and request.content_type != "application/json":
            raise ApiError(415, "the request body must be JSON (Content-Type: application/json)",
                           code="unsupported_media_type")
        return await handler(request)

    async def _auth(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        if self.api_key and request.path != "/health":
            given = request.headers.get("Authorization", "")
            scheme, _, key = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
                raise ApiError(401, "missing or invalid API key (Authorization: Bearer <key>)",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    # --- endpoints ---------------------------------------------------------------------

    @property
    def model_id(self) -> str:
        return self.config.get("model_name") or self.bot.public_model_id

    async def health(self, request: web.Request) -> web.Response:
        health = self.bot.health()
        if health["status"] != "ok":
            return _json_response(health, status=503)
        return _json_response({**health, "model": self.model_id})

    async def models(self, request: web.Request) -> web.Response:
        return _json_response({"object": "list", "data": [
            {"id": self.model_id, "object": "model", "created": 0, "owned_by": self.bot.name,
             "max_model_len": self.bot.engine.block_size}]})

    async def chat(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        text = body.get("message")
        if not isinstance(text, str) or not text.strip():
            raise ApiError(400, '"message" must be a non-empty string', param="message")
        conversation = _conversation(request) or _optional_str(body, "conversation")
        message = self._message(request, text, _optional_str(body, "user"), conversation)
        reply = await self.bot.handle(message)
        body = {"response": reply.text if reply else ""}
        if reply is not None and reply.files:  # /mydata: the file's JSON, inline
            body["files"] = [{"name": f.name, "content": _file_content(f)} for f in reply.files]
        return _json_response(body)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await _json_object(request)
        text = _last_user_message(body.get("messages"))
        params = self._params(body)
        n = body.get("n", 1)
        if n is not None and (not _is_int(n) or n != 1):
            raise ApiError(400, "only n=1 is supported", param="n")
        if not isinstance(body.get("model", ""), str):
            raise ApiError(400, '"model" must be a string', param="model")
        if not isinstance(body.get("stream", False), (bool, type(None))):
            raise ApiError(400, '"stream" must be true or false', param="stream")
        message = self._message(request, text, _optional_str(body, "user"), _conversation(request))
        completion = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.model_id}
        if body.get("stream"):
            return await self._stream(request, message, params, completion)
        reply = await self.bot.handle(message, params=params)
        content = reply.text if reply else ""
        if reply is not None:
            await self.bot.record_delivery(reply, completion["id"])
        return _json_response({**completion, "object": "chat.completion", "choices": [{
            "index": 0, "message": {"role": "assistant", "content": content},
            "finish_reason": self._finish_reason(content, params), "logprobs": None}]})

    async def _stream(self, request: web.Request, message: Message, params: SamplingParams,
                      completion: dict[str, Any]) -> web.StreamResponse:
        response = _event_stream()
        streamed: list[str] = []

        async def send(delta: dict[str, Any], finish_reason: str | None = None) -> None:
            if not response.prepared:  # only now: a busy queue can still answer 503 instead of a stream
                await response.prepare(request)
                await send({"role": "assistant", "content": ""})
            chunk = {**completion, "object": "chat.completion.chunk",
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())

        async def on_delta(text: str) -> None:
            streamed.append(text)
            await send({"content": text})

        try:
            reply = await self.bot.handle(message, on_delta=on_delta, params=params)
        except ConnectionResetError:
            log.debug("http: client left %s; generation stopped", completion["id"])
            return response
        except Exception:
            if not response.prepared:
                raise  # still time for a proper status (503 when busy)
            log.exception("http: streaming %s failed", completion["id"])
            await response.write(b'data: {"error": {"message": "internal error", "type": "server_error"}}\n\n')
            return response
        content = reply.text if reply else ""
        if reply is not None:
            await self.bot.record_delivery(reply, completion["id"])
            if not streamed:  # a command or plugin answered without the model
                await send({"content": content})
        await send({}, self._finish_reason(content, params))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def completions(self, request: web.Request) -> web.StreamResponse:
        """A front end's prompt, rendered by its `chatcore.prompt`, generated as is (chatcore/remote.py).

        Only for key holders: a raw prompt can say anything the renderer would refuse (forged turns,
        another persona), so an anonymous client must never send one. The text is tokenized as plain
        text like every prompt (``<|endoftext|>`` stays ordinary tokens); token-id prompts are refused."""
        if not self.api_key:
            raise ApiError(403, "raw prompts need adapters.http.api_key on this server (front ends send it as "
                                "model.remote_api_key)", "permission_error", code="api_key_required")
        body = await _json_object(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ApiError(400, '"prompt" must be one string (the rendered prompt; token ids are not accepted)',
                           param="prompt")
        params = self._raw_params(body)
        scope = _optional_str(body, "chatcore_scope")  # the front end's scope: its adapter lives here
        if not isinstance(body.get("stream", False), (bool, type(None))):
            raise ApiError(400, '"stream" must be true or false', param="stream")
        info: dict[str, Any] = {}
        completion = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time())}

        def chunk(text: str, finish_reason: str | None) -> dict[str, Any]:
            return {**completion, "model": info.get("model", self.bot.public_model_id),
                    "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}]}

        if not body.get("stream"):
            text = "".join([delta async for delta in self.bot.complete(prompt, params, info, scope)])
            return _json_response(chunk(text, self._finish_reason(text, params)))
        response = _event_stream()
        parts: list[str] = []
        try:
            async for delta in self.bot.complete(prompt, params, info, scope):
                if not response.prepared:  # only now: a busy queue can still answer 503 instead of a stream
                    await response.prepare(request)
                parts.append(delta)
                await response.write(f"data: {json.dumps(chunk(delta, None))}\n\n".encode())
        except ConnectionResetError:
            return response  # the front end went away: generation stopped
        except Exception:
            if not response.prepared:
                raise
            log.exception("http: completion %s failed", completion["id"])
            await response.write(b'data: {"error": {"message": "internal error", "type": "server_error"}}\n\n')
            return response
        if not response.prepared:
            await response.prepare(request)
        await response.write(f"data: {json.dumps(chunk('', self._finish_reason(''.join(parts), params)))}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def feedback(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        completion_id, value = body.get("id"), body.get("value")
        if not isinstance(completion_id, str) or len(completion_id) > 256 or not _is_int(value) or value not in (1, -1):
            raise ApiError(400, '"id" must be a completion id and "value" 1 or -1')
        user = _optional_str(body, "user")
        if user is None:  # a vote is someone's: anonymous ones would overwrite each other
            raise ApiError(400, 'rating a reply needs the "user" you chatted as', param="user")
        if not await self.bot.feedback(self.name, completion_id, user, value):
            raise ApiError(404, f"no reply with id {completion_id!r}", param="id")
        return _json_response({"ok": True})

    # --- translation ----------------------------------------------------------------------

    def _message(self, request: web.Request, text: str, user: str | None, conversation: str | None) -> Message:
        anonymous = user is None
        if anonymous:  # no identity given: a one-off one, so no history or data is ever shared
            user = f"anonymous-{uuid.uuid4().hex}"
        return Message(text=text, adapter=self.name, channel=conversation or "default", user=user, is_direct=True,
                       authenticated=self.api_key is not None, anonymous=anonymous,
                       client=self._client(request))

    def _client(self, request: web.Request) -> str:
        """The asking client's address (behind `trusted_proxies`, from X-Forwarded-For)."""
        return client_address(request.remote, request.headers.getall("X-Forwarded-For", []), self.trusted_proxies)

    def _params(self, body: dict[str, Any]) -> SamplingParams:
        """The request's sampler settings on top of the configured ones, checked."""
        base: SamplingParams = self.bot.params
        limit = min(self.max_tokens_limit, self.bot.engine.block_size // 2)  # leave the prompt room
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is not None:
            if not _is_int(max_tokens) or not 1 <= max_tokens <= limit:
                raise ApiError(400, f"max_tokens must be an integer from 1 to {limit}", param="max_tokens")
        else:
            max_tokens = min(base.max_new_tokens, limit)
        temperature = _number(body, "temperature", 0.0, 2.0)
        top_p = _number(body, "top_p", 0.0, 1.0)
        if top_p is not None and top_p <= 0:
            raise ApiError(400, "top_p must be greater than 0", param="top_p")
        seed = body.get("seed")
        if seed is not None and (not _is_int(seed) or not SEED_MIN <= seed <= SEED_MAX):
            raise ApiError(400, f"seed must be an integer from {SEED_MIN} to {SEED_MAX}", param="seed")
        top_k = body.get("top_k")  # not OpenAI's, but vLLM's and llama.cpp's: accepted the same way
        if top_k is not None and (not _is_int(top_k) or not 1 <= top_k <= 2**31):
            raise ApiError(400, "top_k must be a positive integer", param="top_k")
        stop = body.get("stop")
        if isinstance(stop, str):
            stop = [stop]
        if stop is not None and (not isinstance(stop, list) or len(stop) > 4
                                 or not all(isinstance(s, str) and s for s in stop)):
            raise ApiError(400, "stop must be a string or a list of up to 4 non-empty strings", param="stop")
        params = base.updated(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_tokens,
                              seed=seed, stop=base.stop + tuple(stop or ()))
        try:
            return validate(params)  # whatever the engine would refuse is refused here, as a 400
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None

    def _raw_params(self, body: dict[str, Any]) -> SamplingParams:
        """A front end's sampler settings, complete: every field it sends replaces this server's own
        (``top_k: null`` is no cut, ``stop`` replaces the configured stops), so its reply is local serving's."""
        known = {"temperature", "top_k", "top_p", "repetition_penalty", "max_tokens", "stop_at_newline", "stop", "seed"}
        given = {k: body[k] for k in known if k in body}
        max_tokens = given.pop("max_tokens", self.bot.params.max_new_tokens)
        if not _is_int(max_tokens) or not 0 <= max_tokens <= self.max_tokens_limit:
            raise ApiError(400, f"max_tokens must be an integer from 0 to {self.max_tokens_limit}", param="max_tokens")
        stop = given.pop("stop", list(self.bot.params.stop))
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or len(stop) > 16 or not all(isinstance(x, str) and x for x in stop):
            raise ApiError(400, "stop must be a string or a list of up to 16 non-empty strings", param="stop")
        if not isinstance(given.get("stop_at_newline", True), bool):
            raise ApiError(400, "stop_at_newline must be true or false", param="stop_at_newline")
        try:
            return validate(dataclasses.replace(self.bot.params, **given, max_new_tokens=max_tokens, stop=tuple(stop)))
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None

    def _finish_reason(self, content: str, params: SamplingParams) -> str:
        # The bot does not report why generation ended; a reply as long as the budget ran out of it.
        return "length" if content and self.bot.engine.count_tokens(content) >= params.max_new_tokens else "stop"


def _json_response(body: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    from aiohttp import web  # late: see the module docstring

    return web.json_response(body, status=status, headers=headers)


def _event_stream() -> web.StreamResponse:
    """A server-sent event stream's response, to prepare once its first event is ready."""
    from aiohttp import web  # late: see the module docstring

    return web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})


async def _json_object(request: web.Request) -> dict[str, Any]:
    limit = request.app._client_max_size
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, f"request body is larger than {limit} bytes", code="request_too_large")
    try:
        body = json.loads(await request.read())
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply") from None
    except ValueError as exc:  # bad JSON, bad UTF-8, an integer of more digits than Python converts
        raise ApiError(400, f"the request body is not valid JSON: {exc}"[:300]) from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply") from None
    except UnicodeEncodeError:  # "\ud800" escapes: no text can be stored or tokenized with them
        raise ApiError(400, "the request body contains invalid Unicode (a lone surrogate)") from None
    return body


def _file_content(file: Any) -> Any:
    """A JSON file as its object, anything else as text."""
    text = file.data.decode("utf-8", errors="replace")
    return json.loads(text) if file.mime == "application/json" else text


def _host_name(host: str | None) -> str:
    """The name in a Host header, without the port (IPv6 brackets removed)."""
    host = (host or "").strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _conversation(request: web.Request) -> str | None:
    value = request.headers.get(CONVERSATION_HEADER) or None
    if value is not None and len(value) > 256:
        raise ApiError(400, f"{CONVERSATION_HEADER} must be at most 256 characters", param=CONVERSATION_HEADER)
    return value


def _optional_str(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > 256:
        raise ApiError(400, f'"{key}" must be a string of at most 256 characters', param=key)
    return value


def _last_user_message(messages: Any) -> str:
    """The text of the last user message, after checking the shape of every message."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, '"messages" must be a non-empty list', param="messages")
    texts = [_message_text(i, item) for i, item in enumerate(messages)]
    for item, text in zip(reversed(messages), reversed(texts)):
        if item["role"] == "user":
            if not text.strip():
                raise ApiError(400, "the last user message has no text", param="messages")
            return text
    raise ApiError(400, '"messages" has no message with role "user"', param="messages")


def _message_text(i: int, item: Any) -> str:
    """One OpenAI message's text: content is a string, null, or a list of text parts."""
    where = f"messages[{i}]"
    if not isinstance(item, dict) or item.get("role") not in ROLES:
        raise ApiError(400, f'{where} must be an object with "role" one of {", ".join(ROLES)}', param="messages")
    content = item.get("content")
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise ApiError(400, f"{where}.content must be a string or a list of content parts", param="messages")
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ApiError(400, f'{where}.content: only text parts ({{"type": "text", "text": "..."}}) are '
                                "supported", param="messages")
    return "\n".join(part["text"] for part in content)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(body: dict[str, Any], key: str, low: float, high: float) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ApiError(400, f"{key} must be a number from {low:g} to {high:g}", param=key)
    return float(value)


@hookimpl
def register_adapters(register):
    register("http", HttpAdapter)

