"""A reply's text rules, shared by `Engine.stream` and the batch `BatchScheduler`.

Both paths run every generated token through `ReplyText` and crop the context
with `prompt_window` / `slide_window`, so "a batched reply equals the unbatched
one" holds by construction:

- UTF-8-safe decoding: a character split over tokens is emitted whole;
- stop strings matched on the decoded text (so ``"\\nHuman:"`` is caught however
  it was tokenised), the stop string itself never emitted, and text that might
  start one held back until it is known not to;
- the turn-marker tokens the repetition penalty spares;
- the context window: a prompt keeps its newest ``block_size - 1`` tokens, and a
  full context slides to its newest half (as nanoGPT's crop would).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from .prompt import ASSISTANT, HUMAN

if TYPE_CHECKING:
    from .params import SamplingParams
    from .tokenizer import Tokenizer


def turn_marker_ids(tokenizer: "Tokenizer") -> frozenset[int]:
    """Tokens of the turn markers and line breaks: exempt from the repetition penalty
    (penalising them makes it harder for the model to end its turn)."""
    ids: set[int] = set()
    for text in (HUMAN, ASSISTANT, " " + HUMAN, " " + ASSISTANT, "\n" + HUMAN, "\n" + ASSISTANT, "\n", "\n\n"):
        ids.update(tokenizer.encode(text))
    return frozenset(ids)


def prompt_window(ids: Sequence[int], block_size: int, eot_token: int) -> list[int]:
    """The prompt tokens the model sees: the newest ``block_size - 1`` (room for one new token);
    an empty prompt is the start of a document."""
    ids = list(ids) or [eot_token]
    return ids[-(block_size - 1) :]


def slide_window(context: Sequence[int], block_size: int) -> list[int]:
    """A full context restarts from its newest half, as nanoGPT's sliding crop would."""
    return list(context)[-(block_size // 2) :]


class StopScanner:
    """Finds stop strings in streamed text; holds back text that may start one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.buf = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Text safe to emit now, and whether a stop string was found (emission ends there)."""
        self.buf += text
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf = self.buf[: min(hits)], ""
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.buf)), hold, -1):
                if self.buf.endswith(s[:k]):
                    hold = k
                    break
        cut = len(self.buf) - hold
        out, self.buf = self.buf[:cut], self.buf[cut:]
        return out, False

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


class ReplyText:
    """One reply's tokens to text: UTF-8-safe decoding, then stop strings (see the module docstring)."""

    def __init__(self, tokenizer: "Tokenizer", params: "SamplingParams") -> None:
        self.scanner = StopScanner(list(params.stop) + (["\n"] if params.stop_at_newline else []))
        self.decoder = tokenizer.stream_decoder()

    def push(self, token: int) -> tuple[str, bool]:
        """Text safe to emit after `token`, and whether a stop was reached (emit nothing more)."""
        return self.scanner.feed(self.decoder.push(token))

    def finish(self) -> str:
        """What is left to emit when generation ends without a stop."""
        text, stopped = self.scanner.feed(self.decoder.flush())
        return text if stopped else text + self.scanner.flush()
