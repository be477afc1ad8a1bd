"""The one renderer of the chat format, shared by serving and training.

Format (the seed's): a prompt is ``Human: {message}\\nAssistant:`` and a training
document is ``Human: {user}\\nAssistant: {assistant}\\n\\n``. Earlier turns of a
conversation are rendered exactly like training documents and precede the prompt,
so what the model sees when it serves is what it learned from.

How user text is kept plain (`clean`), in this order:

1. Unicode format characters (category Cf: zero-width spaces and joiners,
   direction marks, soft hyphens, BOMs) are removed, so ``Hu\\u200bman:`` cannot
   hide a marker.
2. NFKC normalisation folds compatibility lookalikes (fullwidth ``Ｈｕｍａｎ：``,
   ligatures, ...) into the plain letters they stand for.
3. Every line break (``\\r``, ``\\n``, ``\\v``, ``\\f``, U+0085, U+2028, U+2029) and
   every other control character becomes a space, and runs of spaces collapse:
   the text is one line, so it can never start a new turn.
4. A role word followed by a colon (``human:``, ``Assistant :``, any case) gets
   its colon replaced by `` -`` (``Human -``), so even mid-line the model never
   reads a turn marker inside user text.

`<|endoftext|>` needs no treatment here: the tokenizer encodes all text as
ordinary text, so it can never become the special token.
The history store always keeps the original, unmodified text.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence

from .message import Prompt

HUMAN = "Human:"
ASSISTANT = "Assistant:"
TURN_SEPARATOR = "\n\n"

_ROLE_MARKER = re.compile(r"\b(human|assistant)\s*:", re.IGNORECASE)
_SPACES = re.compile(r"\s+")


def clean(text: str) -> str:
    """Make user (or generated) text safe to place inside one turn."""
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Cf")
    text = unicodedata.normalize("NFKC", text)
    text = "".join(" " if unicodedata.category(ch) == "Cc" or ch in "\u2028\u2029" else ch for ch in text)
    text = _SPACES.sub(" ", text).strip()
    return _ROLE_MARKER.sub(lambda m: f"{m.group(1)} -", text)


def render_prompt(message: str) -> str:
    """The prompt for one message: ``Human: {message}\\nAssistant:``."""
    return f"{HUMAN} {clean(message)}\n{ASSISTANT}"


def render_persona(persona: str | None) -> str:
    """A scope's persona: one plain line and a turn separator (it can never open a turn of its own)."""
    text = clean(persona or "")
    return f"{text}{TURN_SEPARATOR}" if text else ""


def render_exchange(user: str, assistant: str) -> str:
    """One finished exchange, as trained on and as earlier turns in a prompt."""
    return f"{HUMAN} {clean(user)}\n{ASSISTANT} {clean(assistant)}{TURN_SEPARATOR}"


def build_prompt(
    message: str,
    history: Sequence[tuple[str, str]],
    count_tokens: Callable[[str], int],
    budget: int,
    persona: str | None = None,
) -> Prompt:
    """Render `message` after as many of the newest `history` turns as fit in `budget` tokens.

    `history` is oldest first. When the message alone is over budget, its end is
    kept (the question usually comes last) and no history is included. A scope's
    `persona` (chatcore.scopes) opens the prompt, cleaned like user text, when it fits.
    """
    head = render_persona(persona)
    if head:
        reserve = count_tokens(head + HUMAN) - count_tokens(HUMAN)  # as it tokenizes before the first turn
        if reserve + count_tokens(render_prompt(message)) <= budget:
            prompt = build_prompt(message, history, count_tokens, budget - reserve)
            if count_tokens(head + prompt.text) <= budget:
                return Prompt(text=head + prompt.text, turns=prompt.turns)
    text = render_prompt(message)
    if count_tokens(text) > budget:
        return Prompt(text=_truncate_front(message, count_tokens, budget), turns=[])
    kept: list[tuple[str, str]] = []
    for user, assistant in reversed(history):
        # Count the text as it will be sent, not each turn alone: a turn's closing "\n\n" is one
        # token at the end of a string but two before the next "Human" (tokens merge across turns).
        longer = render_exchange(user, assistant) + text
        if count_tokens(longer) > budget:
            break
        text = longer
        kept.append((user, assistant))
    kept.reverse()
    return Prompt(text=text, turns=kept)


def _truncate_front(message: str, count_tokens: Callable[[str], int], budget: int) -> str:
    """Drop the start of an over-long message until its prompt fits `budget` tokens."""
    text = clean(message)
    # Ordinary text averages about four characters a token: eight per token of
    # budget is plenty, so a 1 MB message costs one slice and a short search.
    text = text[-budget * 8 :]
    lo, hi = 0, len(text)  # find the smallest cut that fits
    while lo < hi:
        mid = (lo + hi) // 2
        if count_tokens(f"{HUMAN} {text[mid:]}\n{ASSISTANT}") <= budget:
            hi = mid
        else:
            lo = mid + 1
    return f"{HUMAN} {text[lo:].lstrip()}\n{ASSISTANT}"
