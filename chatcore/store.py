"""The SQLite history store: conversations, exchanges, feedback, opt-outs, fine-tune marks.

One file (WAL mode) shared by the bot and the trainer process, each with its own
`Store`. The schema is versioned with ``PRAGMA user_version`` and an ordered list
of migrations; a migration, once released, never changes: new needs get a new one.

Tables (schema 2):

- ``conversations``: one per adapter + channel + user; ``/reset`` ends the current
  one (``ended_at``) and the next exchange starts a new one.
- ``exchanges``: user text and reply exactly as sent (never cleaned), timestamps,
  the model id and sampler settings (JSON) that produced the reply.
- ``platform_messages``: the platform ids a reply was delivered as (a long reply may
  be split into several), so reactions map back to their exchange.
- ``feedback``: one vote (+1/-1) per user per exchange; the last vote wins.
- ``opted_out``: users who asked to be forgotten; training never includes them.
- ``finetunes``: one row per fine-tune; ``up_to_id`` is the newest exchange it saw,
  so "exchanges since the last fine-tune" is a query, persisted by construction.

Schema 3 (consent, see `chatcore.consent` and docs/privacy.md): each exchange
also records its ``workspace`` (guild / team), the training ``policy`` and the
user's ``consent`` when it was said, and whether it was ``trainable`` then;
``consent`` holds each user's /learn answer, ``users`` when a user was first
seen (the quarantine guard), ``forgotten`` who ran /forget and when (lineage).

Every method is thread-safe (one connection behind a lock). Async code calls them
through `Store.run`, on the store's own thread, so a database locked by another
process (an import, the trainer, an sqlite3 shell) delays the exchange, up to
`busy_timeout` seconds (config ``store.busy_timeout_s``), and never blocks the
event loop. Failures of SQLite itself (locked past that bound, read-only, not a
database, disk full) surface as `StoreError` with a clear message.

Every write checks, before it starts and once committed, that the database file
(and its ``-wal`` and ``-shm`` files) at the path is still the one that was opened:
a file deleted or replaced while the bot runs would swallow every later write
unseen (or overlay a restored backup with our WAL). The store then refuses every
call with `StoreError` and logs why at CRITICAL; nothing is acknowledged as stored
that a restart would not find.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import io
import json
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .message import Message
from .params import SamplingParams

log = logging.getLogger("chatcore")

# How long a write waits for a database another process holds locked (SQLite's busy handler
# retries with backoff) before it fails: an exchange is delayed up to this long, never lost to a lock.
BUSY_TIMEOUT_S = 30.0
# A history line longer than this is skipped on import without ever being held in memory whole.
MAX_IMPORT_LINE_BYTES = 16 << 20
# Lines parsed per transaction into the import's staging table.
IMPORT_BATCH = 10_000


class StoreError(Exception):
    """The history database cannot be used: locked, read-only, not a database, too new, ..."""


# Ordered migrations: MIGRATIONS[i] takes the schema from version i to i + 1.
MIGRATIONS: list[tuple[str, ...]] = [
    # 1: the first release.
    (
        """CREATE TABLE conversations (
            id INTEGER PRIMARY KEY,
            adapter TEXT NOT NULL,
            channel TEXT NOT NULL,
            user TEXT NOT NULL,
            started_at REAL NOT NULL,
            ended_at REAL
        )""",
        "CREATE INDEX conversations_by_key ON conversations (adapter, channel, user, id)",
        """CREATE TABLE exchanges (
            id INTEGER PRIMARY KEY,
            conversation_id INTEGER NOT NULL REFERENCES conversations (id),
            user_text TEXT NOT NULL,
            reply_text TEXT NOT NULL,
            created_at REAL NOT NULL,
            replied_at REAL NOT NULL,
            model_id TEXT,
            params TEXT NOT NULL DEFAULT '{}'
        )""",
        "CREATE INDEX exchanges_by_conversation ON exchanges (conversation_id, id)",
        """CREATE TABLE finetunes (
            id INTEGER PRIMARY KEY,
            at REAL NOT NULL,
            checkpoint TEXT,
            up_to_id INTEGER NOT NULL
        )""",
    ),
    # 2: feedback, delivery ids, opt-outs (/forget), and where an exchange came from.
    (
        "ALTER TABLE exchanges ADD COLUMN source TEXT NOT NULL DEFAULT 'chat'",
        """CREATE TABLE platform_messages (
            adapter TEXT NOT NULL,
            platform_message_id TEXT NOT NULL,
            exchange_id INTEGER NOT NULL REFERENCES exchanges (id) ON DELETE CASCADE,
            PRIMARY KEY (adapter, platform_message_id)
        )""",
        "CREATE INDEX platform_messages_by_exchange ON platform_messages (exchange_id)",
        """CREATE TABLE feedback (
            exchange_id INTEGER NOT NULL REFERENCES exchanges (id) ON DELETE CASCADE,
            user_key TEXT NOT NULL,
            value INTEGER NOT NULL,
            at REAL NOT NULL,
            PRIMARY KEY (exchange_id, user_key)
        )""",
        "CREATE INDEX feedback_by_user ON feedback (user_key)",
        "CREATE TABLE opted_out (user_key TEXT PRIMARY KEY, at REAL NOT NULL)",
        "CREATE INDEX conversations_by_user ON conversations (adapter, user)",
    ),
    # 3: consent and provenance (see chatcore.consent). Rows logged before it keep training only where
    # the new defaults would allow it: never Discord or Slack, never anonymous HTTP.
    (
        "ALTER TABLE exchanges ADD COLUMN workspace TEXT",
        "ALTER TABLE exchanges ADD COLUMN policy TEXT",  # off | opt_in | opt_out when said; NULL: not recorded
        "ALTER TABLE exchanges ADD COLUMN consent TEXT",  # the user's /learn state when said: yes | no | unset
        "ALTER TABLE exchanges ADD COLUMN trainable INTEGER NOT NULL DEFAULT 1",
        """UPDATE exchanges SET trainable = 0 WHERE conversation_id IN (SELECT id FROM conversations
            WHERE adapter IN ('discord', 'slack') OR (adapter = 'http' AND user = 'anonymous'))""",
        "CREATE INDEX exchanges_by_created ON exchanges (created_at)",
        """CREATE TABLE consent (
            user_key TEXT PRIMARY KEY,
            state TEXT NOT NULL CHECK (state IN ('yes', 'no')),
            at REAL NOT NULL
        )""",
        # First sight of a user outlives retention, so an old member is never re-quarantined.
        "CREATE TABLE users (user_key TEXT PRIMARY KEY, first_seen REAL NOT NULL)",
        """INSERT OR IGNORE INTO users (user_key, first_seen)
            SELECT adapter || ':' || user, MIN(started_at) FROM conversations GROUP BY adapter, user""",
        # Who asked to be forgotten, and when: lineage flags checkpoints trained before that.
        "CREATE TABLE forgotten (user_key TEXT PRIMARY KEY, at REAL NOT NULL)",
    ),
]
SCHEMA_VERSION = len(MIGRATIONS)


@dataclass(frozen=True)
class Exchange:
    """One user message and the bot's reply, as stored."""

    id: int
    conversation_id: int
    adapter: str
    channel: str
    user: str  # the platform's user id
    user_text: str
    reply_text: str
    created_at: float  # unix time the message arrived
    replied_at: float
    model_id: str | None
    params: dict = field(hash=False)  # sampler settings as stored
    feedback: int = 0  # sum of votes; 0 when none
    platform_message_id: str | None = None  # the first id the reply was delivered as
    source: str = "chat"  # "chat" or "import"
    workspace: str | None = None  # guild / team id when said
    policy: str | None = None  # the training policy when said (None: logged without provenance)
    consent: str | None = None  # the user's /learn state when said: "yes", "no" or "unset"
    trainable: bool = True  # whether policy and consent allowed training when it was said

    @property
    def user_key(self) -> str:
        """The user's id across the bot, as in `Message.user_key`."""
        return f"{self.adapter}:{self.user}"


