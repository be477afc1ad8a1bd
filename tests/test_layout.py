"""The house stays readable: no import circles, nothing imported upward or private, adapters on the
contract, and the light commands start without torch (each checked in a fresh interpreter)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests import layout

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def graph():
    return layout.graph(ROOT)


def test_no_import_circles(graph):
    assert layout.circles(graph) == []


def test_no_upward_imports(graph):
    assert layout.upward(graph) == []


def test_no_private_names_imported_across_modules(graph):
    assert layout.private(graph) == []


def test_adapters_import_only_the_contract(graph):
    assert layout.adapter_breaches(graph) == []


def test_every_module_has_a_layer(graph):
    for name in graph:
        layout.layer_of(name)


def test_no_two_public_classes_share_a_name():
    seen: dict[str, str] = {}
    for name, path in layout.modules(ROOT).items():
        for node in __import__("ast").parse(path.read_text(encoding="utf-8")).body:
            if type(node).__name__ == "ClassDef" and not node.name.startswith("_"):
                assert node.name not in seen, f"{node.name} is defined in {seen[node.name]} and {name}"
                seen[node.name] = name


def _modules_after(code: str) -> set[str]:
    """The modules loaded after running `code` in a fresh interpreter (its output is checked to be sane)."""
    out = subprocess.run([sys.executable, "-c", code + "\nimport json, sys; print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    *printed, loaded = out.stdout.strip().splitlines()
    _modules_after.printed = "\n".join(printed)
    return set(json.loads(loaded))


@pytest.mark.parametrize("adapter", ["stdin", "http", "discord", "slack"])
def test_adapters_import_without_torch_or_the_runtime(adapter):
    loaded = _modules_after(f"import chatcore.adapters.{adapter}")
    assert "torch" not in loaded
    assert not {"chatcore.bot", "chatcore.serving", "chatcore.engine"} & loaded


def test_the_remote_engine_imports_without_torch():
    # chatcore.remote shares its generator figures with chatcore.serving through chatcore.metrics, not serving.
    assert "torch" not in _modules_after("import chatcore.remote")


def _run_cli(*args: str) -> set[str]:
    code = ("import sys\nfrom chatcore.cli import main\n"
            f"try:\n    main({list(args)!r})\nexcept SystemExit:\n    pass")
    return _modules_after(code)


def test_help_does_not_import_torch():
    assert "torch" not in _run_cli("--help")
    assert "finetune" in _modules_after.printed


def test_config_check_does_not_import_torch():
    assert "torch" not in _run_cli("config", "check", str(ROOT / "config" / "stdin.yaml"))
    assert "OK" in _modules_after.printed


def test_history_stats_does_not_import_torch(tmp_path):
    config = tmp_path / "bot.yaml"
    config.write_text(f"bot:\n  data_dir: {tmp_path}\n")
    from chatcore.store import Store

    Store(tmp_path / "history.db").close()
    assert "torch" not in _run_cli("history", "stats", "-c", str(config))
    assert "exchanges" in _modules_after.printed  # the command really ran


def test_the_architecture_doc_says_how_built_ins_really_register():
    import tomllib

    from chatcore.plugin_manager import DEFAULT_PLUGINS

    doc = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    entry_points = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"].get(
        "entry-points", {}).get("chatcore", {})
    assert not set(DEFAULT_PLUGINS) & set(entry_points)  # built-ins are listed in code, not entry points
    assert "`DEFAULT_PLUGINS`" in doc and "they are not entry points" in doc
    assert "registered through the entry-point group\n`chatcore` in `pyproject.toml`, exactly like third-party" not in doc
    for module in DEFAULT_PLUGINS.values():  # the doc names every built-in's folder
        assert module.split(".")[1] + "/" in doc
