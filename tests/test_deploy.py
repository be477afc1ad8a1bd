"""Static checks of the deployment files (no Docker daemon in CI): the facts an operator relies on."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

import yaml

from chatcore.config import load_config
from chatcore.plugin_manager import make_plugin_manager

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def dockerfile() -> list[str]:
    """Instructions, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (DEPLOY / "Dockerfile").read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_dockerfile_is_non_root_with_a_data_volume_a_health_check_and_pinned_cpu_torch():
    lines = dockerfile()
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert any(line.startswith("VOLUME") and '"/data"' in line for line in lines)
    health = [line for line in lines if line.startswith("HEALTHCHECK")]
    assert health and "CHATCORE_HEALTH_URL" in health[0]
    assert "CHATCORE_HEALTH_URL=http://127.0.0.1:8090/health" in " ".join(lines)
    assert "ARG TORCH_VERSION=2.13.0" in lines and "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in lines
    assert any('"torch==${TORCH_VERSION}"' in line for line in lines)
    assert "STOPSIGNAL SIGINT" in lines


def test_the_container_config_is_valid_and_serves_the_dashboard_on_the_health_port():
    pm = make_plugin_manager()
    cfg = load_config(DEPLOY / "chatcore.yaml", pm.schema(),
                      environ={"DISCORD_TOKEN": "t", "DASHBOARD_PASSWORD": "p"})
    assert cfg["bot"]["data_dir"] == "/data"
    assert cfg.store_url == "/data/history.db"  # no HISTORY_URL: SQLite in the volume
    with_pg = load_config(DEPLOY / "chatcore.yaml", pm.schema(), environ={
        "DISCORD_TOKEN": "t", "DASHBOARD_PASSWORD": "p", "HISTORY_URL": "postgresql://chatcore@postgres:5432/chatcore"})
    assert with_pg.store_url == "postgresql://chatcore@postgres:5432/chatcore"
    assert cfg["dashboard"]["enabled"] and cfg["dashboard"]["port"] == 8090
    assert cfg.redacted()["dashboard"]["admins"] == "***"


def test_compose_runs_the_bot_with_a_volume_and_the_dashboard_on_loopback_only():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    bot = compose["services"]["chatcore"]
    assert bot["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    assert "chatcore-data:/data" in bot["volumes"] and "chatcore-data" in compose["volumes"]
    assert bot["ports"] == ["127.0.0.1:8090:8090"]
    assert set(bot["environment"]) == {"DISCORD_TOKEN", "DASHBOARD_PASSWORD", "METRICS_TOKEN", "HISTORY_URL", "PGPASSWORD"}
    # the history lives in the postgres service; its password reaches the bot by environment, never in the URL
    pg = compose["services"]["postgres"]
    assert "chatcore-postgres" in compose["volumes"] and "ports" not in pg
    assert bot["environment"]["HISTORY_URL"].startswith("postgresql://chatcore@postgres")
    assert ":" not in bot["environment"]["HISTORY_URL"].split("//")[1].split("@")[0]
    assert "postgres" in bot["depends_on"]


def test_systemd_unit_runs_as_its_own_user():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read_string((DEPLOY / "chatcore.service").read_text())
    service = unit["Service"]
    assert service["User"] == "chatcore" and service["KillSignal"] == "SIGINT"
    assert service["ExecStart"].split()[0].endswith("/chatcore") and "run" in service["ExecStart"]
    assert unit["Install"]["WantedBy"] == "multi-user.target"
