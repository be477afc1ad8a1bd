"""Reuse a conversation's KV state for its next turn.

A follow-up prompt starts with the earlier turns, which the model has already
run through when it answered them. Keys and values depend only on the token ids
and their positions (and the weights), so a cached state stays valid for exactly
the tokens it shares with the new prompt from the start: the cache is keyed by
token ids, not by conversation, and a lookup returns the longest shared prefix.
That also covers a prompt whose history differs at the end (the reply's stop
newline was never fed; the history renders ``\\n\\n`` after the reply) and a
window that dropped its oldest turn (nothing shared: a miss, never a wrong hit).

Entries are copies (a finished row's state, moved out with ``KVCache.take``),
bounded by a byte budget and evicted least recently used first. One cache belongs to one set of weights: the
`Generator` makes a new one on every hot swap.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class PrefixHit:
    """The first ``length`` tokens of a prompt, already run through the model."""

    length: int
    k: torch.Tensor  # [n_layer, n_head, length, head_dim]
    v: torch.Tensor


@dataclass
class _Entry:
    tokens: torch.Tensor  # [n] int64
    k: torch.Tensor  # [n_layer, n_head, n, head_dim]
    v: torch.Tensor
    namespace: Any = None  # e.g. the LoRA adapter the state was computed with: reused only with it

    @property
    def nbytes(self) -> int:
        return self.k.element_size() * (self.k.numel() + self.v.numel())


class PrefixCache:
    """Token-prefix -> KV state, LRU within `budget_bytes`. Thread-safe."""

    def __init__(self, budget_bytes: int = 256 * 2**20, min_shared: int = 1, supersede_tail: int = 16) -> None:
        if budget_bytes < 0:
            raise ValueError("budget_bytes must be >= 0")
        self.budget_bytes = budget_bytes
        self.min_shared = max(1, min_shared)
        # An entry that a new state extends, except for at most this many of its
        # last tokens (a reply whose end was re-rendered), is that conversation's
        # older turn: storing the newer one drops it instead of keeping both.
        self.supersede_tail = supersede_tail
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._next_id = 0
        self._nbytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def lookup(self, tokens: Sequence[int], max_length: int | None = None, namespace: Any = None) -> PrefixHit | None:
        """The cached state sharing the longest prefix with `tokens` (at most `max_length` of it).

        The returned tensors are views of the entry: copy them (``KVCache.restore``
        does) before the entry can be evicted and reused.
        """
        query = torch.as_tensor(list(tokens), dtype=torch.long)
        limit = len(query) if max_length is None else min(len(query), max_length)
        with self._lock:
            best_id, best_len = None, 0
            for entry_id, entry in self._entries.items():
                if entry.namespace != namespace:
                    continue
                n = _shared(entry.tokens, query, limit)
                if n > best_len:
                    best_id, best_len = entry_id, n
            if best_id is None or best_len < self.min_shared:
                self.misses += 1
                return None
            self._entries.move_to_end(best_id)
            entry = self._entries[best_id]
            self.hits += 1
            return PrefixHit(best_len, entry.k[:, :, :best_len], entry.v[:, :, :best_len])

    def store(self, tokens: Sequence[int], k: torch.Tensor, v: torch.Tensor, namespace: Any = None) -> bool:
        """Keep the state of `tokens` (k, v: ``[n_layer, n_head, len(tokens), head_dim]``, owned copies).

        Returns False when the state alone is over the budget (it is not kept).
        """
        ids = torch.as_tensor(list(tokens), dtype=torch.long)
        if k.shape != v.shape or k.dim() != 4 or k.size(2) != len(ids):
            raise ValueError(f"k/v of shape {tuple(k.shape)} do not hold {len(ids)} tokens")
        entry = _Entry(ids, k, v, namespace)
        if entry.nbytes > self.budget_bytes or len(ids) == 0:
            return False
        with self._lock:
            for entry_id, old in list(self._entries.items()):
                if old.namespace != namespace:
                    continue
                shared = _shared(old.tokens, ids, len(ids))
                if shared >= len(old.tokens) - self.supersede_tail and 2 * shared >= len(old.tokens):
                    self._drop(entry_id)
            while self._entries and self._nbytes + entry.nbytes > self.budget_bytes:
                self._drop(next(iter(self._entries)))  # least recently used first
            self._entries[self._next_id] = entry
            self._next_id += 1
            self._nbytes += entry.nbytes
        return True

    def clear(self, namespace: Any = None) -> None:
        """Drop every state, or (given a namespace) only the states computed in it."""
        with self._lock:
            if namespace is None:
                self._entries.clear()
                self._nbytes = 0
                return
            for entry_id in [i for i, e in self._entries.items() if e.namespace == namespace]:
                self._drop(entry_id)

    def _drop(self, entry_id: int) -> None:
        self._nbytes -= self._entries.pop(entry_id).nbytes


def _shared(a: torch.Tensor, b: torch.Tensor, limit: int) -> int:
    """Length of the common prefix of `a` and `b`, at most `limit`."""
    n = min(len(a), len(b), limit)
    if n == 0:
        return 0
    differ = (a[:n] != b[:n]).nonzero()
    return n if len(differ) == 0 else int(differ[0])
