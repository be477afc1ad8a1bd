"""The plugin manager: built-ins first, then third-party plugins from entry points.

Built-in adapters and plugins are ordinary plugins on the same hooks (datasette
style); they are listed here rather than as entry points so a source checkout
works without reinstalling. Third-party packages declare
``[project.entry-points.chatcore] name = "module"``.
Set ``CHATCORE_TRACE_HOOKS=1`` to print every hook call and its result to stderr.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import pluggy

from . import hookspecs
from .config import Field, Schema, Unavailable

DEFAULT_PLUGINS: dict[str, str] = {
    "stdin": "chatcore.adapters.stdin",
    "discord": "chatcore.adapters.discord",
    "slack": "chatcore.adapters.slack",
    "http": "chatcore.adapters.http",
    "commands": "chatcore.plugins.commands",
    "auto_finetune": "chatcore.plugins.auto_finetune",
    "privacy": "chatcore.plugins.privacy",
    "dashboard": "chatcore.plugins.dashboard",
}

# Which pip extra brings the library a built-in needs, for a useful error.
EXTRAS = {"discord": "discord", "slack": "slack"}


@dataclass
class Command:
    name: str
    handler: Callable[..., Any]
    admin: bool = False
    anonymous: bool = False  # may run without an identity (it touches nobody's data)

    @property
    def help(self) -> str:
        doc = inspect.getdoc(self.handler) or ""
        return doc.splitlines()[0] if doc else ""


class PluginManager(pluggy.PluginManager):
    """pluggy's manager plus the registries the hooks fill."""

    def __init__(self) -> None:
        super().__init__("chatcore")
        self.add_hookspecs(hookspecs)
        self.unavailable: dict[str, str] = {}  # built-in name -> why it could not load
        self.tracing: Callable[[str], None] | None = None  # set by CHATCORE_TRACE_HOOKS

    def adapters(self) -> dict[str, type]:
        found: dict[str, type] = {}
        self.hook.register_adapters(register=lambda name, cls: found.__setitem__(name, cls))
        return found

    def commands(self) -> dict[str, Command]:
        found: dict[str, Command] = {}

        def register(name: str, handler: Callable[..., Any], admin: bool = False, anonymous: bool = False) -> None:
            found[name.lstrip("/")] = Command(name.lstrip("/"), handler, admin, anonymous)

        self.hook.register_commands(register=register)
        return found

    def config_sections(self) -> dict[str, Schema]:
        found: dict[str, Schema] = {}
        self.hook.register_config(register=lambda section, schema: found.setdefault(section, {}).update(schema))
        return found

    def schema(self) -> Schema:
        """The whole config schema: core, adapters, plugin sections, and stand-ins for what failed to load."""
        from .config import full_schema

        schema = full_schema(self.adapters(), self.config_sections())
        for name, why in self.unavailable.items():
            if name in EXTRAS:
                schema["adapters"].setdefault(name, Unavailable(why))
            schema["plugins"].setdefault(name, Unavailable(why))
        return schema

    def disable(self, names: Iterable[str]) -> None:
        for name in names:
            self.set_blocked(name)


async def await_me_maybe(value: Any) -> Any:
    """Hooks may return a value or an awaitable (datasette's convention)."""
    return await value if inspect.isawaitable(value) else value


async def call_hook(pm: pluggy.PluginManager, name: str, **kwargs: Any) -> list[Any]:
    """Call hook `name` on every plugin and await the results that are awaitable."""
    return [await await_me_maybe(r) for r in getattr(pm.hook, name)(**kwargs)]


def make_plugin_manager(extra: Iterable[Any] = (), *, entry_points: bool = True) -> PluginManager:
    """Load the built-ins, installed entry-point plugins, then `extra` (objects or modules)."""
    pm = PluginManager()
    for name, module_name in DEFAULT_PLUGINS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # Only a missing optional library is expected; a broken built-in must fail loudly.
            if (exc.name or "").startswith("chatcore") and exc.name != module_name:
                raise
            extra_name = EXTRAS.get(name)
            hint = f" (pip install 'chatcore[{extra_name}]')" if extra_name else ""
            pm.unavailable[name] = f"{name} is not available: {exc}{hint}"
            continue
        pm.register(module, name=name)
    if entry_points:
        pm.load_setuptools_entrypoints("chatcore")
    for plugin in extra:
        # A plugin given explicitly (the testbot recipe) may also be installed through its entry
        # point, or be a built-in: it is the same module object, registered once.
        if not pm.is_registered(plugin):
            pm.register(plugin)
    if os.environ.get("CHATCORE_TRACE_HOOKS"):
        _trace(pm)
    return pm


def _trace(pm: PluginManager) -> None:
    def trace(line: str) -> None:
        print(f"[chatcore hook] {line}", file=sys.stderr)

    pm.tracing = trace  # also used by Bot for the firstresult hooks it calls itself

    def before(hook_name: str, hook_impls: list, kwargs: dict) -> None:
        names = ", ".join(impl.plugin_name for impl in hook_impls)
        args = ", ".join(f"{k}={_short(v)}" for k, v in kwargs.items())
        trace(f"{hook_name}({args}) -> [{names}]")

    def after(outcome: Any, hook_name: str, hook_impls: list, kwargs: dict) -> None:
        try:
            result = outcome.get_result()
        except BaseException as exc:
            result = f"raised {exc!r}"
        trace(f"{hook_name} returned {_short(result)}")

    pm.add_hookcall_monitoring(before, after)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


__all__ = ["Command", "DEFAULT_PLUGINS", "Field", "PluginManager", "await_me_maybe", "call_hook", "make_plugin_manager"]
