"""Plugins installed through an entry point: a real distribution, the README's testbot recipe."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PLUGIN = '''
from chatcore import hookimpl

@hookimpl
def register_commands(register):
    def shout(bot, message, args):
        """Repeat what you say, loudly."""
        return args.upper()
    register("shout", shout)

@hookimpl
async def reply_ready(bot, message, reply):
    reply.text = reply.text.replace("darn", "d*rn")
'''

PYPROJECT = '''
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "chatcore-shout-test"
version = "0.1"

[project.entry-points.chatcore]
shout = "my_shout_plugin"

[tool.setuptools]
py-modules = ["my_shout_plugin"]
'''

# The README's recipe, word for word but for the module name.
RECIPE = '''
import pytest, my_shout_plugin

@pytest.fixture
def testbot_plugins():
    return [my_shout_plugin]

@pytest.fixture
def testbot_replies():
    return ["darn it"]

def test_filter(testbot):
    testbot.push("hi")
    assert testbot.pop() == "d*rn it"

def test_command(testbot):
    assert testbot.ask("/shout hey") == "HEY"

def test_loaded_once_through_the_entry_point(testbot):
    pm = testbot.bot.pm
    assert pm.get_name(my_shout_plugin) == "shout"
    assert [p for p in pm.get_plugins() if p is my_shout_plugin] == [my_shout_plugin]
'''


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory) -> Path:
    """A tiny plugin distribution, really installed by pip into its own target folder."""
    root = tmp_path_factory.mktemp("plugin")
    src, target = root / "src", root / "site"
    src.mkdir()
    (src / "pyproject.toml").write_text(PYPROJECT)
    (src / "my_shout_plugin.py").write_text(PLUGIN)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(src)],
        capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        pytest.skip(f"cannot build the test plugin here: {result.stderr[-500:]}")
    assert list(target.glob("chatcore_shout_test-*.dist-info/entry_points.txt"))
    return target


def _pytest(tmp_path: Path, site: Path, test: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_recipe.py").write_text(textwrap.dedent(test))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_readme_recipe_works_with_the_plugin_installed(installed_plugin, tmp_path):
    result = _pytest(tmp_path, installed_plugin, RECIPE)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "3 passed" in result.stdout


def test_installed_plugin_loads_through_its_entry_point(installed_plugin, tmp_path):
    test = '''
    from chatcore.plugin_manager import make_plugin_manager

    def test_entry_point():
        pm = make_plugin_manager()
        assert "shout" in pm.commands()
        assert pm.get_plugin("shout").__name__ == "my_shout_plugin"
        assert "shout" not in make_plugin_manager(entry_points=False).commands()
    '''
    result = _pytest(tmp_path, installed_plugin, test)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
