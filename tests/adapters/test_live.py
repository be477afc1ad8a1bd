"""Opt-in smoke tests against the real platforms: skipped unless real tokens are in the environment.

    DISCORD_TOKEN=... pytest tests/adapters/test_live.py -m live
    SLACK_BOT_TOKEN=xoxb-... SLACK_APP_TOKEN=xapp-... pytest tests/adapters/test_live.py -m live

Each logs in, waits until the adapter is connected, and disconnects; nothing is posted.
"""

from __future__ import annotations

import os

import pytest

from .conftest import build_bot, start_adapter, stop_adapter

pytestmark = pytest.mark.live


def _need(*names: str) -> None:
    missing = [n for n in names if not os.environ.get(n)]
    if missing:
        pytest.skip(f"live test: set {', '.join(missing)} to run it")


async def test_discord_logs_in_and_connects(tmp_path):
    _need("DISCORD_TOKEN")
    bot = build_bot(tmp_path, "discord", {"token": os.environ["DISCORD_TOKEN"]})
    adapter = bot.enabled_adapters(["discord"])[0]
    try:
        task = await start_adapter(adapter, adapter.ready.wait, timeout=60)
        assert adapter.client.user is not None and adapter.client.user.bot
        await stop_adapter(adapter, task)
    finally:
        await bot.close()


async def test_slack_socket_mode_connects(tmp_path):
    _need("SLACK_BOT_TOKEN", "SLACK_APP_TOKEN")
    bot = build_bot(tmp_path, "slack", {"mode": "socket", "bot_token": os.environ["SLACK_BOT_TOKEN"],
                                        "app_token": os.environ["SLACK_APP_TOKEN"]})
    adapter = bot.enabled_adapters(["slack"])[0]
    try:
        task = await start_adapter(adapter, adapter.ready.wait, timeout=60)
        assert adapter.bot_user_id
        await stop_adapter(adapter, task)
    finally:
        await bot.close()
