"""Several bot instances on one history (SQLite file or PostgreSQL): rate limits and delivery de-duplication hold across them."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from chatcore import DROP
from chatcore.plugins.commands import RateLimiter
from chatcore.store import Store
from chatcore.testing import ScriptedEngine, TestBot, make_bot


def store_url(history_url) -> str:
    return history_url if isinstance(history_url, str) else f"sqlite:///{history_url}"


@pytest.fixture
def two_bots(tmp_path: Path, history_url):
    """Two whole bots, each with its own data dir and `Store`, on one history."""
    config = {"history": {"url": store_url(history_url)}, "bot": {"admins": ["test:root"]},
              "plugins": {"commands": {"rate_limit": {"messages": 3, "seconds": 3600}}}}
    bots = [TestBot(make_bot(tmp_path / name, engine=ScriptedEngine(), config=config)) for name in ("a", "b")]
    yield bots
    for bot in bots:
        bot.close()


def test_a_sender_over_the_limit_on_one_instance_is_refused_on_the_other(two_bots):
    a, b = two_bots
    assert a.ask("one", user="carol") == "You said: one"
    assert b.ask("two", user="carol") == "You said: two"
    assert a.ask("three", user="carol") == "You said: three"
    notice = b.ask("four", user="carol")  # b itself saw only one message from carol
    assert "faster than I can keep up" in notice and "wait 3600 s" in notice
    assert a.ask("five", user="carol") is None  # told once per window, whichever instance told her
    assert b.ask("six", user="carol") is None
    assert a.ask("hello", user="dave") == "You said: hello"  # per sender
    for bot in (a, b):
        for _ in range(4):
            assert bot.ask("hi", user="root") == "You said: hi"  # admins are exempt everywhere
    texts = [e.user_text for e in a.bot.store.exchanges()]
    assert texts.count("one") == texts.count("four") + 1 == 1 and "five" not in texts


def test_the_window_slides_and_the_notice_comes_once_per_window_across_stores(history_url):
    now = [1000.0]
    with Store(history_url) as one, Store(history_url) as two:
        a = RateLimiter(2, 10, clock=lambda: now[0], store=one)
        b = RateLimiter(2, 10, clock=lambda: now[0], store=two)
        assert a.check("u") is None
        now[0] = 1001.0
        assert b.check("u") is None
        now[0] = 1002.0
        assert "wait 8 s" in b.check("u")  # the first slot frees at 1010
        now[0] = 1003.0
        assert a.check("u") is DROP and b.refusal("u").retry_after == 7
        assert a.check("other") is None  # per sender
        now[0] = 1010.5  # the first message left the window: one slot, then a new window's notice
        assert b.check("u") is None
        assert "wait 1 s" in a.check("u")
        assert b.check("u") is DROP
        now[0] = 5000.0  # every row expired: the next call of any instance prunes them all
        assert a.check("fresh") is None
        assert list(one.table_rows("rate_events")) == [("fresh", 5010.0)]
        assert list(two.table_rows("rate_notices")) == []


def test_no_limit_costs_no_store_call(tmp_path):
    with Store(tmp_path / "h.db") as store:
        store.rate_limit = None  # would raise if called
        limiter = RateLimiter(0, 60, store=store)
        assert all(limiter.check("u") is None for _ in range(100))


def test_the_rate_limit_query_uses_its_index(tmp_path):
    Store(tmp_path / "h.db").close()
    db = sqlite3.connect(tmp_path / "h.db")
    plan = " ".join(str(r) for r in db.execute(
        "EXPLAIN QUERY PLAN SELECT COUNT(*) FROM rate_events WHERE limit_key = ? AND expires > ?", ("u", 1.0)))
    prune = " ".join(str(r) for r in db.execute("EXPLAIN QUERY PLAN DELETE FROM rate_events WHERE expires <= ?", (1.0,)))
    db.close()
    assert "rate_events_by_key" in plan and "rate_events_by_expiry" in prune


def test_a_delivery_is_first_once_across_stores_until_it_expires(history_url):
    with Store(history_url) as one, Store(history_url) as two:
        assert one.first_delivery("slack:A1", "Ev1", now=100.0)
        assert not two.first_delivery("slack:A1", "Ev1", now=101.0)
        assert not one.first_delivery("slack:A1", "Ev1", now=102.0)
        assert two.first_delivery("slack:A2", "Ev1", now=102.0)  # another app's event
        assert two.first_delivery("slack:A1", "Ev2", now=102.0)
        assert one.first_delivery("slack:A1", "Ev1", now=3800.0)  # forgotten after an hour
        assert len(list(one.table_rows("deliveries"))) == 1  # the expired ones were pruned


def test_racing_instances_take_an_event_exactly_once(history_url):
    stores = [Store(history_url) for _ in range(6)]
    won: list[bool] = []
    start = threading.Barrier(len(stores))

    def deliver(store: Store) -> None:
        start.wait()
        won.append(store.first_delivery("slack:A1", "EvRace"))

    threads = [threading.Thread(target=deliver, args=(s,)) for s in stores]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        for s in stores:
            s.close()
    assert sorted(won) == [False] * 5 + [True]
