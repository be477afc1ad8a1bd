"""Every chatcore hook, in one place.

Two families: registries (``register_*``: a plugin hands the bot something new)
and lifecycle events (verbs: the bot tells plugins what is happening, and some
of them may change what happens next). Any hook may return an awaitable.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("chatcore")


# --- registries ---------------------------------------------------------------

@hookspec
def register_adapters(register):
    """Register chat adapters: ``register(name, adapter_class)``."""


@hookspec
def register_commands(register):
    """Register slash commands: ``register(name, handler, admin=False, anonymous=False)``; help from the docstring."""


@hookspec
def register_config(register):
    """Register the schema of a config section: ``register("plugins.NAME", {key: Field(...)})``."""


# --- lifecycle ------------------------------------------------------------------

@hookspec
def startup(bot):
    """The bot has loaded its config, store and model and is about to start its adapters."""


@hookspec
def shutdown(bot):
    """The bot is stopping: adapters are closed, the store is still open."""


@hookspec(firstresult=True)
def message_received(bot, message):
    """A message arrived: return ``DROP`` to ignore it, a string to answer it yourself, or None."""


@hookspec
def prompt_built(bot, message, prompt):
    """The model prompt is ready; ``prompt.text`` may be rewritten in place."""


@hookspec
def reply_ready(bot, message, reply):
    """A reply is about to be delivered; ``reply.text`` may be rewritten in place (empty drops it)."""


@hookspec
def exchange_logged(bot, exchange):
    """An exchange (user text and reply) was written to the history store."""


@hookspec
def user_forgotten(bot, user_key, deleted):
    """A user ran /forget: their rows are deleted; return a sentence to add to the answer, or None."""


@hookspec
def feedback_received(bot, exchange, user, value):
    """A user rated a reply: ``value`` is +1 (good), -1 (bad), or 0 (they withdrew their vote)."""


@hookspec
def finetune_started(bot, job):
    """A fine-tune job started."""


@hookspec
def finetune_finished(bot, job, result):
    """A fine-tune job ended (successfully or not); ``result`` holds its metrics or error."""


@hookspec
def finetune_promoted(bot, result):
    """A candidate checkpoint beat the serving model and now serves."""


@hookspec
def finetune_rejected(bot, result):
    """A candidate checkpoint did not beat the serving model and was kept for inspection."""
