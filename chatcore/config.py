"""YAML configuration: `${ENV}` secrets, schema validation that names the key and the line.

A value holding ``${VAR}`` is converted to its key's type (int, float, bool as
true/false/yes/no/on/off/1/0; a list as comma-separated items; empty means unset),
and a value that came from the environment is never printed: not in errors, not
by `Config.redacted`.

A schema is a nested dict whose leaves are `Field`s. The core declares its own
sections here; adapters declare theirs in `Adapter.config_schema` and plugins
through the `register_config` hook, so every key a running bot reads is checked
before anything starts: a typo, a wrong type or a missing value stops the bot
with ``path.to.key: problem (file.yaml, line N)``.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REDACTED = "***"


class ConfigError(ValueError):
    """A config problem, located: key path and file line when known."""

    def __init__(self, message: str, *, key: str | None = None, file: str | None = None, line: int | None = None):
        self.key, self.file, self.line = key, file, line
        where = ", ".join(p for p in (file and Path(file).name, line and f"line {line}") if p)
        super().__init__(f"{key + ': ' if key else ''}{message}{f' ({where})' if where else ''}")


@dataclass(frozen=True)
class Field:
    """One config key: its type, default and whether it holds a secret."""

    type: type | tuple[type, ...]
    default: Any = None
    required: bool = False
    secret: bool = False
    help: str = ""
    choices: tuple[Any, ...] | None = None
    env_only: bool = False  # a secret that may only come from ``${VAR}``, never written in the file
    check: Any = None  # value -> None when fine, else what is wrong (after the type check)


@dataclass(frozen=True)
class Unavailable:
    """Stands in for the section of a built-in that could not load: using it is an error saying why."""

    reason: str


Schema = dict[str, "Field | Unavailable | Schema"]

CORE_SCHEMA: Schema = {
    "bot": {
        "name": Field(str, "chatcore", help="How the bot calls itself in /status and logs."),
        "data_dir": Field(str, "~/.chatcore", help="Where the history database and models live."),
        "admins": Field(list, [], help='User keys allowed to run admin commands, e.g. "discord:1234".'),
        "history_turns": Field(int, 20, help="Earlier turns of a conversation offered to the prompt (trimmed to fit)."),
        "log_level": Field(str, "INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR")),
    },
    "model": {
        "checkpoint": Field(str, None, help="A native .safetensors checkpoint, a seed .pt file or a Hugging Face GPT-2 folder."),
        "base": Field(str, "gpt2", help="Hugging Face model id used when no checkpoint is configured."),
        "cache_dir": Field(str, None, help="Hugging Face cache folder (default: the hub's own)."),
        "device": Field(str, "auto", help="auto (cuda, then mps, then cpu), or a torch device such as cpu, cuda, cuda:1, mps."),
        "dtype": Field(str, "auto", choices=("auto", "float32", "bfloat16", "float16"),
                       help="auto: float32 on CPU, bfloat16 on GPUs that have it."),
        "threads": Field(int, None, help="torch threads for serving (default: all cores)."),
        "quantize": Field(str, "auto", choices=("auto", "int8", "none", None),
                          help="auto: int8 weights on a CPU (faster decoding, <1% perplexity cost), none elsewhere; int8; none."),
        "cpu_layout": Field(str, "auto", choices=("auto", "packed", "plain", None),
                            help="float32 weights on a CPU: packed (oneDNN's blocked layout: matrix products on "
                                 "every core) or plain (torch's); auto: packed on AMD CPUs, where it measured "
                                 "faster (chatcore/cpu_linear.py)."),
        "download": Field(bool, True, help="Download GPT-2 from the Hugging Face hub when it is not cached."),
        "starter": Field(bool, True, help="Train and use the small offline starter model when no GPT-2 is available."),
        "remote": Field(str, None, help="Another chatcore's OpenAI-compatible API, e.g. http://gpu-box:8080/v1: this "
                                        "instance becomes a front end that loads no weights (chatcore/remote.py)."),
        "remote_api_key": Field(str, None, secret=True, env_only=True,
                                help="The serving box's adapters.http.api_key: ${CHATCORE_REMOTE_KEY}."),
        "remote_timeout_s": Field((int, float), 60, help="A remote silent this long (connecting, or between "
                                                         "tokens) gets the user the busy answer."),
        "speculative": {
            "draft": Field(str, None, help="Speculative decoding of a lone conversation: prompt_lookup (guesses from "
                                           "the context), or the checkpoint of a small model of the same tokenizer; "
                                           "null: off. Pays with int8 weights when guesses often stand; fp32 on a "
                                           "small CPU is slower with it."),
            "k": Field(int, 4, help="Tokens guessed per step."),
        },
    },
    "generation": {
        "temperature": Field((int, float), 0.8, help="0 is greedy; higher is more varied."),
        "top_k": Field(int, 200, help="Sample among the k likeliest tokens (null: no cut)."),
        "top_p": Field((int, float), 1.0, help="Nucleus sampling: the smallest set of tokens with this much probability."),
        "repetition_penalty": Field((int, float), 1.0, help="Above 1 discourages repeating the reply's own tokens (turn markers exempt)."),
        "max_new_tokens": Field(int, 150, help="The longest reply, in tokens."),
        "stop_at_newline": Field(bool, True, help="End the reply at its first line break (the seed's behaviour)."),
        "stop": Field(list, [], help="More stop strings, matched on the generated text."),
    },
    "serving": {
        "max_queue": Field((int, str), "auto", check=lambda v: auto_or_at_least(v, 0),
                           help="Requests waiting for a batch row; beyond this they get a polite busy answer (HTTP "
                                "503 + Retry-After). auto: 4 x max_batch (chatcore/serving.py, batch_limits)."),
        "max_batch": Field((int, str), "auto", check=lambda v: auto_or_at_least(v, 1),
                           help="Conversations decoding together. auto: as many full-context KV cache rows as half "
                                "the available memory holds, at most 64 (chatcore/serving.py, batch_limits)."),
        "prefix_cache_mb": Field((int, float), 256, help="Memory for reusable conversation states (0: off)."),
        "adapt_threads": Field(bool, True,
                               help="On a CPU, decode on one thread while other work makes that faster than all of "
                                    "model.threads (probed every few seconds; chatcore/threads.py)."),
    },
    "store": {
        "path": Field(str, None, help="SQLite file (default: <data_dir>/history.db)."),
        "busy_timeout_s": Field((int, float), 30,
                                help="How long a store call waits while another process (an import, the trainer) "
                                     "holds the database locked: the chat is delayed, then fails with a clear error."),
    },
    "history": {
        "url": Field(str, None, secret=True,
                     help="Where the history lives: postgresql://user@host:port/db for several instances "
                          "(password from PGPASSWORD or ~/.pgpass), or sqlite:///path (default: store.path)."),
        "retention_days": Field((int, float), None,
                                help="Delete exchanges older than this, at start and daily (null: keep until /forget)."),
    },
    "scopes": Field(list, [], help="Communities (a workspace or a channel; threads follow their channel), "
                                   "each with an optional persona and its own adapter: see chatcore/scopes.py."),
    "adapters": {},  # filled from the registered adapters
    "plugins": {
        "disabled": Field(list, [], help="Plugin names not to load (built-in or installed)."),
    },
}

# Training policy per adapter (docs/privacy.md): Discord's and Slack's terms forbid training on what their
# APIs deliver without the platform's permission, so they start off and need an acknowledgement to turn on.
DEFAULT_TRAINING_POLICY = {"stdin": "opt_out", "http": "opt_out", "discord": "off", "slack": "off"}
PERMISSION_KEYS = {"discord": "i_have_discords_permission_to_train", "slack": "i_have_slacks_permission_to_train"}
POLICY_HELP = "off | opt_in (only users who said /learn on) | opt_out (everyone but users who said /learn off)"


def training_schema(adapter: str) -> Schema:
    """The ``adapters.NAME.training`` section; checked further by `chatcore.consent.check_config`."""
    schema: Schema = {
        # (str, bool): YAML reads an unquoted `off` as false, which means off here too.
        "policy": Field((str, bool), DEFAULT_TRAINING_POLICY.get(adapter, "off"), help=POLICY_HELP + (
            " (HTTP: requests authenticated with api_key; anonymous ones are never trained on)"
            if adapter == "http" else "")),
        "workspaces": Field(dict, {}, help="Policy per Discord guild / Slack workspace id, e.g. {\"1234\": opt_in}."),
        "channels": Field(dict, {}, help="Policy per channel id (a Slack thread follows its channel)."),
    }
    if adapter in PERMISSION_KEYS:
        platform = adapter.capitalize()
        schema[PERMISSION_KEYS[adapter]] = Field(bool, False, help=(
            f"Set true only if {platform} has granted you permission to train models on its API data "
            "(docs/privacy.md); without it every policy here must be off."))
    return schema


def auto_or_at_least(value: Any, least: int) -> str | None:
    """None when ``value`` is ``auto`` or a whole number >= ``least``; else what is wrong."""
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= least):
        return None
    return f"must be auto or a whole number of at least {least}"


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class Config(Mapping):
    """Validated config: nested dicts, plus `get("a.b.c")` and a redacted view for printing."""

    def __init__(self, data: dict[str, Any], secrets: set[str], path: str | None = None):
        # secrets: the paths never printed (secret keys, and keys whose value came from the environment)
        self._data, self._secrets, self.path = data, secrets, path

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self):
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def get(self, dotted: str, default: Any = None) -> Any:
        node: Any = self._data
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    @property
    def data_dir(self) -> Path:
        return Path(os.path.expanduser(self.get("bot.data_dir")))

    @property
    def store_path(self) -> Path:
        path = self.get("store.path")
        return Path(os.path.expanduser(path)) if path else self.data_dir / "history.db"

    @property
    def store_url(self) -> str:
        """What `Store` opens: ``history.url`` when set, else the SQLite file `store_path`."""
        return self.get("history.url") or str(self.store_path)

    def redacted(self) -> dict[str, Any]:
        """The config with every secret replaced by ``***``: the only form fit to print or log."""

        def walk_section(node: dict, prefix: str) -> dict:
            out = {}
            for k, v in node.items():
                path = f"{prefix}{k}"
                if path in self._secrets and v is not None:
                    out[k] = REDACTED
                elif isinstance(v, dict):
                    out[k] = walk_section(v, path + ".")
                else:
                    out[k] = v
            return out

        return walk_section(self._data, "")


def full_schema(adapters: Mapping[str, type] = {}, sections: Mapping[str, Schema] = {}) -> Schema:
    """The core schema plus each adapter's and each registered section's."""
    schema: Schema = {k: dict(v) if isinstance(v, dict) else v for k, v in CORE_SCHEMA.items()}
    for name, cls in adapters.items():
        schema["adapters"][name] = {"enabled": Field(bool, False), **getattr(cls, "config_schema", {}),
                                    "training": training_schema(name)}
    for dotted, section in sections.items():
        node = schema
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = {**node.get(last, {}), **section}
    return schema


def render_defaults(schema: Schema) -> str:
    """Every key of `schema` with its default and help, as a commented YAML file."""
    lines = ["# chatcore configuration: every key with its default value.",
             "# Generated by `chatcore config defaults`; copy what you need into your own file.", ""]

    def scalar(value: Any) -> str:
        return yaml.safe_dump(value, default_flow_style=True, allow_unicode=True).strip().removesuffix("\n...").strip()

    def walk(node: Schema, indent: str) -> None:
        for key, spec in node.items():
            if isinstance(spec, Unavailable):
                continue
            if isinstance(spec, dict):
                lines.append(f"{indent}{key}:")
                walk(spec, indent + "  ")
                if not indent:
                    lines.append("")
                continue
            notes = [spec.help] if spec.help else []
            if spec.choices:
                notes.append("one of: " + ", ".join(scalar(c) for c in spec.choices))
            if spec.required:
                notes.append("required" + (" when enabled" if "enabled" in node else ""))
            if spec.env_only:
                notes.append("secret: from the environment only, e.g. ${MY_SECRET}")
            elif spec.secret:
                notes.append("secret: set it from the environment, e.g. ${MY_SECRET}")
            for note in notes:
                lines.append(f"{indent}# {note}")
            lines.append(f"{indent}{key}: {scalar(spec.default)}")

    walk(schema, "")
    return "\n".join(lines).rstrip() + "\n"


def load_config(path: str | os.PathLike | None, schema: Schema | None = None,
                environ: Mapping[str, str] | None = None) -> Config:
    """Read, substitute and validate a YAML config file (None: all defaults)."""
    schema = schema if schema is not None else full_schema()
    environ = os.environ if environ is None else environ
    text, file = "", None
    if path is not None:
        file = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError("config file not found", file=file) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config file: {exc}", file=file) from None
    return parse_config(text, schema, file=file, environ=environ)


def parse_config(text: str, schema: Schema, *, file: str | None = None,
                 environ: Mapping[str, str] | None = None) -> Config:
    environ = os.environ if environ is None else environ
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        raise ConfigError(f"invalid YAML: {exc.problem}", file=file, line=line) from None
    if root is None:
        root = yaml.MappingNode("tag:yaml.org,2002:map", [])
    secrets: set[str] = set()
    data = _validate(root, schema, "", file, environ, secrets)
    return Config(data, secrets, file)


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _validate(node: yaml.Node, schema: Schema, prefix: str, file: str | None,
              environ: Mapping[str, str], secrets: set[str]) -> dict[str, Any]:
    where = prefix.rstrip(".") or None
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError("expected a mapping of keys", key=where, file=file, line=_line(node))
    given: dict[str, yaml.Node] = {}
    for key_node, value_node in node.value:
        key = key_node.value
        if key in given:
            raise ConfigError("duplicate key", key=prefix + key, file=file, line=_line(key_node))
        if key not in schema:
            hint = difflib.get_close_matches(key, list(schema), n=1)
            raise ConfigError("unknown key" + (f" (did you mean '{hint[0]}'?)" if hint else ""),
                              key=prefix + key, file=file, line=_line(key_node))
        given[key] = value_node
    # A section that can be switched off (adapters) needs its required values only when on
    # (`enabled: ${DISCORD_ON}` counts as on when the variable says so).
    enforce = not isinstance(schema.get("enabled"), Field) or (
        "enabled" in given and _value(given["enabled"], schema["enabled"], prefix + "enabled", file, environ)[0] is True)
    out: dict[str, Any] = {}
    for key, spec in schema.items():
        path = prefix + key
        value_node = given.get(key)
        if isinstance(spec, Unavailable):
            if value_node is not None:
                raise ConfigError(spec.reason, key=path, file=file, line=_line(value_node))
            continue
        if isinstance(spec, dict):
            if value_node is not None and not (isinstance(value_node, yaml.ScalarNode) and value_node.tag.endswith(":null")):
                out[key] = _validate(value_node, spec, path + ".", file, environ, secrets)
            else:
                out[key] = _defaults(spec, path + ".", file, secrets, line=_line(value_node) if value_node else None)
            continue
        if spec.secret:
            secrets.add(path)
        if value_node is None:
            if spec.required and enforce:
                raise ConfigError("required value is missing", key=path, file=file,
                                  line=_line(node) if node.value else None)
            out[key] = _copy(spec.default)
            continue
        value, from_env = _value(value_node, spec, path, file, environ)
        if from_env:
            secrets.add(path)  # whatever the key, a value from the environment is never printed
        elif spec.env_only and value is not None:
            raise ConfigError("must come from the environment: write ${VARIABLE} here and set the variable "
                              "(a key written in a file ends up in backups and repositories)",
                              key=path, file=file, line=_line(value_node))
        _check(value, spec, path, file, _line(value_node), enforce, shown=not from_env)
        out[key] = value
    return out


def _value(node: yaml.Node, spec: Field, path: str, file: str | None, environ: Mapping[str, str]) -> tuple[Any, bool]:
    """The node's value with ``${VAR}`` substituted and converted to the key's type; and whether it used any."""
    variables: list[str] = []
    value = _substitute(_construct(node), path, file, _line(node), environ, variables)
    if variables:
        value = _from_environment(value, spec, path, file, _line(node), variables)
    return value, bool(variables)


def _defaults(schema: Schema, prefix: str, file: str | None, secrets: set[str], line: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, spec in schema.items():
        if isinstance(spec, Unavailable):
            continue
        if isinstance(spec, dict):
            out[key] = _defaults(spec, prefix + key + ".", file, secrets, line)
        else:
            if spec.secret:
                secrets.add(prefix + key)
            if spec.required and "enabled" not in schema:
                raise ConfigError("required value is missing", key=prefix + key, file=file, line=line)
            out[key] = _copy(spec.default)
    return out


def _copy(value: Any) -> Any:
    return list(value) if isinstance(value, list) else dict(value) if isinstance(value, dict) else value


def _construct(node: yaml.Node) -> Any:
    return yaml.SafeLoader("").construct_document(node)


def _substitute(value: Any, path: str, file: str | None, line: int, environ: Mapping[str, str],
                variables: list[str]) -> Any:
    """`value` with every ``${VAR}`` replaced; the names substituted are appended to `variables`."""
    if isinstance(value, str):
        def env(match: re.Match) -> str:
            name, fallback = match.group(1), match.group(2)
            variables.append(name)
            if name in environ:
                return environ[name]
            if fallback is not None:
                return fallback
            raise ConfigError(f"environment variable {name} is not set", key=path, file=file, line=line)
        return _ENV.sub(env, value)
    if isinstance(value, list):
        return [_substitute(v, path, file, line, environ, variables) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, f"{path}.{k}", file, line, environ, variables) for k, v in value.items()}
    return value


_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}
_INTEGER = re.compile(r"[+-]?[0-9]{1,18}")


def _from_environment(value: Any, spec: Field, path: str, file: str | None, line: int,
                      variables: list[str]) -> Any:
    """A string built from environment variables, as the type the key wants (variables are strings)."""
    types = spec.type if isinstance(spec.type, tuple) else (spec.type,)
    text = value.strip() if isinstance(value, str) else value
    if int in types and str in types and isinstance(text, str) and _INTEGER.fullmatch(text):
        return int(text)  # `max_batch: ${MAX_BATCH}` set to 16: a number, as written in the file
    if not isinstance(value, str) or str in types:
        problem = spec.check(value) if spec.check is not None and isinstance(value, str) else None
        if problem:  # said here, where the variables' names are known (the value is never shown)
            names = ", ".join(dict.fromkeys(variables))
            raise ConfigError(f"environment variable {names}: {problem} (its value is not shown)",
                              key=path, file=file, line=line)
        return value
    if not text:
        return None  # `threads: ${THREADS:-}`: unset, the key's default applies below
    for t in types:
        if t is bool and text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
        if t is int and _INTEGER.fullmatch(text):
            return int(text)
        if t is float:
            try:
                number = float(text)
            except ValueError:
                continue
            if number == number and abs(number) != float("inf"):
                return number
        if t is list:
            return [item.strip() for item in text.split(",") if item.strip()]
    expected = " or ".join(_ENV_TYPE_NAMES.get(t, t.__name__) for t in types)
    names = ", ".join(dict.fromkeys(variables))
    raise ConfigError(f"environment variable {names} must hold {expected} (its value is not shown)",
                      key=path, file=file, line=line)


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
               list: "a list", dict: "a mapping"}
_ENV_TYPE_NAMES = {**_TYPE_NAMES, bool: "true or false (yes/no, on/off, 1/0)", list: "a comma-separated list"}


def _check(value: Any, spec: Field, path: str, file: str | None, line: int, enforce: bool = True,
           shown: bool = True) -> None:
    """Raise ConfigError unless `value` fits `spec`; `shown`: the value may appear in the message."""
    if value is None and not (spec.required and enforce):
        return
    types = spec.type if isinstance(spec.type, tuple) else (spec.type,)
    # bool is an int in Python, but `threads: true` is a typo, not a thread count.
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        expected = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)
        if spec.secret:
            got = "a secret value"
        elif not shown:
            got = f"{type(value).__name__} from the environment (value not shown)"
        else:
            got = f"{type(value).__name__} {value!r}"[:80]
        raise ConfigError(f"expected {expected}, got {got}", key=path, file=file, line=line)
    if spec.required and value in ("", []) and enforce:
        raise ConfigError("must not be empty", key=path, file=file, line=line)
    if spec.choices is not None and value not in spec.choices:
        raise ConfigError(f"must be one of {', '.join(map(str, spec.choices))}", key=path, file=file, line=line)
    problem = spec.check(value) if spec.check is not None else None
    if problem:
        raise ConfigError(problem, key=path, file=file, line=line)
