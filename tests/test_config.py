"""Config: errors name the key path and the file line; secrets come from the environment only."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from chatcore.config import ConfigError, load_config
from chatcore.plugin_manager import make_plugin_manager

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def schema():
    return make_plugin_manager(entry_points=False).schema()


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bot.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, key, line, words", [
    ("bot:\n  name: x\n  histroy_turns: 3\n", "bot.histroy_turns", 3, "did you mean 'history_turns'"),
    ("bot:\n  name: x\n\ngeneration:\n  top_k: lots\n", "generation.top_k", 5, "expected an integer"),
    ("model:\n  threads: true\n", "model.threads", 2, "expected an integer"),
    ("model:\n  dtype: int4\n", "model.dtype", 2, "must be one of"),
    ("bot:\n  name: a\n  name: b\n", "bot.name", 3, "duplicate key"),
    ("adapters:\n  stdin:\n    enabled: yes please\n", "adapters.stdin.enabled", 3, "true or false"),
    ("bogus: 1\n", "bogus", 1, "unknown key"),
    ("bot: [1, 2]\n", "bot", 1, "mapping"),
    ("serving:\n  max_batch: 0\n", "serving.max_batch", 2, "must be auto or a whole number of at least 1"),
    ("serving:\n  prefix_cache_mb: 8\n  max_queue: lots\n", "serving.max_queue", 3, "must be auto or a whole number"),
    ("serving:\n  max_queue: -1\n", "serving.max_queue", 2, "at least 0"),
])
def test_errors_name_key_and_line(tmp_path, schema, text, key, line, words):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text), schema)
    assert err.value.key == key
    assert err.value.line == line
    assert words in str(err.value)
    assert f"line {line}" in str(err.value) and "bot.yaml" in str(err.value)


def test_yaml_syntax_error_has_line(tmp_path, schema):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "bot:\n  name: [unclosed\n  x: 1\n"), schema)
    assert err.value.line is not None and "invalid YAML" in str(err.value)


def test_env_substitution_and_unset_variable(tmp_path, schema):
    path = write(tmp_path, "bot:\n  name: ${BOT_NAME}\n  data_dir: ${DATA:-/tmp/x}\n")
    config = load_config(path, schema, environ={"BOT_NAME": "ada"})
    assert config.get("bot.name") == "ada" and config.get("bot.data_dir") == "/tmp/x"
    with pytest.raises(ConfigError) as err:
        load_config(path, schema, environ={})
    assert "BOT_NAME is not set" in str(err.value) and err.value.line == 2


def test_defaults_fill_everything(schema):
    config = load_config(None, schema)
    assert config.get("generation.temperature") == 0.8
    assert config.get("generation.top_k") == 200
    assert config.get("generation.max_new_tokens") == 150
    assert config.get("generation.stop_at_newline") is True
    assert config.get("plugins.commands.rate_limit.messages") == 20


def test_shipped_configs_are_valid(schema):
    env = {k: "x" for k in ("DISCORD_TOKEN", "SLACK_BOT_TOKEN", "SLACK_APP_TOKEN", "SLACK_SIGNING_SECRET",
                            "CHATCORE_API_KEY")}
    files = sorted((ROOT / "config").glob("*.yaml"))
    assert files, "config/ holds no example"
    for path in files:
        load_config(path, schema, environ=env)


def test_config_check_cli_redacts_secrets_and_exit_codes(tmp_path):
    from chatcore.cli import main

    good = write(tmp_path, "bot:\n  name: ada\n")
    assert main(["config", "check", str(good)]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("bot:\n  nam: ada\n")
    assert main(["config", "check", str(bad)]) == 2
    assert main(["config", "check", str(tmp_path / "missing.yaml")]) == 2


def test_secret_never_printed(tmp_path):
    # A plugin with a secret field: `config check` shows *** and error messages omit the value.
    code = r'''
import sys
from chatcore import hookimpl
from chatcore.config import Field, load_config, ConfigError
from chatcore.plugin_manager import make_plugin_manager
class P:
    @hookimpl
    def register_config(self, register):
        register("plugins.vault", {"token": Field(str, secret=True, required=True)})
pm = make_plugin_manager([P()], entry_points=False)
schema = pm.schema()
import os
c = load_config(sys.argv[1], schema)
print(c.redacted()["plugins"]["vault"])
try:
    load_config(sys.argv[2], schema)
except ConfigError as e:
    print(e)
'''
    good = tmp_path / "good.yaml"
    good.write_text("plugins:\n  vault:\n    token: ${VAULT}\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("plugins:\n  vault:\n    token: 12345678\n")
    out = subprocess.run([sys.executable, "-c", code, str(good), str(bad)], capture_output=True, text=True,
                         env={"VAULT": "hunter2-very-secret", "PATH": ""}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "hunter2" not in out.stdout + out.stderr
    assert "12345678" not in out.stdout + out.stderr
    assert "'token': '***'" in out.stdout
    assert "plugins.vault.token: expected a string, got a secret value (bad.yaml, line 3)" in out.stdout


def test_required_missing(tmp_path):
    from chatcore import hookimpl
    from chatcore.config import Field

    class P:
        @hookimpl
        def register_config(self, register):
            register("plugins.p", {"url": Field(str, required=True)})

    schema = make_plugin_manager([P()], entry_points=False).schema()
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "plugins:\n  p:\n    other: 1\n"), schema)
    assert err.value.key == "plugins.p.other"
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "plugins:\n  p: {}\n"), schema)
    assert err.value.key == "plugins.p.url" and "required" in str(err.value)


def test_default_yaml_is_the_generated_reference(schema):
    # config/default.yaml is `chatcore config defaults`: every key, its default, its help.
    from chatcore.config import render_defaults

    shipped = (ROOT / "config" / "default.yaml").read_text()
    assert shipped == render_defaults(make_plugin_manager().schema()), \
        "config/default.yaml is stale: regenerate it with `chatcore config defaults > config/default.yaml`"
