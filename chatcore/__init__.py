"""chatcore: a self-hosted, plugin-based chatbot that owns its model and learns from its conversations."""

import os

# GNU OpenMP (torch's CPU thread pool on Linux) reads this once, when torch loads it.
# Its default lets a waiting worker spin 300,000 times (milliseconds) before it sleeps,
# which starves everything else on a busy machine, and only 100 times once it manages
# more threads than there are CPUs, which costs a futex wake-up at every one of a decode
# step's ~100 parallel ops. 10,000 spins (0.1-0.5 ms) bridge the gaps inside a step and
# give the CPU back between steps (benchmarks/omp_threads.py; chatcore.threads keeps
# the serving thread's pool the only one). An operator's own GOMP_SPINCOUNT wins.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import pluggy  # noqa: E402  (after the environment default above, which must precede torch)

from .message import DROP, Message, Prompt, Reply

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("chatcore")
"""Decorate plugin functions with this to implement a hook from `chatcore.hookspecs`."""

__all__ = ["DROP", "Message", "Prompt", "Reply", "hookimpl", "__version__"]
