"""A front end's engine on another chatcore instance: ``model.remote: http://host:port/v1``.

One serving box (a GPU, a big CPU) runs chatcore with the HTTP adapter and an
``api_key``; any number of front ends (Discord, Slack, HTTP processes) set
``model.remote`` to its ``/v1`` and load no weights. `RemoteGenerator` keeps the
contract of `chatcore.serving.Generator`, so the bot does not know the difference.

What stays on the front end, so a reply is the one local serving would give:
the prompt is rendered here by `chatcore.prompt` (history, persona, user text
cleaned so it cannot forge a turn, a scope's persona), and the bot trims, hooks
and stores the reply as always; a scope is sent by name, and the serving box adds
that scope's promoted LoRA adapter as it would for its own messages. The serving box's ``/v1/completions`` takes that prompt as it is (no
chat template, no history of its own) and tokenizes it with the plain-text
encoding local serving uses, so ``<|endoftext|>`` typed by a user stays seven
ordinary tokens. Every sampler setting travels with the request (``top_k``,
``stop_at_newline`` and ``repetition_penalty`` as extension fields), so with the
same seed the reply equals local serving's on the same weights.

A remote that is down, refuses, answers an error or says nothing for
``model.remote_timeout_s`` raises `Busy`: the user gets the busy answer and no
exchange is stored. The API key (``model.remote_api_key: ${ENV}``) only ever goes
into the Authorization header; it is never logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from .config import ConfigError
from .message import Busy
from .metrics import generator_stats
from .params import SamplingParams
from .tokenizer import Tokenizer

log = logging.getLogger("chatcore.remote")

DEFAULT_BLOCK_SIZE = 1024
"""GPT-2's context, assumed only until the serving box has said its own (in /v1/models)."""


def front_end_note(config: Any) -> str:
    """What a front end is and where its fine-tuning happens (`chatcore config check`, ``/finetune``)."""
    note = (f"this instance is a front end of {shown_url(config['model']['remote'])} (model.remote): it loads and "
            "trains no weights. The serving box fine-tunes on the shared history (give both the same history.url; "
            "set plugins.auto_finetune.poll_minutes there, or run `chatcore finetune` there) and hot-swaps what it "
            "promotes; every front end then answers with it.")
    if not config.get("history.url"):
        note += (" This instance's history is its own SQLite file, which the serving box cannot read: "
                 "set history.url to a PostgreSQL database shared with it.")
    return note


class RemoteModel:
    """What the bot and the adapters read of a model that serves elsewhere (`chatcore.adapter.ServingModel`)."""

    def __init__(self, tokenizer: Tokenizer | None = None) -> None:
        self.tokenizer = tokenizer or Tokenizer()  # the prompt's budget is counted here, as locally
        self.model_id = "remote"  # the serving box's id once it has answered
        self.block_size = DEFAULT_BLOCK_SIZE
        self.meta: dict[str, Any] = {}  # no checkpoint here: nothing to fine-tune from or swap

    def count_tokens(self, text: str) -> int:
        return self.tokenizer.count(text)


def wire_params(params: SamplingParams) -> dict[str, Any]:
    """Every sampler setting as /v1/completions fields: nothing is left to the serving box's defaults."""
    return {"temperature": params.temperature, "top_k": params.top_k, "top_p": params.top_p,
            "repetition_penalty": params.repetition_penalty, "max_tokens": params.max_new_tokens,
            "stop_at_newline": params.stop_at_newline, "stop": list(params.stop), "seed": params.seed}


