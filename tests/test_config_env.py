"""`${ENV}` values: converted to the key's type, and never printed."""

from __future__ import annotations

import pytest

from chatcore.config import ConfigError, full_schema, load_config

SECRET = "sk-live-7f3a9c1e5b2d"


@pytest.fixture
def schema():
    return full_schema()


def write(tmp_path, text):
    path = tmp_path / "bot.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("key, raw, expected", [
    ("bot.history_turns", "12", 12),
    ("bot.history_turns", " -3 ", -3),
    ("generation.temperature", "0.7", 0.7),
    ("generation.temperature", "1", 1),
    ("generation.stop_at_newline", "false", False),
    ("generation.stop_at_newline", "YES", True),
    ("generation.stop_at_newline", "0", False),
    ("generation.stop_at_newline", "on", True),
    ("serving.prefix_cache_mb", "64.5", 64.5),
    ("bot.admins", "discord:1, slack:U2,", ["discord:1", "slack:U2"]),
    ("model.threads", "", None),  # empty: unset
    ("bot.name", "007", "007"),  # a string key keeps the string
])
def test_env_values_take_the_keys_type(tmp_path, schema, key, raw, expected):
    section, name = key.split(".")
    config = load_config(write(tmp_path, f"{section}:\n  {name}: ${{VALUE}}\n"), schema, environ={"VALUE": raw})
    value = config.get(key)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("key", ["bot.history_turns", "generation.stop_at_newline", "generation.temperature",
                                 "model.download", "serving.max_queue"])
def test_wrong_env_value_names_key_line_and_variable_never_the_value(tmp_path, schema, key):
    section, name = key.split(".")
    path = write(tmp_path, f"# comment\n{section}:\n  {name}: ${{DISCORD_TOKEN}}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, schema, environ={"DISCORD_TOKEN": SECRET})
    message = str(err.value)
    assert SECRET not in message and SECRET[:8] not in message
    assert err.value.key == key and err.value.line == 3
    assert "DISCORD_TOKEN" in message


@pytest.mark.parametrize("text", [
    "bot:\n  name: ${TOKEN}\n  history_turns: 3\n  admins: ${TOKEN}x\n",     # list from env: accepted
    "bot:\n  log_level: ${TOKEN}\n",                                          # a choice
    "generation:\n  stop: [\"${TOKEN}\", 3]\n",                               # inside a list
    "bot:\n  history_turns: \"${TOKEN}-${OTHER}\"\n",                         # mixed text
    "model:\n  threads: ${TOKEN:-x}\n",
])
def test_no_error_path_prints_an_environment_value(tmp_path, schema, text):
    path = write(tmp_path, text)
    try:
        config = load_config(path, schema, environ={"TOKEN": SECRET, "OTHER": "1"})
    except ConfigError as err:
        assert SECRET not in str(err)
    else:
        assert SECRET not in repr(config.redacted())


def test_config_check_does_not_print_env_values(tmp_path, monkeypatch, capsys):
    from chatcore.cli import main

    monkeypatch.setenv("MY_TOKEN", SECRET)
    assert main(["config", "check", str(write(tmp_path, "bot:\n  name: ${MY_TOKEN}\n"))]) == 0
    assert main(["config", "check", str(write(tmp_path, "bot:\n  history_turns: ${MY_TOKEN}\n"))]) == 2
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err


def test_a_section_switched_on_from_the_environment_needs_its_required_values(tmp_path):
    from chatcore.config import Field

    schema = full_schema(sections={"plugins.vault": {"enabled": Field(bool, False),
                                                     "token": Field(str, required=True, secret=True)}})
    path = write(tmp_path, "plugins:\n  vault:\n    enabled: ${VAULT_ON}\n")
    assert load_config(path, schema, environ={"VAULT_ON": "no"}).get("plugins.vault.enabled") is False
    with pytest.raises(ConfigError, match="required value is missing") as err:
        load_config(path, schema, environ={"VAULT_ON": "yes"})
    assert err.value.key == "plugins.vault.token"
