"""Who may teach the bot: training policy per source, the user's consent, and the decision per exchange.

A policy is ``off``, ``opt_in`` (only users who said ``/learn on``) or ``opt_out``
(everyone except users who said ``/learn off``, opted out or were forgotten). It
is set per adapter in ``adapters.NAME.training`` and may be narrowed per
workspace (Discord guild, Slack team) and per channel: the most specific one
wins (channel, then workspace, then adapter). A thread without an entry of its
own follows its parent channel (`Message.parent`: a Discord thread's channel,
Slack's ``C1`` for thread ``C1/1700.1``). Unauthenticated requests (HTTP without the API key,
`Message.authenticated` false) are always ``off``: anyone can claim any ``user`` there.

`decide` runs when an exchange is logged and its answer is stored with it
(`chatcore.store`), so a later policy change never reaches back:
`Store.relabel` (``chatcore history relabel``) is the one explicit way to do that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import DEFAULT_TRAINING_POLICY, PERMISSION_KEYS, ConfigError
from .message import Message

POLICIES = ("off", "opt_in", "opt_out")
DOCS = "docs/privacy.md"


@dataclass(frozen=True)
class Decision:
    """What was true about training when a message was said."""

    policy: str  # off | opt_in | opt_out
    consent: str  # the user's state then: yes | no | unset
    trainable: bool
    why: str  # one plain sentence for /learn and /status


def normalise(value: Any, key: str) -> str:
    """A policy value from YAML (an unquoted ``off`` arrives as false)."""
    if value is False:
        return "off"
    if value not in POLICIES:
        raise ConfigError(f"must be one of {', '.join(POLICIES)} (got {value!r})", key=key)
    return value


def _section(config: Any, adapter: str) -> dict[str, Any]:
    return config.get(f"adapters.{adapter}.training") or {}


def policy_for(config: Any, message: Message) -> str:
    """The training policy in force for `message`: channel (a thread, then its parent), then workspace, then adapter."""
    if not is_authenticated(message):
        return "off"
    section = _section(config, message.adapter)
    prefix = f"adapters.{message.adapter}.training"
    channels = {str(k): v for k, v in (section.get("channels") or {}).items()}
    # The thread's own entry, then its parent channel's (a Slack thread id "C1/1700.1" names its channel too).
    for channel in (message.channel, message.parent, message.channel.split("/", 1)[0]):
        if channel is not None and channel in channels:
            return normalise(channels[channel], f"{prefix}.channels.{channel}")
    workspaces = {str(k): v for k, v in (section.get("workspaces") or {}).items()}
    if message.workspace is not None and message.workspace in workspaces:
        return normalise(workspaces[message.workspace], f"{prefix}.workspaces.{message.workspace}")
    return normalise(section.get("policy", DEFAULT_TRAINING_POLICY.get(message.adapter, "off")), f"{prefix}.policy")


def is_authenticated(message: Message) -> bool:
    """Whether someone vouches for the sender (the platform, or HTTP's API key): self-declared users never teach."""
    return message.authenticated and not message.anonymous


def decide(config: Any, store: Any, message: Message) -> Decision:
    """Whether this message may train the bot, judged now, to be stored with it."""
    policy = policy_for(config, message)
    consent = store.consent_state(message.user_key)
    if policy == "off":
        why = ("training is off here" if is_authenticated(message)
               else "unauthenticated requests never teach me (anyone can claim any user)")
        return Decision(policy, consent, False, why)
    if consent == "no":
        return Decision(policy, consent, False, "you said no (/learn off)")
    if policy == "opt_in":
        if consent == "yes":
            return Decision(policy, consent, True, "you said yes (/learn on)")
        return Decision(policy, consent, False, "this channel is opt-in and you have not said yes (/learn on)")
    return Decision(policy, consent, True, "this channel is opt-out and you have not said no (/learn off)")


def check_config(config: Any) -> list[str]:
    """Raise ConfigError for a bad or unacknowledged policy; return one summary line per enabled adapter."""
    lines = []
    for adapter, section in (config.get("adapters") or {}).items():
        if not isinstance(section, dict) or "training" not in section:
            continue
        training = section["training"]
        prefix = f"adapters.{adapter}.training"
        policies = {normalise(training.get("policy"), f"{prefix}.policy")}
        for kind in ("workspaces", "channels"):
            for key, value in (training.get(kind) or {}).items():
                policies.add(normalise(value, f"{prefix}.{kind}.{key}"))
        ack = PERMISSION_KEYS.get(adapter)
        if ack and policies != {"off"} and not training.get(ack):
            platform = adapter.capitalize()
            rule = ("Discord's Developer Policy forbids training models on message content from its API "
                    "without Discord's express permission" if adapter == "discord" else
                    "Slack's API terms forbid training large language models on data from its API")
            raise ConfigError(
                f"training is turned on for {platform}, but {rule}. If {platform} has given you that "
                f"permission, set {prefix}.{ack}: true; otherwise keep the policy off. See {DOCS}.",
                key=f"{prefix}.policy")
        if section.get("enabled"):
            summary = ", ".join(sorted(policies))
            note = f" ({platform_note(adapter)})" if ack else ""
            lines.append(f"training on {adapter}: {summary}{note}")
    return lines


def platform_note(adapter: str) -> str:
    key = PERMISSION_KEYS[adapter]
    return f"{key} must be true to turn it on; see {DOCS}"


def describe(bot: Any, message: Message) -> str:
    """One plain sentence: can this conversation teach the bot, and why."""
    d = decide(bot.config, bot.store, message)
    policy = {"off": "off", "opt_in": "opt-in", "opt_out": "opt-out"}[d.policy]
    verdict = "can teach me" if d.trainable else "does not teach me"
    return f"Training here is {policy}; this conversation {verdict}: {d.why}."
