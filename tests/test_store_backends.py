"""The store's consent, retention and dashboard queries on both backends (SQLite and a real PostgreSQL)."""

from __future__ import annotations

from chatcore.message import Message
from chatcore.store import Store


def msg(text, user="ana", adapter="stdin", channel="local") -> Message:
    return Message(text=text, adapter=adapter, channel=channel, user=user)


def test_consent_retention_and_dashboard_queries(history_url):
    with Store(history_url) as s:
        old = s.log_exchange(msg("old"), "ok", model_id="m", params=None, created_at=86400 * 10 + 50_000.0,
                             replied_at=86400 * 10 + 50_001.0)  # after noon: a rounding CAST would move its day
        new = s.log_exchange(msg("New Text", user="bo"), "Reply", model_id="m", params=None,
                             created_at=86400 * 11 + 10.0, replied_at=86400 * 11 + 11.0)
        s.add_feedback(old.id, "stdin:bo", 1)
        s.add_feedback(new.id, "stdin:ana", -1)
        s.set_consent("stdin:ana", "yes")
        s.set_consent("stdin:ana", "no")  # the last word wins
        assert s.consent_state("stdin:ana") == "no"
        assert set(s.first_seen()) == {"stdin:ana", "stdin:bo"}

        days = s.daily_activity(days=2, now=86400 * 11 + 20.0)
        assert [(d["day"], d["exchanges"]) for d in days] == [("1970-01-11", 1), ("1970-01-12", 1)]
        today = s.daily_activity(days=1)  # the votes were cast now
        assert (today[0]["good"], today[0]["bad"]) == (1, 1)
        assert [e.id for e in s.search_exchanges("new text")] == [new.id]
        assert [e.id for e in s.search_exchanges("reply", user_key="stdin:bo")] == [new.id]
        assert s.channels() == [{"adapter": "stdin", "channel": "local", "exchanges": 2}]

        deleted = s.delete_older_than(86400 * 11.0)
        assert deleted["exchanges"] == 1
        assert [e.user_text for e in s.exchanges(include_opted_out=True)] == ["New Text"]
        s.forget_user("stdin:bo")
        assert "stdin:bo" in s.forgotten()
        s.log_exchange(msg("x", adapter="slack", channel="C1/1.2"), "y", model_id="m", params=None)
        assert s.relabel(adapter="slack", policy="opt_in", channel="C1")["matched"] == 1
        assert s.relabel(adapter="slack", policy="opt_out", channel="C1", apply=True)["matched"] == 1
