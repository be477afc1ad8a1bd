"""Training data: rendering, loss mask, split by conversation, guards, broken lines."""

from __future__ import annotations

import json

import pytest
import torch

from chatcore.prompt import render_exchange
from chatcore.tokenizer import Tokenizer
from chatcore.training.data import (TrainingExchange, GuardConfig, apply_guards, build_dataset, eval_batches, from_store,
                                    get_batch, load_jsonl, split_by_conversation, tokenize)



@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer()


def ex(user: str, assistant: str, conv: str = "c", uid: str | None = None, bad: bool = False) -> TrainingExchange:
    return TrainingExchange(user=user, assistant=assistant, conversation=conv, user_id=uid, bad=bad)


def test_tokens_are_the_rendered_conversation_and_mask_covers_replies(tok):
    conv = [ex("hi there", "hello!", "a"), ex("how are you?", "fine, thanks", "a")]
    data = tokenize(conv + [ex("second <|endoftext|> doc", "ok", "b")], tok)
    text_a = render_exchange("hi there", "hello!") + render_exchange("how are you?", "fine, thanks")
    ids_a = tok.encode(text_a)
    # one conversation is tokenized as one text, exactly as earlier turns precede a prompt
    assert data.tokens[: len(ids_a)].tolist() == ids_a
    assert data.tokens[len(ids_a)].item() == tok.eot_token
    # user-typed <|endoftext|> stays plain text: only the two document separators are EOT
    assert (data.tokens == tok.eot_token).sum().item() == 2
    masked = tok.decode(t for t, m in zip(data.tokens.tolist(), data.mask.tolist()) if m)
    assert masked == " hello!\n\n fine, thanks\n\n<|endoftext|> ok\n\n<|endoftext|>"
    whole = tokenize(conv, tok, loss_on="all")
    assert whole.mask.all()
    with pytest.raises(ValueError):
        tokenize(conv, tok, loss_on="reply")


def test_split_is_by_conversation_deterministic_and_stable():
    exchanges = [ex(f"u{i}", f"a{i}", conv=f"c{i // 3}") for i in range(300)]
    train, val = split_by_conversation(exchanges, 0.1, seed=1)
    assert {e.conversation for e in train}.isdisjoint({e.conversation for e in val})
    assert len(train) + len(val) == 300 and 0 < len(val) < 90
    assert split_by_conversation(exchanges, 0.1, seed=1) == (train, val)
    # more data later: no conversation changes side
    grown = exchanges + [ex("new", "data", conv=f"n{i}") for i in range(50)]
    _, val2 = split_by_conversation(grown, 0.1, seed=1)
    assert {e.conversation for e in val} <= {e.conversation for e in val2}
    # tiny sets still get a validation conversation
    assert len(split_by_conversation([ex("a", "bb", "x"), ex("c", "dd", "y")], 0.1)[1]) == 1


def test_guards_remove_what_they_should_and_report_it():
    data = [
        ex("hello", "hi there", "1", "u:alice"),
        ex("hello", "hi there", "2", "u:bob"),  # exact duplicate
        ex("Hello!!", "Hi, there.", "3", "u:bob"),  # near duplicate
        ex("ok", "k", "4", "u:bob"),  # reply too short
        ex("tell me", "no", "5", "u:bob", bad=True),  # marked bad
        ex("secret", "stuff", "6", "u:gone"),  # forgotten user
    ] + [ex(f"question {i}", f"answer {i}", f"m{i}", "u:mallory") for i in range(10)]
    kept, report = apply_guards(data, GuardConfig(excluded_users=frozenset({"u:gone"}), max_user_share=0.5))
    r = report.removed
    assert (r["exact_duplicate"], r["near_duplicate"], r["too_short"], r["bad"], r["excluded_user"]) == (1, 1, 1, 1, 1)
    users = [e.user_id for e in kept]
    assert "u:gone" not in users
    # mallory would be 10 of 11; capped to half of what is kept, newest first
    assert users.count("u:mallory") == 1 and r["user_share"] == 9
    assert kept[-1].user == "question 9"
    assert report.kept == len(kept) == 2
    assert "user_share: 9" in str(report)

    # every guard can be switched off (exclusion of forgotten users cannot)
    off = GuardConfig(drop_exact_duplicates=False, drop_near_duplicates=False, min_user_chars=0,
                      min_assistant_chars=0, max_user_share=None, drop_bad=False,
                      excluded_users=frozenset({"u:gone"}))
    kept_all, report_all = apply_guards(data, off)
    assert len(kept_all) == len(data) - 1 and report_all.removed["excluded_user"] == 1
    with pytest.raises(ValueError, match="unknown guard"):
        GuardConfig.from_dict({"max_share": 0.2})