def shown_url(url: str) -> str:
    """`url` without user name or password: the form fit for logs and errors."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    return urlunsplit(parts._replace(netloc=netloc + (f":{parts.port}" if parts.port else "")))


class RemoteGenerator:
    """`chatcore.serving.Generator`'s contract, served by another chatcore's /v1/completions."""

    def __init__(self, url: str, api_key: str | None = None, *, timeout_s: float = 60.0,
                 tokenizer: Tokenizer | None = None) -> None:
        parts = urlsplit(url or "")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError("must be an http:// or https:// URL such as http://gpu-box:8080/v1", key="model.remote")
        self.url = url.rstrip("/")
        self.shown = shown_url(self.url)
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout_s, sock_read=timeout_s)
        self._model = RemoteModel(tokenizer)
        self._known = False  # whether the serving box told us its model and context yet
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self._active = 0
        self.busy = 0  # requests answered busy (for /metrics)

    @classmethod
    def from_config(cls, config: Any) -> "RemoteGenerator":
        model = config["model"]
        return cls(model["remote"], model.get("remote_api_key"), timeout_s=float(model.get("remote_timeout_s") or 60))

    @property
    def engine(self) -> RemoteModel:
        return self._model

    def health(self) -> str | None:
        """None while requests can be sent (a remote that is down answers busy, per request)."""
        return "the generator is closed" if self._closed else None

    def swap(self, engine: Any) -> None:
        raise RuntimeError(f"this instance is a front end of {self.shown} (model.remote): "
                           "the serving box swaps its own models")

    async def ready(self) -> RemoteModel:
        """The remote model, after asking the serving box once for its id and context size. Raises Busy."""
        if not self._known:
            async with self._request("GET", "/models") as resp:
                try:
                    model = (await resp.json())["data"][0]
                    model_id, block_size = str(model["id"]), int(model.get("max_model_len") or DEFAULT_BLOCK_SIZE)
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, LookupError, TypeError) as exc:
                    raise self.refused(f"/models did not answer as an OpenAI-compatible API ({type(exc).__name__})",
                                       error=True) from None
            self._model.model_id, self._model.block_size = model_id, block_size
            self._known = True
        return self._model

    async def stream(self, prompt: str, params: SamplingParams, adapter: tuple[str | None, str] | None = None,
                     info: dict[str, Any] | None = None) -> AsyncIterator[str]:
        """Yield the reply's text as the serving box streams it; `info["model_id"]` names the weights that answered.

        `adapter` = (scope name, _): the serving box adds that scope's own promoted adapter, if it has one."""
        if self._closed:
            raise RuntimeError("the generator is closed")
        body = {"model": self._model.model_id, "prompt": prompt, "stream": True, **wire_params(params)}
        if adapter is not None and adapter[0]:
            body["chatcore_scope"] = adapter[0]
        self._active += 1
        try:
            async with self._request("POST", "/completions", json=body) as resp:
                async for event in _sse(resp, self):
                    model = event.get("model")
                    if model:
                        self._model.model_id = str(model)
                        if info is not None:
                            info["model_id"] = self._model.model_id
                    for choice in event.get("choices") or ():
                        text = choice.get("text") if isinstance(choice, dict) else None
                        if text and isinstance(text, str):
                            yield text
        finally:
            self._active -= 1

    async def generate(self, prompt: str, params: SamplingParams,
                       adapter: tuple[str | None, str] | None = None) -> str:
        return "".join([delta async for delta in self.stream(prompt, params, adapter)])

    def stats(self) -> dict[str, int]:
        return generator_stats(running=self._active, busy=self.busy)

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _request(self, method: str, path: str, **kwargs: Any) -> "_Call":
        if self._session is None or self._session.closed:  # made here: a session belongs to the running loop
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return _Call(self, self._session.request(method, self.url + path, headers=self._headers, **kwargs))

    def refused(self, why: str, *, error: bool = False) -> Busy:
        """Busy for the user, the reason for the operator (never the key)."""
        self.busy += 1
        self._known = False  # ask again next time: the serving box may have restarted with other weights
        (log.error if error else log.warning)("remote engine %s: %s; answering busy", self.shown, why)
        return Busy(f"the remote engine did not answer ({why})")


class _Call:
    """One request to the serving box: a non-200 answer or a network failure becomes Busy."""

    def __init__(self, owner: RemoteGenerator, request: Any) -> None:
        self.owner, self.request, self.resp = owner, request, None

    async def __aenter__(self) -> aiohttp.ClientResponse:
        try:
            self.resp = await self.request.__aenter__()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise self.owner.refused(f"unreachable: {type(exc).__name__}") from None
        if self.resp.status != 200:
            status = self.resp.status
            detail = await _error_message(self.resp)
            await self.request.__aexit__(None, None, None)
            if status in (401, 403):
                raise self.owner.refused(f"refused our API key (HTTP {status}: {detail}); check model.remote_api_key "
                                         "against the serving box's adapters.http.api_key", error=True)
            raise self.owner.refused(f"HTTP {status}: {detail}", error=status not in (429, 503))
        return self.resp

    async def __aexit__(self, *exc: Any) -> None:
        await self.request.__aexit__(*exc)


async def _sse(resp: aiohttp.ClientResponse, owner: RemoteGenerator) -> AsyncIterator[dict[str, Any]]:
    """The JSON events of a server-sent event stream, up to ``data: [DONE]``; a broken stream is Busy."""
    try:
        async for raw in resp.content:
            line = raw.decode("utf-8").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return
            event = json.loads(data)
            if not isinstance(event, dict):
                raise ValueError("an event that is not a JSON object")
            if "error" in event:
                error = event["error"]
                why = str(error.get("message") if isinstance(error, dict) else error)[:200]
                raise owner.refused(f"failed mid-reply: {why}", error=True)
            yield event
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
        raise owner.refused(f"the reply stream broke: {type(exc).__name__}") from None
    raise owner.refused("the reply stream ended without [DONE]")


async def _error_message(resp: aiohttp.ClientResponse) -> str:
    """The server's own error message (OpenAI's shape), shortened; never our request's headers."""
    try:
        body = await resp.json(content_type=None)
        return str(body["error"]["message"])[:200]
    except Exception:  # not JSON, or another shape: the status says enough
        return resp.reason or "error"
