"""stop() ends a stdin chat that is waiting for input (SIGTERM while nobody types), without waiting for a line."""

from __future__ import annotations

import asyncio
import os

from chatcore.adapters.stdin import StdinAdapter
from chatcore.testing import make_bot


async def test_stop_ends_a_chat_waiting_for_input(tmp_path):
    bot = make_bot(tmp_path)
    read_end, write_end = os.pipe()  # input that never comes
    try:
        with open(read_end, "rb", buffering=0) as stdin, open(os.devnull, "w") as out:
            adapter = StdinAdapter(bot, {"user": "ada"}, stdin=stdin, stdout=out)
            task = asyncio.create_task(adapter.start())
            await asyncio.sleep(0.1)
            await adapter.stop()
            await asyncio.wait_for(task, 2)
    finally:
        os.close(write_end)
        await bot.close()
