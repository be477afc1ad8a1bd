"""The stdin adapter answers a full model queue with the busy reply, as the other adapters do (issue 9, defect 9)."""

from __future__ import annotations

import asyncio
import io
import threading

from chatcore.adapters.stdin import StdinAdapter
from chatcore.message import BUSY_REPLY
from chatcore.testing import ScriptedEngine, make_bot


async def test_a_full_queue_gets_the_busy_reply_and_the_chat_goes_on(tmp_path):
    gate = threading.Event()
    bot = make_bot(tmp_path, engine=ScriptedEngine(lambda prompt: "late" if gate.wait(10) else "never"),
                   config={"serving": {"max_queue": 1}})
    try:
        # another adapter's request holds the only place in the queue
        task = asyncio.create_task(bot.generator.generate("Human: elsewhere\nAssistant:", bot.params))
        while not bot.engine.prompts:
            await asyncio.sleep(0.01)
        out = io.StringIO()
        adapter = StdinAdapter(bot, {"user": "ada", "stream": True}, stdin=io.BytesIO(b"hi\nagain\n"), stdout=out)
        await adapter.start()  # must neither raise nor stop at the first busy answer
        assert out.getvalue().splitlines() == [BUSY_REPLY, BUSY_REPLY]
        gate.set()
        assert (await task).strip() == "late"
    finally:
        gate.set()
        await bot.close()
