"""Split a reply into messages that fit a platform's length limit.

Where to cut, best first: between paragraphs, after a sentence, at a line
break, between words; a hard cut only when one word is longer than the limit.
A cut never falls inside a fenced code block (```) when cutting before or
after the block works; a block that is itself too long is cut at a line
break, and the fence is closed at the end of one chunk and reopened (with its
language tag) at the start of the next, so every chunk renders as code.
"""

from __future__ import annotations

import re

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})[^\n]*$", re.MULTILINE)
# Cut positions by preference; for each match, the cut goes at `_cut_at(match)`.
_PARAGRAPH = re.compile(r"\n[ \t]*\n")
_SENTENCE = re.compile(r"[.!?\u2026\u3002][\"'\u201d\u2019)\]]*(?=\s)")
_LINE = re.compile(r"\n")
_WORD = re.compile(r"\s")
_BOUNDARIES = (_PARAGRAPH, _SENTENCE, _LINE, _WORD)

MIN_LIMIT = 16  # room for a fence pair around at least a few characters


def split_message(text: str, limit: int) -> list[str]:
    """Cut `text` into chunks of at most `limit` characters; whitespace-only text gives []."""
    if limit < MIN_LIMIT:
        raise ValueError(f"limit must be at least {MIN_LIMIT} characters, got {limit}")
    text = text.strip("\n").rstrip()
    chunks: list[str] = []
    while len(text) > limit:
        head, text = _cut(text, limit)
        if head.strip():
            chunks.append(head)
    if text.strip():
        chunks.append(text)
    return chunks


def _code_spans(text: str) -> list[tuple[int, int, str]]:
    """(start, end, opening fence line) of each fenced block; an unclosed block runs to the end."""
    spans, opened = [], None
    for m in _FENCE.finditer(text):
        fence = m.group(1)
        if opened is None:
            opened = (m.start(), m.group(0).strip(), fence)
        elif fence[0] == opened[2][0] and len(fence) >= len(opened[2]) and m.group(0).strip() == fence:
            spans.append((opened[0], m.end(), opened[1]))
            opened = None
    if opened is not None:
        spans.append((opened[0], len(text), opened[1]))
    return spans


def _cut(text: str, limit: int) -> tuple[str, str]:
    """Return (first chunk, rest) for a text longer than `limit`."""
    spans = _code_spans(text)
    inside = lambda p: any(s < p < e for s, e, _ in spans)  # noqa: E731
    window = text[: limit + 1]

    best_any = 0
    for pattern in _BOUNDARIES:
        positions = [
            p for m in pattern.finditer(window)
            if 0 < (p := m.end() if pattern is _SENTENCE else m.start()) <= limit and not inside(p)
        ]
        if positions:
            best = max(positions)
            # A boundary this far back wastes most of a message: try a finer one first.
            if best >= limit // 2:
                return _prose_cut(text, best)
            best_any = max(best_any, best)

    block = next(((s, e, opener) for s, e, opener in spans if s < limit and e > limit), None)
    if block is not None and block[0] > 0:
        return _prose_cut(text, block[0])  # keep the whole block for the next chunk
    if block is not None:
        return _code_cut(text, limit, block)
    if best_any:
        return _prose_cut(text, best_any)
    return text[:limit], text[limit:]


def _prose_cut(text: str, p: int) -> tuple[str, str]:
    return text[:p].rstrip(), text[p:].lstrip(" \t").lstrip("\n")


def _code_cut(text: str, limit: int, block: tuple[int, int, str]) -> tuple[str, str]:
    """Cut inside a too-long code block that starts the text; close and reopen its fence."""
    _, _, opener = block
    fence = re.match(r"\s*(`{3,}|~{3,})", opener).group(1)
    if len(opener) + len(fence) + MIN_LIMIT // 2 > limit:  # no room to repeat the fence: plain cut
        return text[:limit], text[limit:]
    room = limit - len(fence) - 1  # the chunk gets "\n" + fence appended
    first_line_end = text.find("\n")
    p = text.rfind("\n", 0, room + 1)
    if p <= first_line_end:  # one code line longer than the room: cut it hard
        p = room
        head, rest = text[:p], text[p:]
    else:
        head, rest = text[:p], text[p + 1 :]
    return f"{head.rstrip(chr(10))}\n{fence}", f"{opener}\n{rest}"
