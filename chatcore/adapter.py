"""The adapter base class, and `BotSurface`: everything an adapter may call on the bot.

An adapter only translates: platform events in (as `chatcore.message.Message`,
handed to `BotSurface.handle`), replies out (split to the platform's limits with
`chatcore.text.split_message`; a full queue raises `chatcore.message.Busy`,
answered with `BUSY_REPLY` or a 503). Everything else lives in the core, tested
once. An adapter imports only this contract (`adapter`, `message`, `params`,
`config`, `text`): never torch, `chatcore.bot` or `chatcore.serving`.
"""

from __future__ import annotations

import importlib.util
import ipaddress
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, ClassVar, Protocol

from .config import ConfigError
from .message import Message, Reply
from .params import SamplingParams


class AdapterError(RuntimeError):
    """An adapter cannot start; the message says what to fix (bad token, missing intent or secret)."""


class ServingModel(Protocol):
    """What an adapter may read of the model that serves (`BotSurface.engine`)."""

    model_id: str  # stored with every exchange; shown by /v1/models and /health
    block_size: int  # the context window, in tokens

    def count_tokens(self, text: str) -> int: ...


class BotSurface(Protocol):
    """The bot as an adapter sees it (`chatcore.bot.Bot` implements it)."""

    name: str  # bot.name in the config
    params: SamplingParams  # the configured sampler settings; per-request ones start from these

    @property
    def engine(self) -> ServingModel: ...

    async def handle(self, message: Message, on_delta: Callable[[str], Any] | None = None,
                     params: SamplingParams | None = None) -> Reply | None:
        """Answer `message` (None: nothing to send); `on_delta` receives the text as it streams.
        Raises `chatcore.message.Busy` when the queue is full, `chatcore.message.RateLimited` over the rate limit."""

    def complete(self, prompt: str, params: SamplingParams, info: dict[str, Any] | None = None,
                 scope: str | None = None) -> AsyncIterator[str]:
        """Stream the model's text after a raw, already rendered prompt (a front end's: `chatcore.remote`),
        with `scope`'s adapter when it has one; sets ``info["model"]`` to the public id of the weights
        that answered. Raises Busy."""

    async def record_delivery(self, reply: Reply, platform_message_id: str) -> None:
        """Remember which platform message carried `reply`, so reactions to it count as feedback."""

    async def first_delivery(self, source: str, event_id: str) -> bool:
        """True the first time a platform event is seen by any instance sharing this history (an hour's memory);
        False for a redelivery (a Slack retry), which the adapter drops."""

    async def feedback(self, adapter: str, platform_message_id: str, user: str, value: int) -> bool:
        """A user rated the reply carried by a platform message (+1/-1); False if it is not one of ours."""

    async def withdraw_feedback(self, adapter: str, platform_message_id: str, user: str, value: int) -> bool:
        """A user removed a reaction worth `value` (+1/-1); their vote goes if it still is that one."""

    async def retry_reply(self, adapter: str, platform_message_id: str, user: str) -> Reply | None:
        """🔁 on a reply: answer again if it is the last reply of the reacting user's own conversation, else None."""

    @property
    def public_model_id(self) -> str:
        """The serving model's id without file system paths: what outsiders (/health, /v1/models) see."""

    def health(self) -> dict[str, Any]:
        """``{"status": "ok", "model": ...}``, or ``{"status": "unavailable", "reason": ...}`` (dead or stuck model)."""


class Adapter:
    name: ClassVar[str] = ""
    config_schema: ClassVar[dict[str, Any]] = {}  # {key: chatcore.config.Field}; `enabled` is added for you

    def __init__(self, bot: BotSurface, config: dict[str, Any]) -> None:
        self.bot = bot
        self.config = config

    @classmethod
    def check_config(cls, config: dict[str, Any]) -> None:
        """Raise ConfigError for settings that are wrong together (each key's type is already checked).

        `chatcore config check` and every start run it for each enabled adapter, so a mistake is
        found before deploying, not when the platform connects."""

    async def start(self) -> None:
        """Connect and serve until `stop` is called (or the input ends)."""
        raise NotImplementedError

    async def stop(self) -> None:
        """Disconnect; must be safe to call more than once."""


def require(*modules: str) -> None:
    """Raise ModuleNotFoundError, as importing them would, when one of the top-level `modules` is not installed.

    For an adapter that imports its platform library only once it is created (discord.py, slack-bolt: slow
    to import, and most bots enable one platform at most): its module still fails to load without the
    library, so the plugin manager marks it unavailable and the config check says which extra to install."""
    for name in modules:
        if importlib.util.find_spec(name) is None:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def trusted_networks(entries: Iterable[Any], key: str) -> list[Network]:
    """A `trusted_proxies` list as networks (an address is a network of one); ConfigError naming `key`."""
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(str(entry).strip(), strict=False))
        except ValueError:
            raise ConfigError(f"{entry!r} is not an IP address or network (e.g. 10.0.0.0/8)", key=key) from None
    return networks


def client_address(peer: str | None, forwarded_for: Iterable[str], trusted: list[Network]) -> str:
    """Who is asking, for rate limits and audit logs: the peer's address, or, when the peer is one of
    the `trusted` proxies, the right-most X-Forwarded-For hop that is not a proxy (what they appended;
    what stands to its left the client wrote itself). From any other peer the header is ignored: it
    costs nothing to forge.

    aiohttp-remotes was the library to reach for, but its XForwardedFiltered believes the header
    from any peer, and XForwardedStrict refuses every request that did not come through the exact
    proxy chain (a local health check included)."""
    peer = peer or "unknown"
    if not trusted or not _within(peer, trusted):
        return peer
    hops = [h.strip() for h in ",".join(forwarded_for).split(",") if h.strip()]
    for hop in reversed(hops):
        if not _within(hop, trusted):
            return hop if _within(hop, None) else peer  # garbage in the header: count it against the proxy
    return hops[0] if hops else peer


def _within(address: str, networks: list[Network] | None) -> bool:
    """Whether `address` parses as an IP address (networks None) or lies in one of `networks`."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return networks is None or any(ip in n for n in networks)
