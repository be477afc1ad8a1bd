"""The SQLite history store: real database files in tmp_path."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest

from chatcore.message import Message
from chatcore.sampling import SamplingParams
from chatcore.store import MIGRATIONS, SCHEMA_VERSION, Store, StoreError

DATA = Path(__file__).resolve().parent / "data"
ROOT = Path(__file__).resolve().parents[1]


def msg(text="hi", adapter="stdin", channel="local", user="ana", **kw) -> Message:
    return Message(text=text, adapter=adapter, channel=channel, user=user, **kw)


@pytest.fixture
def store(history_url):
    s = Store(history_url)
    yield s
    s.close()


def log(store, text, reply="ok", **kw):
    return store.log_exchange(msg(text, **kw), reply, model_id="m0", params=None)


# --- opening, WAL, schema ---------------------------------------------------------------

def test_creates_folders_and_uses_wal(tmp_path):
    path = tmp_path / "deep" / "er" / "history.db"
    with Store(path) as s:
        assert s.schema_version == SCHEMA_VERSION
        log(s, "hello")
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.close()
    with pytest.raises(StoreError, match="closed"):
        s.history(msg())


def _schema(db: sqlite3.Connection) -> list[tuple[str, str]]:
    rows = db.execute("SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY name").fetchall()
    return [(name, re.sub(r"\s+", " ", sql)) for name, sql in rows]


def test_v1_fixture_is_exactly_what_migration_1_creates():
    # The fixture stands for databases already in the field: migration 1 must never drift from it.
    fixture = sqlite3.connect(":memory:")
    fixture.executescript((DATA / "store_v1.sql").read_text(encoding="utf-8"))
    fresh = sqlite3.connect(":memory:")
    for statement in MIGRATIONS[0]:
        fresh.execute(statement)
    assert _schema(fixture) == _schema(fresh)


def test_migrates_a_version_1_database(tmp_path):
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript((DATA / "store_v1.sql").read_text(encoding="utf-8"))
    db.close()

    with Store(path) as s:
        assert s.schema_version == SCHEMA_VERSION == 5
        # Every old row survives, with its params, timestamps and conversation structure.
        old = list(s.exchanges())
        assert [e.user_text for e in old] == ["hello", "how are you?", "new topic: café ☕", "what is 2+2?", "and 3+3?"]
        assert old[0].params == {"temperature": 0.8, "top_k": 200}
        assert old[0].replied_at == 1700000001.5 and old[0].model_id == "gpt2-seed"
        assert old[0].user_key == "discord:1001"
        assert all(e.source == "chat" and e.feedback == 0 and e.platform_message_id is None for e in old)
        assert s.history(("discord", "chan-1", "1001")) == [("new topic: café ☕", "sure")]  # conversation 1 ended
        assert s.history("stdin:local:ana") == [("what is 2+2?", "4"), ("and 3+3?", "6")]
        assert s.last_finetune() == {"at": 1700000250.0, "checkpoint": "checkpoints/ft-0001", "up_to_id": 3}
        assert s.exchanges_since_finetune() == 2

        # The new tables and columns work on old rows.
        s.set_platform_message_id(3, "d-msg-77")
        s.add_feedback(3, "discord:2002", 1)
        got = s.find_by_platform_message_id("discord", "d-msg-77")
        assert got.id == 3 and got.feedback == 1 and got.platform_message_id == "d-msg-77"
        new = s.log_exchange(msg("again", adapter="discord", channel="chan-1", user="1001"), "yes",
                             model_id="ft-0002", params=SamplingParams(temperature=0.5))
        assert new.id == 6 and new.conversation_id == 2 and new.params["temperature"] == 0.5
        assert s.forget_user("stdin:ana") == 2 and s.is_opted_out("stdin:ana")
    with Store(path) as s:  # reopening a migrated file is a no-op
        assert s.schema_version == SCHEMA_VERSION and len(list(s.exchanges())) == 4


def test_refuses_newer_schema_and_leaves_it_alone(tmp_path):
    path = tmp_path / "future.db"
    Store(path).close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.close()
    before = path.read_bytes()
    with pytest.raises(StoreError, match=r"schema version 99, newer than this chatcore knows \(5\)"):
        Store(path)
    assert path.read_bytes() == before


def test_not_a_database(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"this is not sqlite\n" * 300)
    with pytest.raises(StoreError, match="not a chatcore history database"):
        Store(path)
    assert path.read_bytes() == b"this is not sqlite\n" * 300
    with pytest.raises(StoreError, match="is a directory"):
        Store(tmp_path)


# --- locked and read-only --------------------------------------------------------------------

HOLDER = textwrap.dedent("""
    import sqlite3, sys
    db = sqlite3.connect(sys.argv[1], isolation_level=None)
    if sys.argv[2] == "exclusive":
        db.execute("PRAGMA locking_mode = EXCLUSIVE")  # blocks readers too
    db.execute("BEGIN EXCLUSIVE")
    db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
    print("locked", flush=True)
    sys.stdin.readline()
