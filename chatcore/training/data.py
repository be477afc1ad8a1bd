"""Training data: exchanges in, token stream with a loss mask out.

Where exchanges come from: the history store (`from_store`) or a JSONL file in the
seed format, one ``{"user": ..., "assistant": ...}`` object a line (`load_jsonl`);
optional keys ``conversation``, ``user_id`` and ``bad`` are honoured.

What a document is: one conversation, its exchanges in order, each rendered by
`chatcore.prompt.render_exchange` (the renderer serving uses), with
``<|endoftext|>`` between documents. A whole conversation is tokenized at once, so
the token boundaries between turns are exactly those the model sees when earlier
turns precede a prompt.

The split is by conversation and stable: a conversation's side depends only on a
hash of its key and the seed, so it stays on that side as the data grows and the
promotion gate's validation set is never trained on by any fine-tune.

Guards (`GuardConfig`) each report what they removed (`GuardReport`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from ..prompt import ASSISTANT, HUMAN, TURN_SEPARATOR, clean
from .options import GuardConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingExchange:
    """One user message and the bot's reply, with what the guards need to judge it."""

    user: str
    assistant: str
    conversation: str  # exchanges of one conversation stay together (split, document)
    user_id: str | None = None  # None: anonymous (seed files); never capped or forgotten
    bad: bool = False  # a user marked the reply bad
    id: int | None = None  # store row id, when it came from the store
    created_at: float | None = None  # unix time it was said (per-day cap); None: unknown, never capped
    trainable: bool = True  # consent: trainable when said and the user has not since withdrawn
    first_seen: float | None = None  # when its user was first seen (quarantine); None: unknown


@dataclass
class BadLine:
    line: int
    error: str


# --- sources ------------------------------------------------------------------------


def load_jsonl(path: str | Path) -> tuple[list[TrainingExchange], list[BadLine]]:
    """Read a seed-format chat_history.jsonl; broken lines are skipped and returned with their numbers.

    Lines without a ``conversation`` key are each their own conversation.
    """
    path = Path(path)
    exchanges: list[TrainingExchange] = []
    bad: list[BadLine] = []
    with path.open("r", encoding="utf-8", errors="replace") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
                if not isinstance(obj, dict):
                    raise ValueError("not a JSON object")
                user, assistant = obj.get("user"), obj.get("assistant")
                if not isinstance(user, str) or not isinstance(assistant, str):
                    raise ValueError('needs string "user" and "assistant"')
                conv = obj.get("conversation")
                uid = obj.get("user_id")
                exchanges.append(TrainingExchange(
                    user=user, assistant=assistant,
                    conversation=str(conv) if conv is not None else f"{path.name}:{n}",
                    user_id=str(uid) if uid is not None else None,
                    bad=bool(obj.get("bad", False)),
                ))
            except ValueError as exc:  # json.JSONDecodeError is a ValueError
                bad.append(BadLine(n, str(exc)))
    if bad:
        log.warning("%s: skipped %d broken line(s): %s", path, len(bad),
                    ", ".join(str(b.line) for b in bad[:20]) + (" ..." if len(bad) > 20 else ""))
    return exchanges, bad


def from_store(store: Any, since_id: int = 0) -> list[TrainingExchange]:
    """Every exchange the store offers for training, oldest first.

    Forgotten users' rows are gone from the store and opted-out users' are left out
    by `Store.exchanges`; a reply whose votes sum below zero counts as marked bad.
    `trainable` is the decision stored when it was said (chatcore.consent), and False
    for a user who has since said /learn off: the ``no_consent`` guard drops those.
    """
    excluded = store.excluded_users()
    first_seen = store.first_seen()
    return [
        TrainingExchange(user=e.user_text, assistant=e.reply_text,
                 # An imported chat_history.jsonl lands as one conversation, but its lines are
                 # independent exchanges (the seed format has no boundaries): one document each.
                 conversation=f"import:{e.id}" if e.source == "import" else f"store:{e.conversation_id}",
                 user_id=None if e.source == "import" else e.user_key, bad=e.feedback < 0, id=e.id,
                 created_at=e.created_at, trainable=e.trainable and e.user_key not in excluded,
                 first_seen=None if e.source == "import" else first_seen.get(e.user_key))
        for e in store.exchanges(since_id=since_id)
    ]


# --- guards -------------------------------------------------------------------------


@dataclass
class GuardReport:
    kept: int = 0
    removed: dict[str, int] = field(default_factory=dict)

    def add(self, guard: str, n: int) -> None:
        self.removed[guard] = self.removed.get(guard, 0) + n

    def __str__(self) -> str:
        parts = ", ".join(f"{k}: {v}" for k, v in self.removed.items() if v) or "nothing"
        return f"kept {self.kept} exchange(s); removed {parts}"


