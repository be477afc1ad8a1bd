"""The deployment examples in config/ validate against the adapters' own schemas; the guard holds."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from chatcore.config import ConfigError, load_config
from chatcore.plugin_manager import make_plugin_manager

from .conftest import NonLoopbackConnection

CONFIG = Path(__file__).resolve().parents[2] / "config"
ENV = {"DISCORD_TOKEN": "d-token", "SLACK_BOT_TOKEN": "xoxb-1", "SLACK_APP_TOKEN": "xapp-1",
       "SLACK_SIGNING_SECRET": "s", "CHATCORE_API_KEY": "k"}


@pytest.mark.parametrize("name, secrets", [
    ("discord", ["token"]), ("slack", ["bot_token", "app_token"]), ("http", ["api_key"])])
def test_example_config_is_valid_and_its_secrets_come_from_the_environment(name, secrets):
    schema = make_plugin_manager().schema()
    config = load_config(CONFIG / f"{name}.yaml", schema, environ=ENV)
    section = config["adapters"][name]
    assert section["enabled"] is True
    assert all(section[key] in ENV.values() for key in secrets)
    assert all(config.redacted()["adapters"][name][key] == "***" for key in secrets)
    missing = {k: v for k, v in ENV.items() if v != section[secrets[0]]}
    with pytest.raises(ConfigError, match="environment variable .* is not set"):
        load_config(CONFIG / f"{name}.yaml", schema, environ=missing)


def test_the_loopback_guard_refuses_other_addresses(loopback_only):
    with pytest.raises(NonLoopbackConnection):
        socket.getaddrinfo("discord.com", 443)
    with socket.socket() as sock, pytest.raises(NonLoopbackConnection):
        sock.connect(("10.255.255.1", 80))
    loopback_only.clear()  # these two were on purpose