""")


@contextmanager
def locked_by_another_process(path, mode):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), mode],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)


def test_locked_database_gives_clear_errors_and_loses_nothing(tmp_path):
    path = tmp_path / "history.db"
    with Store(path, timeout=0.1) as s:
        log(s, "before")
        with locked_by_another_process(path, "normal"):
            # Another writer (e.g. the trainer) holds the write lock: reads go on, a write waits, then says why.
            assert s.history(msg()) == [("before", "ok")]
            with pytest.raises(StoreError, match=r"history\.db is locked by another process \(gave up after 0\.1 s\)"):
                log(s, "during")
        log(s, "after")
        assert [e.user_text for e in s.exchanges()] == ["before", "after"]

    with locked_by_another_process(path, "exclusive"):
        with pytest.raises(StoreError, match="is locked by another process"):
            Store(path, timeout=0.1)
    with Store(path) as s:
        assert s.exchanges_since_finetune() == 2


@pytest.fixture
def world_dir(tmp_path):
    """A folder an unprivileged user can reach (pytest's tmp_path is private to root)."""
    if os.geteuid() != 0:
        yield tmp_path
        return
    d = Path(tempfile.mkdtemp(prefix="chatcore-store-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        d.chmod(0o755)
        shutil.rmtree(d)


@contextmanager
def unprivileged():
    """Run as `nobody` while inside: root ignores file permissions, so a read-only test would prove nothing."""
    if os.geteuid() != 0:
        yield
        return
    try:
        os.setegid(65534)
        os.seteuid(65534)
    except OSError as err:  # pragma: no cover - a sandbox without setuid
        pytest.skip(f"cannot drop privileges to test permissions: {err}")
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def test_read_only_file_and_folder(world_dir):
    path = world_dir / "history.db"
    with Store(path) as s:
        log(s, "keep me")
    path.chmod(0o444)
    with unprivileged():
        with pytest.raises(StoreError, match=r"history\.db is read-only \(no write permission\)"):
            Store(path)
        # Read-only mode still serves export and stats.
        with Store(path, read_only=True) as ro:
            out = io.StringIO()
            assert ro.export_jsonl(out) == 1 and "keep me" in out.getvalue()
            assert ro.stats()["exchanges"] == 1
            with pytest.raises(StoreError, match="read-only"):
                log(ro, "nope")

    path.chmod(0o666)  # writable file (for `nobody` too), read-only folder
    world_dir.chmod(0o555)
    try:
        with unprivileged():
            with pytest.raises(StoreError, match="cannot create history database .* folder .* is read-only"):
                Store(world_dir / "new.db")
            assert not Path(f"{path}-wal").exists()  # closed cleanly: SQLite removed the sidecars
            with pytest.raises(StoreError, match="read-only folder: SQLite's WAL mode needs to create"):
                Store(path)
    finally:
        world_dir.chmod(0o755)
    with Store(path) as s:
        assert [e.user_text for e in s.exchanges()] == ["keep me"]


# --- conversations -------------------------------------------------------------------------------

def test_history_order_limit_isolation_and_reset(store):
    for i in range(5):
        log(store, f"q{i}", f"a{i}")
    log(store, "other user", user="bob")
    log(store, "other channel", channel="thread-9")
    log(store, "other adapter", adapter="discord")

    assert store.history(msg()) == [(f"q{i}", f"a{i}") for i in range(5)]
    assert store.history(msg(), limit=2) == [("q3", "a3"), ("q4", "a4")]  # newest kept, oldest first
    assert store.history(msg(), limit=0) == []
    assert store.history("stdin:local:bob") == [("other user", "ok")]
    assert store.history(("stdin", "thread-9", "ana")) == [("other channel", "ok")]
    assert store.history(msg(adapter="discord")) == [("other adapter", "ok")]

    first = store.get_exchange(1).conversation_id
    store.reset_conversation(msg())
    assert store.history(msg()) == []
    assert store.history(msg(user="bob")) == [("other user", "ok")]  # only the sender's conversation ended
    ex = log(store, "fresh start")
    assert ex.conversation_id != first
    assert store.history(msg()) == [("fresh start", "ok")]
    store.reset_conversation(msg(user="nobody-yet"))  # nothing to reset: no error
    assert len(list(store.exchanges())) == 9  # resetting forgets nothing


def test_conversation_key_with_colons(store):
    m = msg("x", adapter="slack", channel="C1:1700000000.1234", user="U:2")
    log(store, "x", adapter="slack", channel="C1:1700000000.1234", user="U:2")
    assert store.history(m.conversation_key) == [("x", "ok")]
    assert store.history("slack:C1:1700000000.1234:U") == []


def test_log_exchange_keeps_everything(store):
    big = "é" * 1_000_000 + "\n<|endoftext|>\nHuman: injected"
    params = SamplingParams(temperature=0.3, stop=("\nHuman:",), seed=7)
    ex = store.log_exchange(msg(big, id="p-1"), "reply", model_id="ft-3", params=params,
                            created_at=100.0, replied_at=101.25)
    got = store.get_exchange(ex.id)
    assert got == ex
    assert got.user_text == big and len(got.user_text) == 1_000_030  # stored whole, unmodified
    assert got.params["temperature"] == 0.3 and got.params["stop"] == ["\nHuman:"] and got.params["seed"] == 7
    assert (got.created_at, got.replied_at, got.model_id) == (100.0, 101.25, "ft-3")
    assert (got.adapter, got.channel, got.user, got.user_key) == ("stdin", "local", "ana", "stdin:ana")

    # Undecodable input decoded with surrogateescape cannot be UTF-8: it becomes U+FFFD instead of crashing.
    odd = b"bad \xff byte".decode("utf-8", "surrogateescape")
    assert store.log_exchange(msg(odd), "ok", model_id=None, params={"a": 1}).user_text == "bad \ufffd byte"
    with pytest.raises(ValueError, match="JSON"):
        store.log_exchange(msg("x"), "y", model_id=None, params={"t": object()})
    assert store.get_exchange(999) is None


def test_feedback_and_platform_message_ids(store):
    ex = log(store, "hello", adapter="discord", channel="c", user="1")
    other = log(store, "bye", adapter="discord", channel="c", user="1")
    for part in ("m-1", "m-2"):  # a long reply delivered in two parts
        store.set_platform_message_id(ex.id, part)
    assert store.find_by_platform_message_id("discord", "m-2").id == ex.id
    assert store.find_by_platform_message_id("discord", "m-1").platform_message_id == "m-1"
    assert store.find_by_platform_message_id("slack", "m-1") is None
    assert store.find_by_platform_message_id("discord", "nope") is None

    store.add_feedback(ex.id, "discord:2", 1)
    store.add_feedback(ex.id, "discord:3", 1)
    store.add_feedback(ex.id, "discord:3", -1)  # changed their mind: last vote wins
    assert store.get_exchange(ex.id).feedback == 0
    store.add_feedback(ex.id, "discord:3", 0)  # withdrawn
    assert store.get_exchange(ex.id).feedback == 1
    assert store.get_exchange(other.id).feedback == 0
    with pytest.raises(ValueError):
        store.add_feedback(ex.id, "discord:2", 5)
    with pytest.raises(LookupError):
        store.add_feedback(12345, "discord:2", 1)
    with pytest.raises(LookupError):
        store.set_platform_message_id(12345, "m-9")


def test_forget_user(store):
    a1 = log(store, "a secret", adapter="discord", user="A")
    log(store, "another", adapter="discord", channel="dm", user="A")
    b1 = log(store, "b text", adapter="discord", user="B")
    same_id_elsewhere = log(store, "slack A", adapter="slack", user="A")
    store.set_platform_message_id(a1.id, "pm-a")
    store.add_feedback(b1.id, "discord:A", -1)  # A's vote on B's exchange
    store.add_feedback(b1.id, "discord:B", 1)
    store.add_feedback(a1.id, "discord:B", 1)

    assert store.forget_user("discord:A") == 2
    assert [e.user_text for e in store.exchanges(include_opted_out=True)] == ["b text", "slack A"]
    assert store.history(msg(adapter="discord", user="A")) == []
    assert store.find_by_platform_message_id("discord", "pm-a") is None
    assert store.get_exchange(b1.id).feedback == 1  # A's vote is gone, B's stays
    assert store.get_exchange(same_id_elsewhere.id) is not None  # slack:A is another user
    assert store.is_opted_out("discord:A") and not store.is_opted_out("discord:B")
    raw = store._db.execute("SELECT COUNT(*) FROM feedback WHERE user_key = 'discord:A'").fetchone()[0]
    assert raw == 0

    # A chats again: kept for their conversation, never for training.
    log(store, "back again", adapter="discord", user="A")
    assert store.history(msg(adapter="discord", user="A")) == [("back again", "ok")]
    assert "back again" not in [e.user_text for e in store.exchanges()]
    assert "back again" in [e.user_text for e in store.exchanges(include_opted_out=True)]
    assert store.exchanges_since_finetune() == 2
    store.opt_out("slack:A")
    assert [e.user_text for e in store.exchanges()] == ["b text"]
    assert store.stats()["opted_out"] == 2


def test_the_finetune_counter_stops_at_the_threshold_it_is_asked_about(history_url):
    # auto_finetune asks after every message whether `every` exchanges wait: it needs no more than that many rows
    with Store(history_url) as s:
        for i in range(5):
            log(s, f"q{i}")
        assert s.exchanges_since_finetune(up_to=3) == 3
        assert s.exchanges_since_finetune(up_to=50) == 5 == s.exchanges_since_finetune()
        s.mark_finetune(checkpoint="ckpt/ft-1")
        log(s, "new")
        assert s.exchanges_since_finetune(up_to=3) == 1


def test_finetune_counter_persists_across_reopen(history_url):
    path = history_url
    with Store(path) as s:
        assert s.exchanges_since_finetune() == 0 and s.last_finetune() is None
        for i in range(3):
            log(s, f"q{i}")
    with Store(path) as s:
        assert s.exchanges_since_finetune() == 3
        seen = max(e.id for e in s.exchanges())
        log(s, "arrived while training")
        s.mark_finetune(checkpoint="ckpt/ft-1", at=123.0, up_to_id=seen)
        assert s.exchanges_since_finetune() == 1  # the exchange the fine-tune never saw still counts
        s.mark_finetune(checkpoint="ckpt/ft-2")
        assert s.exchanges_since_finetune() == 0
        log(s, "a"), log(s, "b")
    with Store(path) as s:
        assert s.exchanges_since_finetune() == 2
        assert s.last_finetune()["checkpoint"] == "ckpt/ft-2" and s.last_finetune()["up_to_id"] == 4
        assert [e.user_text for e in s.exchanges(since_id=4)] == ["a", "b"]


def test_exchanges_pages_through_everything(store):
    for i in range(7):
        log(store, f"q{i}")
    assert [e.user_text for e in store.exchanges(batch=3)] == [f"q{i}" for i in range(7)]
    assert [e.id for e in store.exchanges(since_id=5, batch=2)] == [6, 7]


def test_bot_and_trainer_write_concurrently(history_url):
    # The bot's thread and a second Store on the same file (as the trainer process has) interleave safely.
    path = history_url
    bot, trainer = Store(path), Store(path)
    errors = []

    def chat(s, who):
        try:
            for i in range(20):
                log(s, f"{who}{i}", user=who)
                s.history(msg(user=who))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=chat, args=(s, who)) for s, who in
               ((bot, "u1"), (bot, "u2"), (trainer, "u3"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(list(trainer.exchanges())) == 60
    trainer.mark_finetune(checkpoint="x")
    assert bot.exchanges_since_finetune() == 0
    bot.close(), trainer.close()


def test_stats(store):
    log(store, "a", user="u1")
    log(store, "b", user="u2")
    store.reset_conversation(msg(user="u1"))
    log(store, "c", user="u1")
    store.import_jsonl(io.StringIO('{"user": "x", "assistant": "y"}\n'))
    st = store.stats()
    assert (st["exchanges"], st["imported"], st["conversations"], st["users"]) == (4, 1, 4, 3)
    assert st["since_finetune"] == 4 and st["last_finetune"] is None and st["opted_out"] == 0
    assert st["first_at"] <= st["last_at"] and st["db_bytes"] > 0 and st["schema_version"] == 5


# --- import / export ---------------------------------------------------------------------------------

def test_round_trip_of_the_sample_file_is_byte_identical(store, tmp_path, sample_conversations):
    src = sample_conversations
    report = store.import_jsonl(src)
    assert report.imported == 350 and report.skipped == []
    out = tmp_path / "out.jsonl"
    assert store.export_jsonl(out) == 350
    assert out.read_bytes() == src.read_bytes()
    assert not (tmp_path / "out.jsonl.tmp").exists()


def test_round_trip_hard_text(store, tmp_path, shared_data):
    naughty = json.loads((shared_data / "naughty_strings.json").read_text(encoding="utf-8"))
    texts = [s for s in naughty if isinstance(s, str) and s.strip()]
    texts += ["line one\nline two\r\nthree", "tab\there \"quoted\" \\ back", "sep\u2028para\u2029end",
              "emoji 👩‍👩‍👧 and NUL \x00 in the middle", "x" * 1_000_000, "ü" * 500_000]
    lines = [json.dumps({"user": t, "assistant": texts[-1 - i]}, ensure_ascii=False) + "\n"
             for i, t in enumerate(texts)]
    src = tmp_path / "hard.jsonl"
    src.write_bytes("".join(lines).encode("utf-8"))

    report = store.import_jsonl(src)
    assert report.skipped == [] and report.imported == len(texts)
    out = tmp_path / "out.jsonl"
    store.export_jsonl(out)
    assert out.read_bytes() == src.read_bytes()
    # Same through file objects, text and binary.
    buf = io.BytesIO()
    store.export_jsonl(buf)
    assert buf.getvalue() == src.read_bytes()
    sio = io.StringIO()
    store.export_jsonl(sio)
    assert sio.getvalue() == src.read_text(encoding="utf-8")


def test_import_skips_bad_lines_with_line_numbers(store):
    lines = [
        b'{"user": "good one", "assistant": "fine"}',           # 1
        b"not json at all",                                    # 2
        b'["user", "assistant"]',                              # 3
        b'{"assistant": "no user"}',                           # 4
        b'{"user": "numeric reply", "assistant": 42}',         # 5
        b'{"user": "   ", "assistant": "blank user"}',         # 6
        b"",                                                   # 7
        b'{"user": "bad \xff utf8", "assistant": "x"}',        # 8
        b'{"user": "\\ud800 lone", "assistant": "x"}',         # 9
        b'{"user": "truncated", "assist',                      # 10
        b'{"user": "good two", "assistant": "also fine", "extra": 1}',  # 11
    ]
    report = store.import_jsonl(io.BytesIO(b"\n".join(lines) + b"\n"))
    assert report.imported == 2
    assert [n for n, _ in report.skipped] == [2, 3, 4, 5, 6, 7, 8, 9, 10]
    reasons = dict(report.skipped)
    assert reasons[2].startswith("not JSON")
    assert reasons[3] == "not a JSON object (got list)"
    assert reasons[4] == 'missing "user"'
    assert reasons[5] == '"assistant" is not a string (got int)'
    assert reasons[6] == '"user" is empty'
    assert reasons[7] == "empty line"
    assert reasons[8].startswith("not valid UTF-8")
    assert "surrogate" in reasons[9]
    assert [e.user_text for e in store.exchanges()] == ["good one", "good two"]
    assert all(e.source == "import" and e.adapter == "import" for e in store.exchanges())


def test_import_accepts_text_files_bom_and_crlf(store):
    report = store.import_jsonl(io.StringIO('\ufeff{"user": "a", "assistant": "b"}\r\n{"user": "c", "assistant": "d"}'))
    assert report.imported == 2 and report.skipped == []
    assert [(e.user_text, e.reply_text) for e in store.exchanges()] == [("a", "b"), ("c", "d")]
    with pytest.raises(StoreError, match="cannot read"):
        store.import_jsonl("/nonexistent/file.jsonl")
    empty = store.import_jsonl(io.StringIO(""))
    assert (empty.imported, empty.skipped) == (0, [])
    assert store.stats()["conversations"] == 1  # an import with nothing in it leaves no trace


class _FailsAt:
    """A file whose read fails after some lines: the import must roll back."""

    def __init__(self, n):
        self.n = n

    def __iter__(self):
        for i in range(1, 100):
            if i == self.n:
                raise OSError("disk went away")
            yield f'{{"user": "u{i}", "assistant": "a{i}"}}\n'.encode()


def test_import_error_midway_leaves_nothing(store):
    log(store, "existing")
    with pytest.raises(OSError, match="disk went away"):
        store.import_jsonl(_FailsAt(40))
    assert [e.user_text for e in store.exchanges()] == ["existing"]
    assert store.stats()["conversations"] == 1
    assert store.import_jsonl(_FailsAt(1000)).imported == 99  # and the store still works


CRASHER = textwrap.dedent("""
    import os, sys
    from chatcore.store import Store
    store = Store(sys.argv[1])
    stage = store._stage

    def stage_then_die_mid_copy(rows):
        stage(rows)
        if len(rows) < 10000:  # the last batch: the one transaction that copies them comes next
            def die():
                print(store._db.in_transaction, flush=True)
                os._exit(3)  # inside the copy: no chance to commit or roll back
            store._db.set_progress_handler(die, 2000)

    store._stage = stage_then_die_mid_copy
    store.import_jsonl('{"user": "u%d", "assistant": "a%d"}\\n' % (i, i) for i in range(1, 1000))
""")


def test_import_crash_leaves_nothing(tmp_path):
    path = tmp_path / "h.db"
    with Store(path) as s:
        log(s, "existing")
    proc = subprocess.run([sys.executable, "-c", CRASHER, str(path)], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout.strip() == "True"  # it died inside the transaction that copies the staged rows
    with Store(path) as s:
        assert [e.user_text for e in s.exchanges()] == ["existing"]
        assert s.stats()["conversations"] == 1