_NEAR = re.compile(r"[\W_]+", re.UNICODE)


def _near_key(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold()
    return _NEAR.sub(" ", text).strip()


def apply_guards(exchanges: Sequence[TrainingExchange], cfg: GuardConfig | None = None,
                 now: float | None = None) -> tuple[list[TrainingExchange], GuardReport]:
    """Filter `exchanges` (order kept); the report counts what each guard removed. `now` dates the quarantine."""
    cfg = cfg or GuardConfig()
    report = GuardReport(removed={"no_consent": 0, "excluded_user": 0, "bad": 0, "too_short": 0,
                                  "quarantine": 0, "brigade": 0, "user_daily_cap": 0,
                                  "exact_duplicate": 0, "near_duplicate": 0, "user_share": 0})
    out: list[TrainingExchange] = []
    seen_exact: set[tuple[str, str]] = set()
    seen_near: set[tuple[str, str]] = set()
    brigades = _brigades(exchanges, cfg.brigade_min_users)
    brigade_seen: set[str] = set()
    per_day: Counter[tuple[str, int]] = Counter()
    now = time.time() if now is None else now
    for ex in exchanges:
        if not ex.trainable:  # consent is not a guard one can switch off
            report.add("no_consent", 1)
            continue
        if ex.user_id is not None and ex.user_id in cfg.excluded_users:
            report.add("excluded_user", 1)
            continue
        if cfg.quarantine_days and ex.first_seen is not None and now - ex.first_seen < cfg.quarantine_days * 86400:
            report.add("quarantine", 1)
            continue
        key = _near_key(ex.user)
        if key in brigades:
            if key in brigade_seen:
                report.add("brigade", 1)
                continue
            brigade_seen.add(key)
        if cfg.max_per_user_per_day is not None and ex.user_id is not None and ex.created_at is not None:
            day = (ex.user_id, int(ex.created_at // 86400))
            if per_day[day] >= cfg.max_per_user_per_day:
                report.add("user_daily_cap", 1)
                continue
            per_day[day] += 1
        if cfg.drop_bad and ex.bad:
            report.add("bad", 1)
            continue
        u, a = clean(ex.user), clean(ex.assistant)
        if len(u) < cfg.min_user_chars or len(a) < cfg.min_assistant_chars:
            report.add("too_short", 1)
            continue
        if cfg.drop_exact_duplicates:
            if (u, a) in seen_exact:
                report.add("exact_duplicate", 1)
                continue
            seen_exact.add((u, a))
        if cfg.drop_near_duplicates:
            key = (_near_key(u), _near_key(a))
            if key in seen_near:
                report.add("near_duplicate", 1)
                continue
            seen_near.add(key)
        out.append(ex)
    if cfg.max_user_share is not None:
        out, capped = _cap_user_share(out, cfg.max_user_share)
        report.add("user_share", capped)
    report.kept = len(out)
    return out, report


def _brigades(exchanges: Sequence[TrainingExchange], min_users: int | None) -> set[str]:
    """Near-identical user texts (case, punctuation, spacing folded) sent by at least `min_users` users."""
    if not min_users or min_users < 2:
        return set()
    senders: dict[str, set[str]] = defaultdict(set)
    for ex in exchanges:
        if ex.user_id is not None:
            senders[_near_key(ex.user)].add(ex.user_id)
    return {key for key, users in senders.items() if len(users) >= min_users and key}


def _cap_user_share(exchanges: list[TrainingExchange], share: float) -> tuple[list[TrainingExchange], int]:
    """Drop a dominant user's oldest exchanges until they hold at most `share` of the set.

    With a single known user there is nobody to be fair to, so nothing is capped.
    """
    if not 0 < share < 1:
        return exchanges, 0
    counts = Counter(ex.user_id for ex in exchanges if ex.user_id is not None)
    if len(counts) < 2:
        return exchanges, 0
    total = len(exchanges)
    allowed: dict[str, int] = {}
    for uid, c in counts.most_common():
        others = total - c
        # c' / (c' + others) <= share  <=>  c' <= share * others / (1 - share)
        cap = max(1, math.floor(share * others / (1 - share) + 1e-9))
        if c > cap:
            allowed[uid] = cap
            total -= c - cap
    if not allowed:
        return exchanges, 0
    kept_rev: list[TrainingExchange] = []
    used: dict[str, int] = defaultdict(int)
    for ex in reversed(exchanges):  # keep the newest
        if ex.user_id in allowed:
            if used[ex.user_id] >= allowed[ex.user_id]:
                continue
            used[ex.user_id] += 1
        kept_rev.append(ex)
    return kept_rev[::-1], len(exchanges) - len(kept_rev)


# --- split --------------------------------------------------------------------------


def _unit(key: str, seed: int) -> float:
    h = hashlib.sha256(f"{seed}:{key}".encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def split_by_conversation(exchanges: Sequence[TrainingExchange], val_fraction: float = 0.1,
                          seed: int = 1337) -> tuple[list[TrainingExchange], list[TrainingExchange]]:
    """Deterministic train/validation split; a conversation is wholly on one side.

    A conversation goes to validation when its hash falls under `val_fraction`, so its
    side never changes as data grows. With two or more conversations and none drawn,
    the lowest-hash one goes to validation so that there is always something to judge on.
    """
    convs = {ex.conversation for ex in exchanges}
    val = {c for c in convs if _unit(c, seed) < val_fraction}
    if not val and len(convs) >= 2 and val_fraction > 0:
        val = {min(convs, key=lambda c: _unit(c, seed))}
    train = [ex for ex in exchanges if ex.conversation not in val]
    held = [ex for ex in exchanges if ex.conversation in val]
    return train, held


# --- tokens -------------------------------------------------------------------------


class TokenizerLike(Protocol):
    """What this module needs of `chatcore.tokenizer.Tokenizer` (plain-text encode)."""

    eot_token: int

    def encode(self, text: str) -> list[int]: ...
    def token_bytes(self, token: int) -> bytes: ...


@dataclass
class TokenData:
    """A flat token stream and, per token, whether it is a training target (1) or context (0)."""

    tokens: torch.Tensor  # int64 [N]
    mask: torch.Tensor  # bool [N]: loss counted where the TARGET token has mask 1
    documents: int = 0

    def __len__(self) -> int:
        return int(self.tokens.numel())

    @property
    def target_tokens(self) -> int:
        return int(self.mask[1:].sum())


def group_conversations(exchanges: Iterable[TrainingExchange]) -> list[list[TrainingExchange]]:
    """Conversations in first-seen order, exchanges in their original order."""
    groups: dict[str, list[TrainingExchange]] = {}
    for ex in exchanges:
        groups.setdefault(ex.conversation, []).append(ex)
    return list(groups.values())


def render_document(conversation: Sequence[TrainingExchange]) -> tuple[str, list[tuple[int, int]]]:
    """Render one conversation; also the character spans that are the assistant's (reply + separator)."""
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0
    for ex in conversation:
        # Same text as prompt.render_exchange, built in two halves to know where the reply starts.
        head = f"{HUMAN} {clean(ex.user)}\n{ASSISTANT}"
        tail = f" {clean(ex.assistant)}{TURN_SEPARATOR}"
        parts += [head, tail]
        spans.append((pos + len(head), pos + len(head) + len(tail)))
        pos += len(head) + len(tail)
    return "".join(parts), spans


def _token_owner_mask(tok: TokenizerLike, text: str, ids: list[int], spans: list[tuple[int, int]]) -> list[bool]:
    # Byte offsets of each token; a token belongs to the reply when it starts inside a reply span.
    byte_spans = [(len(text[:a].encode("utf-8")), len(text[:b].encode("utf-8"))) for a, b in spans]
    mask = []
    pos = 0
    j = 0
    for t in ids:
        while j < len(byte_spans) and pos >= byte_spans[j][1]:
            j += 1
        mask.append(j < len(byte_spans) and byte_spans[j][0] <= pos < byte_spans[j][1])
        pos += len(tok.token_bytes(t))
    return mask


def tokenize(exchanges: Sequence[TrainingExchange], tok: TokenizerLike, loss_on: str = "assistant") -> TokenData:
    """Documents joined by end-of-text; `loss_on` is ``"assistant"`` (reply tokens) or ``"all"``."""
    if loss_on not in ("assistant", "all"):
        raise ValueError(f'loss_on must be "assistant" or "all", not {loss_on!r}')
    tokens: list[int] = []
    mask: list[bool] = []
    docs = group_conversations(exchanges)
    for conv in docs:
        text, spans = render_document(conv)
        ids = tok.encode(text)  # plain text: encode_ordinary underneath
        m = [True] * len(ids) if loss_on == "all" else _token_owner_mask(tok, text, ids, spans)
        tokens += ids
        mask += m
        tokens.append(tok.eot_token)
        mask.append(True)  # end of a document is the reply's end too
    return TokenData(torch.tensor(tokens, dtype=torch.long), torch.tensor(mask, dtype=torch.bool), len(docs))


def data_hash(exchanges: Sequence[TrainingExchange]) -> str:
    """A content hash of the training set for provenance."""
    h = hashlib.sha256()
    for ex in exchanges:
        h.update(json.dumps([ex.conversation, clean(ex.user), clean(ex.assistant)], ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


# --- batches ------------------------------------------------------------------------


def get_batch(data: TokenData, batch_size: int, block_size: int,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows (nanoGPT style): inputs and targets, targets set to -1 where not trained on."""
    n = len(data)
    if n < 2:
        raise ValueError("training data has fewer than two tokens")
    block = min(block_size, n - 1)
    ix = torch.randint(n - block, (batch_size,), generator=generator)
    x = torch.stack([data.tokens[i:i + block] for i in ix.tolist()])
    y = torch.stack([data.tokens[i + 1:i + 1 + block] for i in ix.tolist()])
    m = torch.stack([data.mask[i + 1:i + 1 + block] for i in ix.tolist()])
    return x, y.masked_fill(~m, -1)


def eval_batches(data: TokenData, batch_size: int, block_size: int,
                 max_batches: int | None = None) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive non-overlapping windows covering the whole stream (a stable validation loss)."""
    n = len(data)
    block = min(block_size, n - 1)
    starts = list(range(0, n - 1, block))
    if max_batches is not None:
        starts = starts[: max_batches * batch_size]
    for b in range(0, len(starts), batch_size):
        xs, ys = [], []
        for s in starts[b:b + batch_size]:
            e = min(s + block, n - 1)
            x = data.tokens[s:e]
            y = data.tokens[s + 1:e + 1].masked_fill(~data.mask[s + 1:e + 1], -1)
            pad = block - len(x)
            if pad:
                x = torch.cat([x, torch.zeros(pad, dtype=torch.long)])
                y = torch.cat([y, torch.full((pad,), -1, dtype=torch.long)])
            xs.append(x)
            ys.append(y)
        yield torch.stack(xs), torch.stack(ys)


@dataclass
class Dataset:
    """Everything a fine-tune needs: both splits as tokens, and their provenance."""

    train: TokenData
    val: TokenData
    train_exchanges: int
    val_exchanges: int
    guard_report: GuardReport
    bad_lines: list[BadLine]
    hash: str
    lineage: dict[str, Any] = field(default_factory=dict)  # see `lineage_manifest`

    def summary(self) -> dict[str, Any]:
        return {
            "train_exchanges": self.train_exchanges, "val_exchanges": self.val_exchanges,
            "train_tokens": len(self.train), "val_tokens": len(self.val),
            "guards": dict(self.guard_report.removed), "bad_lines": [asdict(b) for b in self.bad_lines],
            "data_hash": self.hash,
        }


def build_dataset(exchanges: Sequence[TrainingExchange], tok: TokenizerLike, *, guards: GuardConfig | None = None,
                  loss_on: str = "assistant", val_fraction: float = 0.1, seed: int = 1337,
                  bad_lines: list[BadLine] | None = None) -> Dataset:
    kept, report = apply_guards(exchanges, guards)
    log.info("data guards: %s", report)
    train, val = split_by_conversation(kept, val_fraction, seed)
    return Dataset(
        # Validation is always scored on reply tokens: that is what serving is judged on.
        train=tokenize(train, tok, loss_on), val=tokenize(val, tok, "assistant"),
        train_exchanges=len(train), val_exchanges=len(val), guard_report=report,
        bad_lines=list(bad_lines or []), hash=data_hash(kept), lineage=lineage_manifest(train, val),
    )


def lineage_manifest(train: Sequence[TrainingExchange], val: Sequence[TrainingExchange]) -> dict[str, Any]:
    """Exactly which stored exchanges (and whose) a checkpoint was trained on, content-addressed.

    ``manifest`` is the SHA-256 of the sorted training exchange ids, so two checkpoints
    trained on the same rows name the same manifest; validation rows only chose the
    best step, they are listed apart. Rows from JSONL files have no id: counted only.
    """
    ids = sorted(ex.id for ex in train if ex.id is not None)
    digest = hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()
    return {
        "manifest": f"sha256:{digest}",
        "exchange_ids": ids,
        "users": sorted({ex.user_id for ex in train if ex.user_id is not None and ex.id is not None}),
        "file_rows": sum(1 for ex in train if ex.id is None),
        "val_exchange_ids": sorted(ex.id for ex in val if ex.id is not None),
    }
