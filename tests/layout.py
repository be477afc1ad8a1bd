"""The import graph of chatcore, measured from the source with `ast` (nothing is imported).

    python -m tests.layout [ROOT]   # circles, upward imports, private imports, adapter breaches

`tests/test_layout.py` keeps all four at zero. A layer may import its own layer
and the layers above it in `LAYERS` (listed bottom-up); the contract layer is
what adapters and plugins stand on.
"""

from __future__ import annotations

import ast
import sys
from fnmatch import fnmatch
from pathlib import Path

# Folders of the source tree and the package each installs as (see pyproject.toml).
PACKAGES = {"chatcore": "chatcore", "adapters": "chatcore.adapters", "plugins": "chatcore.plugins"}

LAYERS: list[tuple[str, list[str]]] = [  # bottom-up
    ("contract", ["chatcore", "chatcore.message", "chatcore.params", "chatcore.text", "chatcore.config",
                  "chatcore.hookspecs", "chatcore.plugin_manager", "chatcore.adapter", "chatcore.prompt",
                  "chatcore.store", "chatcore.postgres", "chatcore.registry", "chatcore.consent", "chatcore.scopes"]),
    ("model", ["chatcore.model", "chatcore.tokenizer", "chatcore.sampling", "chatcore.quant",
               "chatcore.prefix_cache", "chatcore.checkpoint", "chatcore.hf", "chatcore.reply_text",
               "chatcore.speculative", "chatcore.engine", "chatcore.batching", "chatcore.lora", "chatcore.cpu_linear",
               "chatcore.threads"]),
    ("learning", ["chatcore.training", "chatcore.training.*", "chatcore.lineage"]),
    ("runtime", ["chatcore.weights", "chatcore.serving", "chatcore.remote", "chatcore.metrics", "chatcore.bot",
                 "chatcore.testing"]),
    ("edges", ["chatcore.adapters", "chatcore.adapters.*", "chatcore.plugins", "chatcore.plugins.*",
               "chatcore.dashboard", "chatcore.dashboard.*"]),
    ("command", ["chatcore.cli", "chatcore.training.cli"]),
]


def modules(root: Path) -> dict[str, Path]:
    """Module name -> file, for every .py file of the installed packages."""
    found: dict[str, Path] = {}
    for folder, package in PACKAGES.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = list(path.relative_to(root / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def _package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every chatcore import in `path`, lazy ones too."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: list[tuple[str, list[str], int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "chatcore"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package_of(name, path).split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "chatcore":
                continue
            names = []
            for a in node.names:
                sub = f"{target}.{a.name}"
                if sub in known:  # `from . import hf`: the submodule itself
                    out.append((sub, [], node.lineno))
                else:
                    names.append(a.name)
            if names:
                out.append((target, names, node.lineno))
    return [(t, n, line) for t, n, line in out if t in known]


def layer_of(name: str) -> int:
    for i, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch(name, p) for p in patterns):
            return i
    raise KeyError(f"{name} is in no layer: add it to tests/layout.py LAYERS")


def graph(root: Path) -> dict[str, list[tuple[str, list[str], int]]]:
    known = modules(root)
    return {name: [i for i in imports(name, path, known) if i[0] != name] for name, path in known.items()}


def circles(g: dict[str, list[tuple[str, list[str], int]]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w, _, _ in g.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def upward(g: dict[str, list[tuple[str, list[str], int]]]) -> list[str]:
    """Imports from a lower layer into a higher one."""
    return [f"{a} -> {b} (line {line})" for a, deps in sorted(g.items()) for b, _, line in deps
            if layer_of(b) > layer_of(a)]


def private(g: dict[str, list[tuple[str, list[str], int]]]) -> list[str]:
    """Private names (`_x`) imported from another module."""
    return [f"{a} imports {b}.{n} (line {line})" for a, deps in sorted(g.items()) for b, names, line in deps
            for n in names if n.startswith("_") and not n.startswith("__")]


def adapter_breaches(g: dict[str, list[tuple[str, list[str], int]]]) -> list[str]:
    """Adapters importing anything beyond the contract layer (the runtime, the model, torch's side)."""
    contract = LAYERS[0][1]
    return [f"{a} -> {b} (line {line})" for a, deps in sorted(g.items()) if fnmatch(a, "chatcore.adapters.*")
            for b, _, line in deps if b not in contract]


def main(argv: list[str]) -> int:
    root = Path(argv[1] if len(argv) > 1 else Path(__file__).resolve().parents[1])
    g = graph(root)
    for title, rows in (("import circles", [" <-> ".join(c) for c in circles(g)]), ("upward imports", upward(g)),
                        ("private names imported across modules", private(g)),
                        ("adapter imports beyond the contract", adapter_breaches(g))):
        print(f"{title}: {len(rows)}")
        for row in rows:
            print(f"  {row}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
