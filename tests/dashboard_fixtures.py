"""A bot with history, feedback and fine-tunes on disk, for the dashboard tests (imported explicitly)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from chatcore import checkpoint
from chatcore.message import Message
from chatcore.testing import make_bot
from chatcore.registry import Registry

from .engine_fixtures import tiny_model

PASSWORD = "correct horse battery staple"


def dashboard_bot(tmp_path: Path, **dashboard: Any) -> Any:
    """A scripted bot whose store holds a week of chats and whose models dir has three fine-tunes."""
    config = {"dashboard": {"enabled": True, "port": 0, "admins": {"alice": "${DASH_PW}"}, **dashboard}}
    bot = make_bot(tmp_path, config=config, environ={"DASH_PW": PASSWORD})
    fill_store(bot.store)
    fill_models(tmp_path / "models")
    return bot


def fill_store(store: Any, now: float | None = None) -> None:
    now = time.time() if now is None else now
    for day in range(7):
        for i in range(day + 2):  # more chats every day
            user = f"u{i % 3}"
            channel = "general" if i % 2 else "random"
            msg = Message(text=f"hello {day}-{i} tea", adapter="discord", channel=channel, user=user, is_direct=False)
            at = now - (6 - day) * 86400 - 60 * i
            ex = store.log_exchange(msg, f"reply {day}-{i}", model_id="scripted", params={}, created_at=at,
                                    replied_at=at + 1)
            if i % 3 == 0:
                store.add_feedback(ex.id, f"discord:{user}", 1)
            elif i % 4 == 1:
                store.add_feedback(ex.id, f"discord:{user}", -1)
    store.log_exchange(Message(text="secret plans", adapter="slack", channel="ops", user="bob", is_direct=True),
                       "noted", model_id="scripted", params={})


def fill_models(models: Path) -> list[Path]:
    """Three tiny fine-tunes with loss curves: two promoted (the second serves), one rejected."""
    paths = []
    for n in range(3):
        history = [{"iter": 0, "val_loss": 5.0 - n / 10}] + [
            {"iter": it, "train_loss": 4.8 - it / 100 - n / 10, "val_loss": 4.9 - it / 120 - n / 10}
            for it in (10, 20, 30)]
        p = checkpoint.save(tiny_model(seed=n), models / f"finetuned_20260101_00000{n}", base_model="tiny",
                            iteration=30, train_loss=history[-1]["train_loss"], val_loss=history[-1]["val_loss"],
                            initial_val_loss=history[0]["val_loss"], history=history, stopped=False,
                            data={"train_exchanges": 40 + n, "val_exchanges": 5, "train_tokens": 900,
                                  "val_tokens": 100, "guards": {"exact_duplicates": 2, "bad_feedback": n}})
        paths.append(p)
    reg = Registry(models)
    gate = {"candidate_val_loss": 4.6, "serving_val_loss": 4.9, "promoted": True, "reason": "beats serving"}
    reg.promote(paths[0], gate)
    reg.reject(paths[1], {**gate, "promoted": False, "reason": "does not beat serving"})
    reg.promote(paths[2], gate)
    return paths