@dataclass
class ImportReport:
    """What `Store.import_jsonl` did: rows imported and (line number, reason) of lines skipped."""

    imported: int = 0
    skipped: list[tuple[int, str]] = field(default_factory=list)


_EXCHANGE_SELECT = """
    SELECT e.id, e.conversation_id, c.adapter, c.channel, c.user, e.user_text, e.reply_text,
           e.created_at, e.replied_at, e.model_id, e.params,
           COALESCE((SELECT SUM(f.value) FROM feedback f WHERE f.exchange_id = e.id), 0),
           (SELECT p.platform_message_id FROM platform_messages p
             WHERE p.exchange_id = e.id ORDER BY p.rowid LIMIT 1),
           e.source, e.workspace, e.policy, e.consent, e.trainable = 1
    FROM exchanges e JOIN conversations c ON c.id = e.conversation_id
"""
_NOT_OPTED_OUT = "(c.adapter || ':' || c.user) NOT IN (SELECT user_key FROM opted_out)"
# Trainable when said, and the user has not since opted out, withdrawn consent or been forgotten.
_TRAINABLE = (f"e.trainable = 1 AND {_NOT_OPTED_OUT} AND (c.adapter || ':' || c.user) NOT IN "
              "(SELECT user_key FROM consent WHERE state = 'no')")
_SURROGATES = re.compile("[\ud800-\udfff]")


