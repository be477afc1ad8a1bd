"""What a plain `pip install -e .` (no extras) user meets works without anything only the extras bring.

The dev extras pull in numpy (through transformers) and more, so the suite's own
environment cannot show a missing runtime dependency. Here each check runs in a
subprocess where every installed distribution outside the closure of
pyproject.toml's base `dependencies` cannot be imported.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def base_closure() -> set[str]:
    """Canonical names of the base dependencies and everything they require (no extras)."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    seen: set[str] = set()
    todo = [Requirement(d) for d in deps]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        try:
            todo += [Requirement(r) for r in metadata.requires(req.name) or []]
        except metadata.PackageNotFoundError:
            pass
    return seen


def blocked_modules() -> list[str]:
    """Top-level modules that only distributions outside the base closure provide."""
    allowed = base_closure() | {"chatcore"}
    out = []
    for module, dists in metadata.packages_distributions().items():
        if not any(canonicalize_name(d) in allowed for d in dists) and module.isidentifier():
            out.append(module)
    return sorted(out)


BOOT = """
import sys
BLOCKED = set({blocked!r})

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not a base dependency)", name=name)
        return None

sys.meta_path.insert(0, Block())
"""


def run_base(code: str, tmp_path: Path, stdin: str = "") -> subprocess.CompletedProcess:
    script = BOOT.format(blocked=blocked_modules()) + textwrap.dedent(code)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", script], input=stdin, capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)


def test_the_blocker_hides_what_only_the_extras_bring(tmp_path):
    assert "transformers" in blocked_modules() and "pytest" in blocked_modules()
    r = run_base("import transformers", tmp_path)
    assert r.returncode != 0 and "not a base dependency" in r.stderr


@pytest.mark.slow  # trains a tiny starter model
def test_save_load_starter_and_chat_work_on_base_dependencies(tmp_path, sample_conversations):
    r = run_base(f"""
        import json, torch
        from chatcore import checkpoint
        from chatcore.model import GPT, GPTConfig
        from chatcore.training.starter import StarterConfig, build_starter, chitchat_exchanges

        torch.manual_seed(0)
        path = checkpoint.save(GPT(GPTConfig(block_size=64, n_layer=1, n_head=2, n_embd=32)), "tiny")
        checkpoint.load(path)
        assert chitchat_exchanges(limit=20)
        cfg = StarterConfig(n_layer=1, n_head=2, n_embd=32, block_size=64, minutes=0.05, max_exchanges=100)
        starter = build_starter("starter", corpus={str(sample_conversations)!r}, cfg=cfg, progress=False)
        checkpoint.load(starter)
        open("bot.yaml", "w").write("bot:\\n  data_dir: data\\nmodel:\\n  checkpoint: " + str(path) + "\\n"
                                    "generation:\\n  max_new_tokens: 5\\n")
        print(json.dumps(str(path)))
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    chat = run_base("""
        from chatcore.cli import main
        sys.exit(main(["chat", "-c", "bot.yaml"]))
    """, tmp_path, stdin="hi\nhow are you?\n")
    assert chat.returncode == 0, chat.stderr
    for argv in (["config", "check", "bot.yaml"], ["history", "stats", "-c", "bot.yaml"],
                 ["history", "export", "-c", "bot.yaml"], ["model", "status", "-c", "bot.yaml"]):
        r = run_base(f"from chatcore.cli import main; sys.exit(main({argv!r}))", tmp_path)
        assert r.returncode == 0, (argv, r.stderr)
    assert json.loads(r.stdout) is not None
