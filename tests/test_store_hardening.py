"""The history store under hostile files and an unlucky operator: deleted or replaced files, hostile import lines, locks."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import sys

import pytest

import chatcore.store as store_module
from chatcore.cli import main
from chatcore.message import Message
from chatcore.store import Store, StoreError


def msg(text="hi", user="ana") -> Message:
    return Message(text=text, adapter="stdin", channel="local", user=user)


def log(store, text):
    return store.log_exchange(msg(text), "ok", model_id="m0", params=None)


def stored(path) -> list[str]:
    with Store(path) as s:
        return [e.user_text for e in s.exchanges()]


# --- the database file deleted or replaced under a running store (issue 17, item 2) ---------------

def _delete_all(path):
    for p in (path, f"{path}-wal", f"{path}-shm"):
        if os.path.exists(p):
            os.unlink(p)


def _replace_with_other_db(path):
    other = path.with_name("other.db")
    with Store(other) as s:
        log(s, "from the other file")
    os.replace(other, path)


@pytest.mark.parametrize("fault, words", [
    (_delete_all, "was deleted"),
    (lambda p: os.unlink(p), "was deleted"),  # the database alone
    (lambda p: os.unlink(f"{p}-wal"), "was deleted"),  # the WAL alone: every commit since lives only there
    (_replace_with_other_db, "was replaced"),
    (lambda p: os.rename(p, p.with_name("moved.db")), "was deleted"),
])
def test_write_after_the_file_went_is_refused_not_acknowledged(tmp_path, caplog, fault, words):
    path = tmp_path / "history.db"
    store = Store(path)
    log(store, "before")
    fault(path)
    with caplog.at_level(logging.CRITICAL, logger="chatcore"):
        with pytest.raises(StoreError, match=words):
            log(store, "after")
    assert any(words in r.getMessage() and r.levelno == logging.CRITICAL for r in caplog.records)
    # and for good: nothing later is acknowledged either, reads included
    with pytest.raises(StoreError, match=words):
        log(store, "later")
    with pytest.raises(StoreError, match=words):
        store.history(msg())
    store.close()
    assert "after" not in stored(path) and "later" not in stored(path)


def test_an_untouched_store_never_raises_lost(tmp_path):
    # a second process opening, writing and closing the same file is not a replacement
    path = tmp_path / "history.db"
    store = Store(path)
    for i in range(3):
        with Store(path) as other:
            log(other, f"other {i}")
        log(store, f"mine {i}")
    store.close()
    assert sorted(stored(path)) == sorted([f"other {i}" for i in range(3)] + [f"mine {i}" for i in range(3)])


# --- hostile import lines (issue 17, item 5) ----------------------------------------------------

HOSTILE = [
    (b'[' * 100_000 + b']' * 100_000, "nested too deeply"),
    (b'{"user": ' * 50_000 + b'"x"' + b'}' * 50_000, "nested too deeply"),
    (b'{"user": "hi", "assistant": "yo", "n": ' + b'9' * 5000 + b'}', "number too long"),
    (b'{"user": ' + b'1' * 4301 + b', "assistant": "yo"}', "number too long"),
    (b'{"user": NaN, "assistant": "yo"}', "not a string"),
    (b'{"user": "hi", "assistant": Infinity}', "not a string"),
    (b'[1, 2]', "not a JSON object"),
    (b'"just a string"', "not a JSON object"),
    (b'null', "not a JSON object"),
    (b'{"user": ["hi"], "assistant": "yo"}', "not a string"),
    (b'{"user": {"a": 1}, "assistant": "yo"}', "not a string"),
    (b'{"user": true, "assistant": "yo"}', "not a string"),
    (b'{"user": "hi"}', 'missing "assistant"'),
    (b'{"user": "\\ud800", "assistant": "yo"}', "surrogate"),
    (b'{"user": "a\x00b", "assistant": "yo"}', "not JSON"),  # a raw NUL byte is a control character
    (b'{"user": "hi", "assistant": "\xff\xfe"}', "not valid UTF-8"),
    (b'{"user": "hi", "assistant": "yo"', "not JSON"),
    (b'\x00' * 100, "not JSON"),
    (b'{"user": "' + b'x' * 1_100_000 + b'", "assistant": "yo"}', "longer than"),  # the limit is lowered below
]


def test_every_hostile_line_is_skipped_with_its_number_and_good_lines_import(tmp_path, history_url, monkeypatch):
    monkeypatch.setattr(store_module, "MAX_IMPORT_LINE_BYTES", 1_000_000)
    good = [json.dumps({"user": f"u{i}", "assistant": f"a{i}"}).encode() for i in range(len(HOSTILE) + 1)]
    good.append(b'{"user": "nul \\u0000 inside", "assistant": "escaped NUL is text"}')
    lines, expected_skips = [], {}
    for i, (bad, why) in enumerate(HOSTILE):
        lines.append(good[i])
        lines.append(bad)
        expected_skips[len(lines)] = why
    lines += good[len(HOSTILE):]
    source = tmp_path / "hostile.jsonl"
    source.write_bytes(b"\n".join(lines) + b"\n")

    with Store(history_url) as store:
        report = store.import_jsonl(source)
        texts = [e.user_text for e in store.exchanges()]
    assert report.imported == len(good)
    assert texts == [json.loads(g)["user"] for g in good]  # in file order
    skipped = dict(report.skipped)
    assert sorted(skipped) == sorted(expected_skips)
    for number, why in expected_skips.items():
        assert why in skipped[number], (number, skipped[number])


def test_history_import_cli_reports_bad_lines_and_keeps_good_ones(tmp_path, capsys):
    config = tmp_path / "bot.yaml"
    config.write_text(f"bot:\n  data_dir: {tmp_path}\n")
    source = tmp_path / "h.jsonl"
    source.write_bytes(b'{"user": "a", "assistant": "b"}\n' + b"[" * 100_000 + b"\n"
                       + b'{"user": 1' + b"0" * 5000 + b', "assistant": "x"}\n{"user": "c", "assistant": "d"}\n')
    assert main(["history", "import", "-c", str(config), str(source)]) == 0
    out = capsys.readouterr()
    assert "imported 2 exchange(s), skipped 2 line(s)" in out.out
    assert f"{source}:2: skipped" in out.err and f"{source}:3: skipped" in out.err
    assert stored(tmp_path / "history.db") == ["a", "c"]


def test_an_enormous_line_is_never_held_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "MAX_IMPORT_LINE_BYTES", 1000)
    source = tmp_path / "big.jsonl"
    with open(source, "wb") as f:
        f.write(b'{"user": "' + b"y" * 200_000)  # no closing quote, no newline: a runaway line
        f.write(b'\n{"user": "ok", "assistant": "fine"}')  # last line without a newline
    reads = []
    real_open = open

    class Spy:
        def __init__(self, f):
            self.f = f

        def readline(self, limit=-1):
            line = self.f.readline(limit)
            reads.append(len(line))
            return line

    with Store(tmp_path / "h.db") as store, real_open(source, "rb") as f:
        report = store.import_jsonl(Spy(f))
    assert report.imported == 1 and report.skipped == [(1, "longer than 1000 bytes")]
    assert max(reads) <= 1001


# --- locks: the import never holds the write lock while it parses (issue 17, item 14) -----------------

def test_import_lets_other_writers_in_while_it_parses(tmp_path):
    path = tmp_path / "h.db"
    store = Store(path)
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    writes = []

    def lines():
        for i in range(25_000):  # more than one staging batch
            if i in (5, 15_000):
                other.execute("BEGIN IMMEDIATE")  # timeout 0: fails at once if the import held the lock
                other.execute("INSERT INTO finetunes (at, up_to_id) VALUES (0, 0)")
                other.execute("COMMIT")
                writes.append(i)
            yield json.dumps({"user": f"u{i}", "assistant": "a"}) + "\n"

    report = store.import_jsonl(lines())
    assert report.imported == 25_000 and writes == [5, 15_000]
    assert store.stats()["exchanges"] == 25_000 and store.stats()["conversations"] == 1
    other.close()
    store.close()


def test_busy_timeout_comes_from_the_config(tmp_path):
    from chatcore.testing import make_bot

    bot = make_bot(tmp_path, config={"store": {"busy_timeout_s": 2.5}})
    try:
        assert bot.store.timeout == 2.5
    finally:
        bot.store.close()
    assert Store(tmp_path / "x.db").timeout == 30.0


def test_a_lock_held_past_the_bound_fails_clearly(tmp_path):
    path = tmp_path / "h.db"
    store = Store(path, timeout=0.2)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    with pytest.raises(StoreError, match=r"locked by another process \(gave up after 0.2 s\)"):
        log(store, "x")
    other.execute("ROLLBACK")
    log(store, "x")
    assert stored(path) == ["x"]
    other.close()
    store.close()
