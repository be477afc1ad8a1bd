"""What users see and control of their data: /learn, /mydata, and history retention.

- ``/learn on`` / ``/learn off`` record the user's consent to be learned from
  (`chatcore.consent`); ``/learn`` shows it and this channel's policy. An answer
  counts from now on: what was said before keeps the decision made then.
- ``/mydata`` hands the user a JSON file of everything stored about them, in a
  direct message only (a channel would show it to everyone).
- ``history.retention_days``: exchanges older than that are deleted at start and
  then daily; each run is logged with its counts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref
from typing import Any

from chatcore import hookimpl
from chatcore.consent import describe
from chatcore.message import File, Reply

log = logging.getLogger("chatcore.privacy")

RETENTION_INTERVAL_S = 24 * 3600


@hookimpl
def register_commands(register):
    register("learn", learn)
    register("mydata", mydata)


async def learn(bot, message, args):
    """Whether I may learn from your messages: /learn on, /learn off, or /learn to see."""
    arg = args.strip().lower()
    store = bot.store
    if arg in ("on", "yes"):
        await store.run(store.set_consent, message.user_key, "yes")
        return ("OK: from now on I may learn from your messages where training is on. "
                + await store.run(describe, bot, message))
    if arg in ("off", "no"):
        await store.run(store.set_consent, message.user_key, "no")
        return ("OK: I won't learn from your messages, including the ones you already sent. "
                "/forget also deletes them.")
    if arg:
        return "Usage: /learn [on|off]"
    state = {"yes": "you said yes", "no": "you said no", "unset": "you have not said"}[
        await store.run(store.consent_state, message.user_key)]
    return f"Learning from you: {state}. {await store.run(describe, bot, message)}"


async def mydata(bot, message, args):
    """Get a file of everything I stored about you (in a direct message)."""
    if not message.authenticated or message.anonymous:  # a self-declared user could be anyone
        return "I can't be sure who you are here, so I can't hand out stored data (use the API key)."
    if not message.is_direct:
        return "Ask me in a direct message: I only send your data there, never in a shared channel."
    data = await bot.store.run(bot.store.user_data, message.user_key)
    body = json.dumps(data, indent=2, ensure_ascii=False).encode("utf-8")
    name = f"mydata-{message.adapter}-{_safe(message.user)}.json"
    text = (f"Here is everything I stored about you: {len(data['exchanges'])} exchange(s), "
            f"{len(data['votes'])} vote(s). /forget deletes it.")
    return Reply(text=text, message=message, from_model=False,
                 files=(File(name, body, "application/json"),))


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:64] or "user"


# --- retention -----------------------------------------------------------------------


def run_retention(store: Any, days: float | None, now: float | None = None) -> dict[str, int] | None:
    """Delete exchanges older than `days` (None: keep everything); logs and returns the counts."""
    if not days:
        return None
    cutoff = (time.time() if now is None else now) - float(days) * 86400
    counts = store.delete_older_than(cutoff)
    log.info("retention (%g days): deleted %d exchange(s) and %d conversation(s) said before %s",
             days, counts["exchanges"], counts["conversations"],
             time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(cutoff)))
    return counts


_tasks: "weakref.WeakKeyDictionary[Any, asyncio.Task]" = weakref.WeakKeyDictionary()


@hookimpl
async def startup(bot):
    days = bot.config.get("history.retention_days")
    if not days:
        return
    await bot.store.run(run_retention, bot.store, days)

    async def daily() -> None:
        while True:
            await asyncio.sleep(RETENTION_INTERVAL_S)
            try:
                await bot.store.run(run_retention, bot.store, days)
            except Exception:  # a locked database one day is retried the next
                log.exception("retention run failed")

    _tasks[bot] = asyncio.create_task(daily(), name="chatcore:retention")


@hookimpl
def shutdown(bot):
    task = _tasks.pop(bot, None)
    if task is not None:
        task.cancel()
