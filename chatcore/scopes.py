"""Scopes: one community's persona and adapter: a workspace (Discord guild, Slack team) or a channel.

Configured under ``scopes:`` (a list, most specific wins)::

    scopes:
      - name: rust-help            # letters, digits, - and _ (the adapter's folder name)
        adapter: discord           # which platform
        channel: "1122"            # a channel id ...
        persona: "You are a patient Rust mentor."
      - name: acme
        adapter: slack
        workspace: T0123           # ... or a whole guild / team
        persona: null              # no persona
        finetune: true             # train its own adapter (default true)

A message belongs to the scope of its channel; a thread (Discord thread, Slack
thread: ``Message.parent`` names its channel) to its parent channel's scope;
otherwise to its workspace's; otherwise to none (the bot-wide model, no persona).

The persona conditions every prompt in the scope: `chatcore.prompt.build_prompt`
renders it, cleaned like user text, so it can never forge a turn. Admins set it
from chat (``/persona set ...``); that choice is kept in
``<data_dir>/scopes/personas.json`` and wins over the config. Each scope's
adapter is promoted in its own registry, ``<data_dir>/models/scopes/<name>/``
(`chatcore.registry.Registry`: gate, rollback and pruning as for the bot-wide model).

Torch-free: adapters, plugins and ``chatcore config check`` may import it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .message import Message

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
MAX_PERSONA_CHARS = 1000


@dataclass(frozen=True)
class Scope:
    name: str
    adapter: str
    workspace: str | None = None
    channel: str | None = None
    persona: str | None = None  # as configured; `Scopes.persona` has the one in force
    finetune: bool = True


class Scopes:
    """The configured scopes, which one a message is in, and the personas in force."""

    def __init__(self, scopes: Iterable[Scope] = (), state_dir: str | os.PathLike | None = None) -> None:
        self.scopes = list(scopes)
        self.by_name = {s.name: s for s in self.scopes}
        self._channels = {(s.adapter, s.channel): s for s in self.scopes if s.channel}
        self._workspaces = {(s.adapter, s.workspace): s for s in self.scopes if s.workspace}
        self.state_path = Path(state_dir) / "personas.json" if state_dir is not None else None
        self.ledger_path = Path(state_dir) / "channels.json" if state_dir is not None else None
        self._personas = self._read_personas()
        self._ledger = self._read_json(self.ledger_path)  # "adapter:channel" -> scope name

    @classmethod
    def from_config(cls, config: Any) -> "Scopes":
        """The ``scopes:`` section of a bot's config; ValueError naming the bad entry."""
        raw = config.get("scopes") or []
        return cls(parse(raw), Path(os.path.expanduser(str(config.data_dir))) / "scopes")

    def resolve(self, message: Message) -> Scope | None:
        """The scope of `message`: its channel's, its thread's parent channel's, its workspace's, or None."""
        for channel in (message.channel, message.parent):
            if channel is not None and (message.adapter, channel) in self._channels:
                return self._channels[(message.adapter, channel)]
        if message.workspace is not None:
            return self._workspaces.get((message.adapter, message.workspace))
        return None

    def note(self, message: Message, scope: Scope | None) -> None:
        """Remember which scope `message`'s channel is in, so its stored exchanges train that scope's
        adapter (the store keeps the channel, not the thread's parent or the workspace)."""
        key = f"{message.adapter}:{message.channel}"
        name = scope.name if scope is not None else None
        if name is None or self._ledger.get(key) == name:
            return
        self._ledger[key] = name
        self._write_json(self.ledger_path, self._ledger)

    def channels(self, scope: Scope) -> list[str]:
        """The "adapter:channel" keys whose exchanges belong to `scope`."""
        keys = {k for k, name in self._ledger.items() if name == scope.name}
        if scope.channel is not None:
            keys.add(f"{scope.adapter}:{scope.channel}")
        return sorted(keys)

    def scope_of(self, adapter: str, channel: str) -> Scope | None:
        """The scope of a stored exchange's channel."""
        if (adapter, channel) in self._channels:
            return self._channels[(adapter, channel)]
        return self.by_name.get(self._ledger.get(f"{adapter}:{channel}", ""))

    def persona(self, scope: Scope | None) -> str | None:
        """The persona in force in `scope` (set from chat, else configured); None for no persona."""
        if scope is None:
            return None
        if scope.name in self._personas:
            return self._personas[scope.name] or None
        return scope.persona or None

    def set_persona(self, scope: Scope, text: str | None) -> None:
        """Set (or, with None / "", clear) the persona of `scope`; kept across restarts."""
        if text and len(text) > MAX_PERSONA_CHARS:
            raise ValueError(f"a persona is at most {MAX_PERSONA_CHARS} characters")
        self._personas[scope.name] = text or ""
        self._write_json(self.state_path, self._personas)

    def _read_personas(self) -> dict[str, str]:
        return self._read_json(self.state_path)

    @staticmethod
    def _read_json(path: Path | None) -> dict[str, str]:
        if path is None or not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path} is unreadable ({exc}); fix or remove it") from exc
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise ValueError(f"{path} must map names to text; fix or remove it")
        return data

    @staticmethod
    def _write_json(path: Path | None, data: dict[str, str]) -> None:
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
        os.replace(tmp, path)


def adapter_dir(models_dir: str | os.PathLike, scope: Scope) -> Path:
    """Where a scope's adapters and their registry live."""
    return Path(models_dir) / "scopes" / scope.name


def parse(raw: Any) -> list[Scope]:
    """Scopes from the config's list; ValueError saying which entry is wrong and why."""
    if not isinstance(raw, list):
        raise ValueError("scopes must be a list of {name, adapter, channel | workspace, persona} entries")
    out: list[Scope] = []
    seen: dict[Any, str] = {}
    for i, entry in enumerate(raw):
        where = f"scopes[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be a mapping")
        unknown = set(entry) - {"name", "adapter", "workspace", "channel", "persona", "finetune"}
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        name, adapter = entry.get("name"), entry.get("adapter")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"{where}.name must be letters, digits, - or _ (got {name!r})")
        if not isinstance(adapter, str) or not adapter:
            raise ValueError(f"{where}.adapter must name an adapter such as discord or slack")
        workspace, channel = entry.get("workspace"), entry.get("channel")
        if (workspace is None) == (channel is None):
            raise ValueError(f"{where} must have exactly one of workspace or channel")
        persona = entry.get("persona")
        if persona is not None and (not isinstance(persona, str) or len(persona) > MAX_PERSONA_CHARS):
            raise ValueError(f"{where}.persona must be text of at most {MAX_PERSONA_CHARS} characters")
        key = (adapter, "workspace" if workspace is not None else "channel", str(workspace or channel))
        for k, label in ((name, "name"), (key, "place")):
            if k in seen:
                raise ValueError(f"{where} repeats the {label} of {seen[k]}")
            seen[k] = where
        out.append(Scope(name, adapter, None if workspace is None else str(workspace),
                         None if channel is None else str(channel), persona, bool(entry.get("finetune", True))))
    return out
