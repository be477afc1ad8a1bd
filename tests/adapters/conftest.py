"""Adapter test fixtures: loopback only, fake platforms, a whole bot around a scripted model."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from chatcore import hookimpl
from chatcore.testing import ScriptedEngine, make_bot

from .fake_discord import FakeDiscord
from .fake_slack import FakeSlack


class NonLoopbackConnection(AssertionError):
    """A test tried to reach something other than 127.0.0.1: adapter tests must stay offline."""


def _is_loopback(host: Any) -> bool:
    if host in (None, "localhost", "", b"localhost"):
        return True
    try:
        return ipaddress.ip_address(host.decode() if isinstance(host, bytes) else host).is_loopback
    except ValueError:
        return False


@pytest.fixture(autouse=True)
def loopback_only(request, monkeypatch) -> Any:
    """Refuse (loudly) any DNS lookup or connection that is not to loopback.

    The error is an AssertionError, not an OSError, so client libraries that
    retry network errors (discord.py, aiohttp) cannot swallow it; every attempt
    is also recorded and fails the test at teardown.
    """
    attempts: list[str] = []
    if request.node.get_closest_marker("live"):  # opt-in smoke tests talk to the real platforms
        yield attempts
        return
    real_getaddrinfo, real_connect, real_connect_ex = socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex

    def refuse(what: str) -> None:
        attempts.append(what)
        raise NonLoopbackConnection(f"test tried to reach {what}; only 127.0.0.1 is allowed")

    def getaddrinfo(host, *args, **kwargs):
        if not _is_loopback(host):
            refuse(f"DNS {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    def check(sock: socket.socket, address: Any) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):
            refuse(f"{address[0]}:{address[1]}")

    def connect(self, address):
        check(self, address)
        return real_connect(self, address)

    def connect_ex(self, address):
        check(self, address)
        return real_connect_ex(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    yield attempts
    assert not attempts, f"non-loopback connections attempted: {attempts}"


@pytest.fixture
def naughty_strings(shared_data: Path) -> list[str]:
    import json

    return json.loads((shared_data / "naughty_strings.json").read_text(encoding="utf-8"))


async def eventually(check: Any, timeout: float = 5.0) -> Any:
    """Poll `check()` until it returns something truthy (deliveries finish after the message is sent)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not (result := check()):
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"condition not met in {timeout} s")
        await asyncio.sleep(0.01)
    return result


class FeedbackSpy:
    """A plugin recording every `feedback_received` hook call as (exchange id, user key, value)."""

    def __init__(self) -> None:
        self.votes: list[tuple[int, str, int]] = []

    @hookimpl
    def feedback_received(self, bot, exchange, user, value):
        self.votes.append((exchange.id, user, value))


def build_bot(tmp_path: Path, adapter: str, settings: dict[str, Any], replies: Any = None, *,
              config: dict[str, Any] | None = None, plugins: list[Any] = (), **engine: Any) -> Any:
    """A whole bot (store, hooks, prompt) around a ScriptedEngine, with `adapter` configured.

    `replies` scripts the model (None echoes "You said: ..."); `config` adds other sections.
    """
    config = {**(config or {}), "adapters": {adapter: {"enabled": True, **settings}}}
    return make_bot(tmp_path, engine=ScriptedEngine(replies, **engine), config=config, plugins=plugins)