def test_single_user_is_not_capped():
    data = [ex(f"q{i}", f"answer {i}", f"c{i}", "u:solo") for i in range(20)]
    kept, report = apply_guards(data, GuardConfig(max_user_share=0.2))
    assert len(kept) == 20 and report.removed["user_share"] == 0


def test_broken_jsonl_lines_are_skipped_and_counted(tmp_path):
    p = tmp_path / "chat_history.jsonl"
    p.write_text("\n".join([
        json.dumps({"user": "a", "assistant": "bb"}),
        "{not json",
        json.dumps(["a", "list"]),
        "",
        json.dumps({"user": "only user"}),
        json.dumps({"user": "c", "assistant": "dd", "conversation": "k", "user_id": "x:1", "bad": True}),
    ]) + "\n", encoding="utf-8")
    exchanges, bad = load_jsonl(p)
    assert [b.line for b in bad] == [2, 3, 5]
    assert [e.user for e in exchanges] == ["a", "c"]
    assert exchanges[0].conversation != exchanges[1].conversation
    assert exchanges[1].bad and exchanges[1].user_id == "x:1"


def test_sample_dataset_builds_with_a_held_out_split(tok, sample_conversations):
    exchanges, bad = load_jsonl(sample_conversations)
    assert len(exchanges) == 350 and not bad
    ds = build_dataset(exchanges, tok)
    assert ds.train_exchanges + ds.val_exchanges == ds.guard_report.kept
    assert 0.05 < ds.val_exchanges / ds.guard_report.kept < 0.2
    assert 0.3 < ds.train.mask.float().mean() < 0.7  # replies are roughly half the tokens
    assert ds.summary()["data_hash"] == build_dataset(exchanges, tok).hash


def test_batches_mark_untrained_targets(tok):
    data = tokenize([ex("a question here", "an answer", "1"), ex("another", "reply text", "2")], tok)
    x, y = get_batch(data, 4, 8, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 8)
    assert (y == -1).any() and (y >= 0).any()
    windows = list(eval_batches(data, 2, 8))
    targets = sum(int((yy != -1).sum()) for _, yy in windows)
    assert targets == data.target_tokens  # every target scored exactly once


def test_from_store_skips_opted_out_and_marks_bad(tmp_path):
    from chatcore.message import Message
    from chatcore.store import Store

    store = Store(tmp_path / "h.db")
    m = lambda user, text: Message(text=text, adapter="t", channel="c", user=user)  # noqa: E731
    e1 = store.log_exchange(m("alice", "hi"), "hello", model_id="x", params=None)
    store.log_exchange(m("bob", "yo"), "hey", model_id="x", params=None)
    store.log_exchange(m("carol", "secret"), "noted", model_id="x", params=None)
    store.add_feedback(e1.id, "t:bob", -1)
    store.opt_out("t:carol")
    rows = from_store(store)
    assert [r.user for r in rows] == ["hi", "yo"]
    assert rows[0].bad and not rows[1].bad and rows[0].user_id == "t:alice"
    assert rows[0].conversation != rows[1].conversation
    store.close()
