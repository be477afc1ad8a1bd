"""chatcore: a self-hosted, plugin-based chatbot that owns its model and learns from its conversations."""

import pluggy

from .message import DROP, Message, Prompt, Reply

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("chatcore")
"""Decorate plugin functions with this to implement a hook from `chatcore.hookspecs`."""

__all__ = ["DROP", "Message", "Prompt", "Reply", "hookimpl", "__version__"]