async def start_adapter(adapter: Any, ready: Any, timeout: float = 10.0) -> asyncio.Task:
    """Run `adapter.start()` in a task until `ready()` (an awaitable) is done; a start error is raised here."""
    task = asyncio.create_task(adapter.start())
    waiter = asyncio.ensure_future(ready())
    done, _ = await asyncio.wait({task, waiter}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    if waiter not in done:
        waiter.cancel()
        if task in done:
            task.result()  # raises the adapter's start error
        task.cancel()
        raise TimeoutError(f"{adapter.name} adapter did not become ready in {timeout} s")
    return task


async def stop_adapter(adapter: Any, task: asyncio.Task) -> None:
    await adapter.stop()
    try:
        await asyncio.wait_for(task, 5)
    except asyncio.CancelledError:
        pass


class Running:
    """The adapters a fixture started; `stop_all` stops them and closes their bots at teardown."""

    def __init__(self) -> None:
        self.started: list[tuple[Any, Any, asyncio.Task]] = []

    async def start(self, bot: Any, adapter: Any, ready: Any) -> None:
        try:
            task = await start_adapter(adapter, ready)
        except BaseException:
            await bot.close()
            raise
        self.started.append((bot, adapter, task))

    async def stop_all(self) -> None:
        for bot, adapter, task in self.started:
            await stop_adapter(adapter, task)
            await bot.close()


@pytest.fixture
async def fake_discord(monkeypatch) -> AsyncIterator[FakeDiscord]:
    fake = await FakeDiscord().start()
    fake.install(monkeypatch)
    yield fake
    await fake.close()


@pytest.fixture
async def discord_bot(tmp_path: Path, fake_discord: FakeDiscord, monkeypatch) -> AsyncIterator[Any]:
    """`await discord_bot(settings, replies, config=...)` -> (bot, adapter), running against the fake."""
    from chatcore.adapters.discord import DiscordAdapter

    monkeypatch.setattr(DiscordAdapter, "guild_ready_timeout", 0.05)
    running = Running()

    async def run(settings: dict[str, Any] | None = None, replies: Any = None, **kwargs: Any) -> tuple[Any, Any]:
        bot = build_bot(tmp_path, "discord", {"token": fake_discord.token, **(settings or {})}, replies, **kwargs)
        adapter = bot.enabled_adapters(["discord"])[0]
        await running.start(bot, adapter, adapter.ready.wait)
        return bot, adapter

    yield run
    await running.stop_all()


@pytest.fixture
async def fake_slack() -> AsyncIterator[FakeSlack]:
    fake = await FakeSlack().start()
    yield fake
    await fake.close()


@pytest.fixture
async def slack_bot(tmp_path: Path, fake_slack: FakeSlack) -> AsyncIterator[Any]:
    """`await slack_bot(mode, settings, replies, config=...)` -> (bot, adapter), running against the fake."""
    running = Running()

    async def run(mode: str = "socket", settings: dict[str, Any] | None = None, replies: Any = None,
                  **kwargs: Any) -> tuple[Any, Any]:
        base = {"mode": mode, "bot_token": fake_slack.bot_token, "api_url": fake_slack.api_url}
        if mode == "socket":
            base["app_token"] = fake_slack.app_token
        else:
            base.update(signing_secret=fake_slack.signing_secret, host="127.0.0.1", port=0)
        bot = build_bot(tmp_path, "slack", {**base, **(settings or {})}, replies, **kwargs)
        adapter = bot.enabled_adapters(["slack"])[0]

        async def ready() -> None:
            await adapter.ready.wait()
            if mode == "socket":
                await fake_slack.socket_connected.wait()

        await running.start(bot, adapter, ready)
        return bot, adapter

    yield run
    await running.stop_all()


@pytest.fixture
async def http_bot(tmp_path: Path) -> AsyncIterator[Any]:
    """`await http_bot(settings, replies, config=...)` -> (bot, adapter, base_url) serving on 127.0.0.1."""
    running = Running()

    async def run(settings: dict[str, Any] | None = None, replies: Any = None, **kwargs: Any) -> tuple[Any, Any, str]:
        bot = build_bot(tmp_path, "http", {"host": "127.0.0.1", "port": 0, **(settings or {})}, replies, **kwargs)
        adapter = bot.enabled_adapters(["http"])[0]
        await running.start(bot, adapter, adapter.ready.wait)
        return bot, adapter, f"http://127.0.0.1:{adapter.port}"

    yield run
    await running.stop_all()