def _plain_text(text: str) -> str:
    """Lone surrogates (from undecodable bytes) cannot be stored as UTF-8: make them U+FFFD."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return _SURROGATES.sub("\ufffd", text)


def _params_json(params: SamplingParams | dict | None) -> str:
    if params is None:
        return "{}"
    if isinstance(params, SamplingParams):
        params = dataclasses.asdict(params)
    if not isinstance(params, dict):
        raise TypeError(f"params must be SamplingParams, dict or None, not {type(params).__name__}")
    try:
        return json.dumps(params, ensure_ascii=False, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"sampler params are not JSON-serialisable: {err}") from None


def _exchange(row: tuple) -> Exchange:
    return Exchange(*row[:10], json.loads(row[10]), *row[11:-1], bool(row[-1]))


def _lines(f: IO, limit: int) -> Iterator[tuple[int, bytes | str | None]]:
    """(number, line) for each line of `f`, split on "\\n" only; a line over `limit` is (number, None), never read whole."""
    if not hasattr(f, "readline"):  # any iterable of lines
        for number, line in enumerate(f, start=1):
            yield number, None if len(line) > limit + 1 else line
        return
    number = 0
    while line := f.readline(limit + 1):
        number += 1
        if len(line) > limit and line[-1:] not in ("\n", b"\n"):
            while line and line[-1:] not in ("\n", b"\n"):  # skip the rest of it, a piece at a time
                line = f.readline(limit + 1)
            yield number, None
        else:
            yield number, line


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _writable(path: Path) -> bool:
    # effective_ids: a process that dropped privileges is judged as what it now is.
    if os.access in os.supports_effective_ids:
        return os.access(path, os.W_OK, effective_ids=True)
    return os.access(path, os.W_OK)


class Store:
    """The history store on one SQLite file; open one per process."""

    def __init__(self, path: str | os.PathLike, *, timeout: float = BUSY_TIMEOUT_S, read_only: bool = False):
        """Open (creating file and folders if needed), switch to WAL and migrate; `read_only` never writes.

        `timeout`: seconds a call waits for a database locked by another process before StoreError.
        """
        self.path = str(path)
        self.timeout = timeout
        self.read_only = read_only
        self._lock = threading.RLock()
        self._db: sqlite3.Connection | None = None
        self._files: dict[str, tuple[int, int]] = {}  # path -> (st_dev, st_ino) of the files opened
        self._lost: str | None = None  # why the store refuses every call, once its file is gone
        self._thread: ThreadPoolExecutor | None = None  # the thread `run` calls the store on
        # Guards `_thread` only: `_lock` may be held for seconds by a call waiting on a busy database.
        self._thread_lock = threading.Lock()
        memory = self.path == ":memory:"
        if not memory:
            self.path = str(Path(path).expanduser())
            self._check_path(Path(self.path))
        try:
            if read_only and not memory:
                db = self._connect_read_only()
            else:
                db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None,
                                     check_same_thread=False)
        except sqlite3.Error as err:
            raise self._error(err) from None
        self._db = db
        try:
            with self._translated():
                db.execute("PRAGMA foreign_keys = ON")
                if not read_only and not memory:
                    mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                    if mode.lower() != "wal":
                        raise StoreError(f"history database {self.path}: cannot switch to WAL mode (got {mode})")
                    # WAL + NORMAL never corrupts; a power cut may lose the last commits. The bot
                    # writes from its event loop, so each exchange costs one fsync less.
                    db.execute("PRAGMA synchronous = NORMAL")
                self._migrate()
                if not read_only and not memory:
                    self._files = {p: _identity(st) for p in (self.path, f"{self.path}-wal", f"{self.path}-shm")
                                   if (st := _stat(p)) is not None}
        except BaseException:
            db.close()
            self._db = None
            raise

    # --- opening ----------------------------------------------------------------

    def _check_path(self, path: Path) -> None:
        # SQLite would open an unwritable file read-only without a word and fail on the
        # first write, mid-conversation: say so now, naming the file.
        if path.is_dir():
            raise StoreError(f"history database path {path} is a directory, not a file")
        if self.read_only:
            if not path.exists():
                raise StoreError(f"history database {path} does not exist")
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreError(f"cannot create the folder of history database {path}: {err.strerror}") from None
        if path.exists() and not _writable(path):
            raise StoreError(f"history database {path} is read-only (no write permission); "
                             "fix its permissions or open it read-only")
        if not _writable(path.parent):
            if not path.exists():
                raise StoreError(f"cannot create history database {path}: folder {path.parent} is read-only")
            sidecars = [Path(f"{path}-wal"), Path(f"{path}-shm")]
            if not all(p.exists() and _writable(p) for p in sidecars):
                raise StoreError(f"history database {path} is in a read-only folder: SQLite's WAL mode "
                                 f"needs to create {path.name}-wal and {path.name}-shm next to it")

    def _connect_read_only(self) -> sqlite3.Connection:
        uri = Path(self.path).resolve().as_uri()
        db = sqlite3.connect(uri + "?mode=ro", uri=True, timeout=self.timeout, isolation_level=None,
                             check_same_thread=False)
        try:
            db.execute("PRAGMA user_version").fetchone()
            return db
        except sqlite3.OperationalError:
            # A WAL database needs its -shm file even to read. Without a -wal file every row is in
            # the main file, so read it as immutable (a read-only file in a read-only folder).
            db.close()
            if Path(f"{self.path}-wal").exists():
                raise
            return sqlite3.connect(uri + "?mode=ro&immutable=1", uri=True, timeout=self.timeout,
                                   isolation_level=None, check_same_thread=False)

    def _migrate(self) -> None:
        db = self._conn()
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(f"history database {self.path} has schema version {version}, newer than "
                             f"this chatcore knows ({SCHEMA_VERSION}): upgrade chatcore to open it")
        if version == SCHEMA_VERSION:
            return
        if self.read_only:
            raise StoreError(f"history database {self.path} has schema version {version} (current: "
                             f"{SCHEMA_VERSION}); open it writable once to migrate it")
        with self._write() as db:
            # Re-read inside the write lock: another process may have migrated meanwhile.
            version = db.execute("PRAGMA user_version").fetchone()[0]
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[target - 1]:
                    db.execute(statement)
            if version < SCHEMA_VERSION:
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # --- plumbing -----------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        if self._lost is not None:
            raise StoreError(self._lost)
        if self._db is None:
            raise StoreError(f"history store {self.path} is closed")
        return self._db

    def _check_files(self) -> None:
        """Raise StoreError, for good, if the files opened are no longer the ones at their paths."""
        for path, identity in self._files.items():
            st = _stat(path)
            if st is not None and _identity(st) == identity:
                continue
            what = "was deleted" if st is None else "was replaced by another file"
            self._lost = (f"history database file {path} {what} while in use: a write now could be lost or "
                          "land in the wrong file, so nothing more is stored. Stop the bot, put the files "
                          "back as they should be (history.db with its -wal and -shm), and restart it")
            log.critical("%s", self._lost)
            raise StoreError(self._lost)

    def _error(self, err: sqlite3.Error) -> StoreError:
        text = str(err)
        name = getattr(err, "sqlite_errorname", "")
        if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in text:
            return StoreError(f"history database {self.path} is locked by another process "
                              f"(gave up after {self.timeout:g} s): {text}")
        if name.startswith("SQLITE_READONLY") or "readonly" in text:
            return StoreError(f"history database {self.path} is read-only: {text}")
        if name == "SQLITE_NOTADB" or "not a database" in text:
            return StoreError(f"{self.path} is not a chatcore history database (not an SQLite file)")
        if name.startswith("SQLITE_CANTOPEN") or "unable to open" in text:
            return StoreError(f"cannot open history database {self.path}: {text}")
        if name.startswith("SQLITE_FULL") or "full" in text:
            return StoreError(f"history database {self.path}: disk full: {text}")
        return StoreError(f"history database {self.path}: {text}")

    @contextmanager
    def _translated(self):
        with self._lock:
            try:
                yield self._conn()
            except sqlite3.Error as err:
                raise self._error(err) from None

    @contextmanager
    def _write(self):
        """One write transaction; taken IMMEDIATE so a busy database waits up front, not mid-way."""
        with self._translated() as db:
            self._check_files()  # before: no write lands in a file that replaced ours (our WAL would overlay it)
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            # After the commit: a file deleted or replaced at any moment before it is caught here.
            self._check_files()

    async def run(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """`fn(*args, **kwargs)` (a method of this store) on the store's own thread: the event loop never waits on SQLite."""
        with self._thread_lock:
            if self._thread is None:
                # One thread: calls keep their order, and a long wait on a lock ties up no shared pool.
                self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chatcore-store")
            thread = self._thread
        return await asyncio.get_running_loop().run_in_executor(thread, functools.partial(fn, *args, **kwargs))

    def close(self) -> None:
        """Close the connection (idempotent); later calls raise StoreError."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
        with self._thread_lock:
            if self._thread is not None:
                self._thread.shutdown(wait=False)  # close may run on that very thread
                self._thread = None

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def schema_version(self) -> int:
        """The schema version of the open database."""
        with self._translated() as db:
            return db.execute("PRAGMA user_version").fetchone()[0]

    # --- conversations ------------------------------------------------------------------

    @staticmethod
    def _key(message_or_key: Message | str | tuple[str, str, str]) -> tuple[str, str, str] | str:
        if isinstance(message_or_key, Message):
            return (message_or_key.adapter, message_or_key.channel, message_or_key.user)
        if isinstance(message_or_key, tuple) and len(message_or_key) == 3:
            return tuple(str(part) for part in message_or_key)
        if isinstance(message_or_key, str):
            return message_or_key  # "adapter:channel:user", as Message.conversation_key
        raise TypeError("expected a Message, an (adapter, channel, user) tuple or a conversation key string")

    def _current_conversation(self, db: sqlite3.Connection, key) -> int | None:
        if isinstance(key, str):
            # Channel and user ids may contain ':' themselves: match the joined key, not a split.
            row = db.execute(
                "SELECT id FROM conversations WHERE adapter || ':' || channel || ':' || user = ? "
                "AND ended_at IS NULL ORDER BY id DESC LIMIT 1", (key,)).fetchone()
        else:
            row = db.execute(
                "SELECT id FROM conversations WHERE adapter = ? AND channel = ? AND user = ? "
                "AND ended_at IS NULL ORDER BY id DESC LIMIT 1", key).fetchone()
        return row[0] if row else None

    def history(self, message_or_key: Message | str | tuple[str, str, str], limit: int = 50) -> list[tuple[str, str]]:
        """The newest `limit` (user, reply) turns of the current conversation, oldest first."""
        key = self._key(message_or_key)
        with self._translated() as db:
            conversation = self._current_conversation(db, key)
            if conversation is None or limit <= 0:
                return []
            rows = db.execute(
                "SELECT user_text, reply_text FROM exchanges WHERE conversation_id = ? "
                "ORDER BY id DESC LIMIT ?", (conversation, limit)).fetchall()
        return [(user, reply) for user, reply in reversed(rows)]

    def last_exchange(self, message_or_key: Message | str | tuple[str, str, str]) -> Exchange | None:
        """The newest exchange of the current conversation (what /good and /bad rate), or None."""
        key = self._key(message_or_key)
        with self._translated() as db:
            conversation = self._current_conversation(db, key)
            row = None if conversation is None else db.execute(
                _EXCHANGE_SELECT + " WHERE e.conversation_id = ? ORDER BY e.id DESC LIMIT 1",
                (conversation,)).fetchone()
        return _exchange(row) if row else None

    def reset_conversation(self, message: Message | str | tuple[str, str, str]) -> None:
        """End the current conversation of this adapter + channel + user (/reset); the next exchange starts a new one."""
        key = self._key(message)
        with self._write() as db:
            conversation = self._current_conversation(db, key)
            if conversation is not None:
                db.execute("UPDATE conversations SET ended_at = ? WHERE id = ?", (time.time(), conversation))

    # --- exchanges ------------------------------------------------------------------------

    def log_exchange(self, message: Message, reply_text: str, *, model_id: str | None,
                     params: SamplingParams | dict | None, created_at: float | None = None,
                     replied_at: float | None = None, policy: str | None = None, consent: str | None = None,
                     trainable: bool = True) -> Exchange:
        """Store a message and its reply in the sender's current conversation (starting one if needed).

        `policy`, `consent` and `trainable` are the provenance `chatcore.consent.decide` gave when it was
        said; the bot always passes them. Without them the row is the caller's own data (scripts, tests).
        """
        if not isinstance(message.text, str) or not isinstance(reply_text, str):
            raise TypeError("message text and reply must be str")
        params_json = _params_json(params)
        replied_at = time.time() if replied_at is None else float(replied_at)
        created_at = replied_at if created_at is None else float(created_at)
        key = self._key(message)
        with self._write() as db:
            conversation = self._current_conversation(db, key)
            if conversation is None:
                conversation = db.execute(
                    "INSERT INTO conversations (adapter, channel, user, started_at) VALUES (?, ?, ?, ?)",
                    (*key, created_at)).lastrowid
            exchange_id = db.execute(
                "INSERT INTO exchanges (conversation_id, user_text, reply_text, created_at, replied_at, "
                "model_id, params, workspace, policy, consent, trainable) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (conversation, _plain_text(message.text), _plain_text(reply_text), created_at, replied_at,
                 model_id, params_json, message.workspace, policy, consent, int(bool(trainable)))).lastrowid
            db.execute("INSERT OR IGNORE INTO users (user_key, first_seen) VALUES (?, ?)",
                       (message.user_key, created_at))
            row = db.execute(_EXCHANGE_SELECT + " WHERE e.id = ?", (exchange_id,)).fetchone()
        return _exchange(row)

    def get_exchange(self, exchange_id: int) -> Exchange | None:
        """The exchange with this id, or None."""
        with self._translated() as db:
            row = db.execute(_EXCHANGE_SELECT + " WHERE e.id = ?", (exchange_id,)).fetchone()
        return _exchange(row) if row else None

    def exchanges(self, *, since_id: int = 0, include_opted_out: bool = False, user_key: str | None = None,
                  batch: int = 500) -> Iterator[Exchange]:
        """Every exchange with id > `since_id`, oldest first; opted-out users' are left out unless asked."""
        where = " WHERE e.id > ?" + ("" if include_opted_out else " AND " + _NOT_OPTED_OUT)
        extra: tuple = ()
        if user_key is not None:
            where += " AND c.adapter || ':' || c.user = ?"
            extra = (user_key,)
        last = since_id
        while True:
            # Fetched in pages so the lock is never held while the caller works on a row.
            with self._translated() as db:
                rows = db.execute(_EXCHANGE_SELECT + where + " ORDER BY e.id LIMIT ?",
                                  (last, *extra, batch)).fetchall()
            for row in rows:
                yield _exchange(row)
            if len(rows) < batch:
                return
            last = rows[-1][0]

    def set_platform_message_id(self, exchange_id: int, platform_message_id: str) -> None:
        """Remember that the reply of this exchange was delivered as this platform message (call once per part)."""
        with self._write() as db:
            row = db.execute("SELECT c.adapter FROM exchanges e JOIN conversations c ON c.id = e.conversation_id "
                             "WHERE e.id = ?", (exchange_id,)).fetchone()
            if row is None:
                raise LookupError(f"no exchange with id {exchange_id}")
            db.execute("INSERT OR REPLACE INTO platform_messages (adapter, platform_message_id, exchange_id) "
                       "VALUES (?, ?, ?)", (row[0], str(platform_message_id), exchange_id))

    def find_by_platform_message_id(self, adapter: str, platform_message_id: str) -> Exchange | None:
        """The exchange whose reply was delivered as this platform message, or None."""
        with self._translated() as db:
            row = db.execute(
                _EXCHANGE_SELECT + " WHERE e.id = (SELECT exchange_id FROM platform_messages "
                "WHERE adapter = ? AND platform_message_id = ?)", (adapter, str(platform_message_id))).fetchone()
        return _exchange(row) if row else None

    def add_feedback(self, exchange_id: int, user_key: str, value: int) -> None:
        """Record a user's vote (+1 or -1) on an exchange; one vote per user (the last wins), 0 withdraws it."""
        if value not in (-1, 0, 1) or isinstance(value, bool):
            raise ValueError(f"feedback value must be -1, 0 or +1, not {value!r}")
        with self._write() as db:
            if db.execute("SELECT 1 FROM exchanges WHERE id = ?", (exchange_id,)).fetchone() is None:
                raise LookupError(f"no exchange with id {exchange_id}")
            if value == 0:
                db.execute("DELETE FROM feedback WHERE exchange_id = ? AND user_key = ?", (exchange_id, user_key))
            else:
                db.execute("INSERT OR REPLACE INTO feedback (exchange_id, user_key, value, at) VALUES (?, ?, ?, ?)",
                           (exchange_id, user_key, value, time.time()))

    def remove_feedback(self, exchange_id: int, user_key: str, value: int | None = None) -> bool:
        """Withdraw a user's vote on an exchange (only if it is `value`, when given); True if one was removed."""
        with self._write() as db:
            removed = db.execute("DELETE FROM feedback WHERE exchange_id = ? AND user_key = ? AND (? IS NULL OR value = ?)",
                                 (exchange_id, user_key, value, value)).rowcount
        return removed > 0

    # --- privacy -----------------------------------------------------------------------

    def forget_user(self, user_key: str) -> int:
        """Delete every exchange, conversation and vote of this user and opt them out; returns exchanges deleted."""
        with self._write() as db:
            conversations = "SELECT id FROM conversations WHERE adapter || ':' || user = ?"
            # feedback and platform_messages of these exchanges go with them (ON DELETE CASCADE).
            deleted = db.execute(f"DELETE FROM exchanges WHERE conversation_id IN ({conversations})",
                                 (user_key,)).rowcount
            db.execute(f"DELETE FROM conversations WHERE id IN ({conversations})", (user_key,))
            db.execute("DELETE FROM feedback WHERE user_key = ?", (user_key,))
            db.execute("DELETE FROM users WHERE user_key = ?", (user_key,))
            db.execute("DELETE FROM consent WHERE user_key = ?", (user_key,))
            db.execute("INSERT OR IGNORE INTO opted_out (user_key, at) VALUES (?, ?)", (user_key, time.time()))
            db.execute("INSERT OR REPLACE INTO forgotten (user_key, at) VALUES (?, ?)", (user_key, time.time()))
        return deleted

    def opt_out(self, user_key: str) -> None:
        """Keep this user's exchanges out of training from now on (their history still serves their chats)."""
        with self._write() as db:
            db.execute("INSERT OR IGNORE INTO opted_out (user_key, at) VALUES (?, ?)", (user_key, time.time()))

    def is_opted_out(self, user_key: str) -> bool:
        """Whether this user opted out of training (or was forgotten)."""
        with self._translated() as db:
            return db.execute("SELECT 1 FROM opted_out WHERE user_key = ?", (user_key,)).fetchone() is not None

    # --- consent (see chatcore.consent) ---------------------------------------------------

    def set_consent(self, user_key: str, state: str | None) -> None:
        """Record a user's /learn answer: "yes", "no", or None to clear it; "yes" also lifts an opt-out."""
        if state not in ("yes", "no", None):
            raise ValueError(f'consent must be "yes", "no" or None, not {state!r}')
        with self._write() as db:
            if state is None:
                db.execute("DELETE FROM consent WHERE user_key = ?", (user_key,))
                return
            db.execute("INSERT OR REPLACE INTO consent (user_key, state, at) VALUES (?, ?, ?)",
                       (user_key, state, time.time()))
            if state == "yes":  # an explicit new yes outweighs an older no (from /forget too)
                db.execute("DELETE FROM opted_out WHERE user_key = ?", (user_key,))

    def consent_state(self, user_key: str) -> str:
        """The user's consent now: "no" (opted out, forgotten or /learn off), "yes" (/learn on) or "unset"."""
        with self._translated() as db:
            if db.execute("SELECT 1 FROM opted_out WHERE user_key = ?", (user_key,)).fetchone():
                return "no"
            row = db.execute("SELECT state FROM consent WHERE user_key = ?", (user_key,)).fetchone()
        return row[0] if row else "unset"

    def excluded_users(self) -> dict[str, float]:
        """Users training must leave out now (forgotten or opted out, /learn off) and since when."""
        with self._translated() as db:
            rows = db.execute(
                "SELECT user_key, MIN(at) FROM (SELECT user_key, at FROM opted_out UNION ALL "
                "SELECT user_key, at FROM consent WHERE state = 'no') GROUP BY user_key").fetchall()
        return dict(rows)

    def forgotten(self) -> dict[str, float]:
        """Users who ran /forget, and when (the last time): models trained before that hold data they took back."""
        with self._translated() as db:
            return dict(db.execute("SELECT user_key, at FROM forgotten").fetchall())

    def first_seen(self) -> dict[str, float]:
        """When each known user was first seen (survives retention; /forget removes it)."""
        with self._translated() as db:
            return dict(db.execute("SELECT user_key, first_seen FROM users").fetchall())

    def user_data(self, user_key: str) -> dict[str, Any]:
        """Everything stored about one user (what /mydata and `history export --user` hand out)."""
        exchanges = [dataclasses.asdict(e) for e in self.exchanges(include_opted_out=True, user_key=user_key)]
        with self._translated() as db:
            votes = db.execute("SELECT exchange_id, value, at FROM feedback WHERE user_key = ? ORDER BY at",
                               (user_key,)).fetchall()
            consent = db.execute("SELECT state, at FROM consent WHERE user_key = ?", (user_key,)).fetchone()
            opted_out = db.execute("SELECT at FROM opted_out WHERE user_key = ?", (user_key,)).fetchone()
            first = db.execute("SELECT first_seen FROM users WHERE user_key = ?", (user_key,)).fetchone()
        return {
            "user": user_key,
            "first_seen": first[0] if first else None,
            "consent": {"state": consent[0], "at": consent[1]} if consent else None,
            "opted_out_at": opted_out[0] if opted_out else None,
            "exchanges": exchanges,
            "votes": [{"exchange_id": e, "value": v, "at": at} for e, v, at in votes],
        }

    def relabel(self, *, adapter: str, policy: str, workspace: str | None = None, channel: str | None = None,
                apply: bool = False) -> dict[str, int]:
        """Re-decide `trainable` of matching rows under `policy`, from each row's recorded consent.

        Returns {"matched", "become_trainable", "stop_trainable"}; changes nothing unless `apply`.
        """
        if policy not in ("off", "opt_in", "opt_out"):
            raise ValueError(f"policy must be off, opt_in or opt_out, not {policy!r}")
        new = {"off": "0", "opt_in": "COALESCE(e.consent = 'yes', 0)",
               "opt_out": "COALESCE(e.consent, 'unset') != 'no'"}[policy]
        where = "c.adapter = ?"
        args: list[Any] = [adapter]
        if workspace is not None:
            where += " AND e.workspace = ?"
            args.append(workspace)
        if channel is not None:  # a Slack thread "C1/123.4" is in channel C1
            where += " AND (c.channel = ? OR c.channel LIKE ? ESCAPE '\\')"
            args += [channel, channel.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "/%"]
        select = ("SELECT e.id, e.trainable, " + new + " FROM exchanges e "
                  "JOIN conversations c ON c.id = e.conversation_id WHERE " + where)
        with self._write() as db:
            rows = db.execute(select, args).fetchall()
            counts = {"matched": len(rows), "become_trainable": sum(1 for _, old, n in rows if n and not old),
                      "stop_trainable": sum(1 for _, old, n in rows if old and not n)}
            if apply:
                db.executemany("UPDATE exchanges SET policy = ?, trainable = ? WHERE id = ?",
                               [(policy, int(bool(n)), i) for i, _, n in rows])
        return counts

    def delete_older_than(self, cutoff: float) -> dict[str, int]:
        """Retention: delete exchanges said before `cutoff` and conversations left empty; returns counts."""
        with self._write() as db:
            exchanges = db.execute("DELETE FROM exchanges WHERE created_at < ?", (cutoff,)).rowcount
            conversations = db.execute(
                "DELETE FROM conversations WHERE started_at < ? AND NOT EXISTS "
                "(SELECT 1 FROM exchanges e WHERE e.conversation_id = conversations.id)", (cutoff,)).rowcount
        return {"exchanges": exchanges, "conversations": conversations}

    # --- fine-tune counter -----------------------------------------------------------------

    def _finetune_mark(self, db: sqlite3.Connection) -> int:
        row = db.execute("SELECT up_to_id FROM finetunes ORDER BY id DESC LIMIT 1").fetchone()
        return row[0] if row else 0

    def exchanges_since_finetune(self) -> int:
        """Trainable exchanges (see `trainable_ids`) logged after the newest one the last fine-tune saw."""
        with self._translated() as db:
            return db.execute(
                "SELECT COUNT(*) FROM exchanges e JOIN conversations c ON c.id = e.conversation_id "
                f"WHERE e.id > ? AND {_TRAINABLE}", (self._finetune_mark(db),)).fetchone()[0]

    def mark_finetune(self, *, checkpoint: str | None = None, at: float | None = None,
                      up_to_id: int | None = None) -> None:
        """Record a fine-tune that saw exchanges up to `up_to_id` (default: all so far); resets the count."""
        with self._write() as db:
            if up_to_id is None:
                up_to_id = db.execute("SELECT COALESCE(MAX(id), 0) FROM exchanges").fetchone()[0]
            db.execute("INSERT INTO finetunes (at, checkpoint, up_to_id) VALUES (?, ?, ?)",
                       (time.time() if at is None else float(at), checkpoint, int(up_to_id)))

    def last_finetune(self) -> dict | None:
        """The newest fine-tune mark as {"at", "checkpoint", "up_to_id"}, or None."""
        with self._translated() as db:
            row = db.execute("SELECT at, checkpoint, up_to_id FROM finetunes ORDER BY id DESC LIMIT 1").fetchone()
        return dict(zip(("at", "checkpoint", "up_to_id"), row)) if row else None

    # --- import / export (the seed's chat_history.jsonl) ----------------------------------------

    def export_jsonl(self, path_or_file: str | os.PathLike | IO, *, include_opted_out: bool = True) -> int:
        """Write every exchange, oldest first, as {"user": ..., "assistant": ...} lines; returns the count."""
        def lines() -> Iterator[str]:
            for ex in self.exchanges(include_opted_out=include_opted_out):
                # The seed's own serialisation (json.dumps defaults, raw Unicode): round trips byte for byte.
                yield json.dumps({"user": ex.user_text, "assistant": ex.reply_text}, ensure_ascii=False) + "\n"

        count = 0
        if isinstance(path_or_file, (str, os.PathLike)):
            path = Path(path_or_file)
            tmp = path.with_name(path.name + ".tmp")
            try:
                with open(tmp, "w", encoding="utf-8", newline="\n") as f:
                    for line in lines():
                        f.write(line)
                        count += 1
                os.replace(tmp, path)  # never leave a half-written export under the real name
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            return count
        f = path_or_file
        if isinstance(f, io.TextIOBase):
            encoding = (getattr(f, "encoding", None) or "utf-8").lower().replace("_", "-")
            if encoding not in ("utf-8", "utf8") and hasattr(f, "buffer"):
                f.flush()  # e.g. stdout in a C locale: write UTF-8 bytes under it, losing nothing
                f = f.buffer
        binary = not isinstance(f, io.TextIOBase)
        for line in lines():
            f.write(line.encode("utf-8") if binary else line)
            count += 1
        f.flush()
        return count

    @staticmethod
    def _parse_line(number: int, raw: bytes | str | None) -> tuple[str, str] | str:
        """(user, assistant) from one JSONL line, or the reason it is skipped (None: a line too long)."""
        if raw is None:
            return f"longer than {MAX_IMPORT_LINE_BYTES} bytes"
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                return f"not valid UTF-8 (byte {err.start})"
        if number == 1:
            raw = raw.removeprefix("\ufeff")
        if not raw.strip():
            return "empty line"
        # A hostile line must cost only itself: every way json.loads can fail is a skipped line.
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as err:
            return f"not JSON: {err.msg} (column {err.colno})"
        except RecursionError:
            return "not JSON this reader accepts: nested too deeply"
        except ValueError:  # an integer over Python's 4,300-digit limit
            return "not JSON this reader accepts: a number too long"
        except MemoryError:
            return "too large to parse"
        if not isinstance(obj, dict):
            return f"not a JSON object (got {type(obj).__name__})"
        out = []
        for name in ("user", "assistant"):
            value = obj.get(name)
            if value is None:
                return f'missing "{name}"'
            if not isinstance(value, str):
                return f'"{name}" is not a string (got {type(value).__name__})'
            if not value.strip():
                return f'"{name}" is empty'
            if _SURROGATES.search(value):
                return f'"{name}" holds an unpaired surrogate escape (not valid Unicode)'
            out.append(value)
        return out[0], out[1]

    def import_jsonl(self, path_or_file: str | os.PathLike | IO, *, adapter: str = "import",
                     channel: str = "import", user: str = "import") -> ImportReport:
        """Import {"user", "assistant"} lines as a new ended conversation, all or nothing; bad lines are reported.

        Lines are parsed into a temporary table first, in batches that lock nothing, then copied
        in one short transaction: a running bot waits on the import for that copy only (about 3 s
        per million lines on 2 cores: `benchmarks/store_import.py`), and a crash mid-import leaves
        nothing half-imported.
        """
        report = ImportReport()
        owned = isinstance(path_or_file, (str, os.PathLike))
        if owned:
            try:
                f = open(path_or_file, "rb")
            except OSError as err:
                raise StoreError(f"cannot read {path_or_file}: {err.strerror}") from None
        else:
            f = path_or_file
        try:
            with self._translated() as db:
                db.execute("DROP TABLE IF EXISTS temp.import_staging")
                db.execute("CREATE TEMP TABLE import_staging (user_text TEXT NOT NULL, reply_text TEXT NOT NULL)")
            try:
                batch: list[tuple[str, str]] = []
                for number, raw in _lines(f, MAX_IMPORT_LINE_BYTES):
                    parsed = self._parse_line(number, raw)
                    if isinstance(parsed, str):
                        report.skipped.append((number, parsed))
                        continue
                    batch.append(parsed)
                    if len(batch) >= IMPORT_BATCH:
                        self._stage(batch)
                        report.imported += len(batch)
                        batch = []
                self._stage(batch)
                report.imported += len(batch)
                if report.imported:
                    with self._write() as db:
                        now = time.time()
                        conversation = db.execute(
                            "INSERT INTO conversations (adapter, channel, user, started_at, ended_at) "
                            "VALUES (?, ?, ?, ?, ?)", (adapter, channel, user, now, now)).lastrowid
                        db.execute(
                            "INSERT INTO exchanges (conversation_id, user_text, reply_text, created_at, replied_at, "
                            "model_id, params, source) SELECT ?, user_text, reply_text, ?, ?, NULL, '{}', 'import' "
                            "FROM temp.import_staging ORDER BY rowid", (conversation, now, now))
            finally:
                if self._db is not None and self._lost is None:
                    with self._translated() as db:
                        db.execute("DROP TABLE IF EXISTS temp.import_staging")
        finally:
            if owned:
                f.close()
        return report

    def _stage(self, rows: list[tuple[str, str]]) -> None:
        # The temporary table belongs to this connection alone: filling it takes no lock on the database.
        if not rows:
            return
        with self._translated() as db:
            db.execute("BEGIN")
            try:
                db.executemany("INSERT INTO temp.import_staging (user_text, reply_text) VALUES (?, ?)", rows)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    # --- stats ------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counts and dates for `chatcore history stats` and /status."""
        with self._translated() as db:
            exchanges, imported, first, last = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(source = 'import'), 0), MIN(created_at), MAX(replied_at) "
                "FROM exchanges").fetchone()
            conversations, users = db.execute(
                "SELECT COUNT(*), COUNT(DISTINCT adapter || ':' || user) FROM conversations").fetchone()
            opted_out = db.execute("SELECT COUNT(*) FROM opted_out").fetchone()[0]
            feedback = db.execute("SELECT COUNT(*) FROM feedback").fetchone()[0]
        size = 0
        if self.path != ":memory:":
            size = sum(os.path.getsize(p) for p in (self.path, self.path + "-wal") if os.path.exists(p))
        return {
            "path": self.path,
            "schema_version": SCHEMA_VERSION,
            "exchanges": exchanges,
            "imported": imported,
            "conversations": conversations,
            "users": users,
            "opted_out": opted_out,
            "feedback_votes": feedback,
            "since_finetune": self.exchanges_since_finetune(),
            "last_finetune": self.last_finetune(),
            "first_at": first,
            "last_at": last,
            "db_bytes": size,
        }

    # --- dashboard queries ------------------------------------------------------------------

    def daily_activity(self, days: int = 30, now: float | None = None) -> list[dict[str, Any]]:
        """Per UTC day of the last `days`: exchanges, conversations started, active users, 👍 and 👎."""
        now = time.time() if now is None else now
        first_day = int(now // 86400) - days + 1
        since = first_day * 86400.0
        rows: dict[int, dict[str, Any]] = {
            d: {"day": time.strftime("%Y-%m-%d", time.gmtime(d * 86400)), "exchanges": 0, "conversations": 0,
                "active_users": 0, "good": 0, "bad": 0} for d in range(first_day, first_day + days)}
        with self._translated() as db:
            for day, exchanges, users in db.execute(
                    "SELECT CAST(e.created_at / 86400 AS INTEGER) d, COUNT(*), COUNT(DISTINCT c.adapter || ':' || "
                    "c.user) FROM exchanges e JOIN conversations c ON c.id = e.conversation_id "
                    "WHERE e.created_at >= ? GROUP BY d", (since,)):
                if day in rows:
                    rows[day].update(exchanges=exchanges, active_users=users)
            for day, count in db.execute("SELECT CAST(started_at / 86400 AS INTEGER) d, COUNT(*) FROM "
                                         "conversations WHERE started_at >= ? GROUP BY d", (since,)):
                if day in rows:
                    rows[day]["conversations"] = count
            for day, good, bad in db.execute("SELECT CAST(at / 86400 AS INTEGER) d, SUM(value > 0), SUM(value < 0) "
                                             "FROM feedback WHERE at >= ? GROUP BY d", (since,)):
                if day in rows:
                    rows[day].update(good=good or 0, bad=bad or 0)
        return [rows[d] for d in sorted(rows)]

    def search_exchanges(self, text: str = "", *, adapter: str | None = None, channel: str | None = None,
                         user_key: str | None = None, before_id: int | None = None,
                         limit: int = 50) -> list[Exchange]:
        """Newest first: exchanges whose user text or reply contains `text`, optionally of one adapter/channel/user."""
        where, args = [], []
        if text:
            where.append("(instr(lower(e.user_text), ?) > 0 OR instr(lower(e.reply_text), ?) > 0)")
            args += [text.lower(), text.lower()]
        for column, value in (("c.adapter", adapter), ("c.channel", channel)):
            if value:
                where.append(f"{column} = ?")
                args.append(value)
        if user_key:
            where.append("c.adapter || ':' || c.user = ?")
            args.append(user_key)
        if before_id is not None:
            where.append("e.id < ?")
            args.append(before_id)
        sql = _EXCHANGE_SELECT + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY e.id DESC LIMIT ?"
        with self._translated() as db:
            rows = db.execute(sql, (*args, max(1, min(int(limit), 500)))).fetchall()
        return [_exchange(r) for r in rows]

    def channels(self) -> list[dict[str, Any]]:
        """Every adapter and channel with its exchange count, busiest first."""
        with self._translated() as db:
            rows = db.execute("SELECT c.adapter, c.channel, COUNT(e.id) n FROM conversations c JOIN exchanges e "
                              "ON e.conversation_id = c.id GROUP BY c.adapter, c.channel ORDER BY n DESC").fetchall()
        return [{"adapter": a, "channel": ch, "exchanges": n} for a, ch, n in rows]
