"""Prompt trimming counts the tokens actually sent, with GPT-2's real tokenizer."""

from __future__ import annotations

import asyncio

import pytest

from chatcore.message import Message
from chatcore.prompt import build_prompt, render_exchange
from chatcore.testing import ScriptedEngine, make_bot
from chatcore.tokenizer import Tokenizer

HISTORY = [(f"tell me about item {i}, please", f"item {i} is a fine thing.") for i in range(40)]


@pytest.fixture(scope="module")
def count():
    return Tokenizer().count


def test_separator_tokenizes_differently_before_the_next_turn(count):
    # the defect's cause: counting each turn alone undercounts by one token per earlier turn
    turn = render_exchange("hi", "hello")
    assert count(turn + turn) == 2 * count(turn) + 1


@pytest.mark.parametrize("budget", range(20, 400, 7))
def test_prompt_fits_the_budget_exactly_and_keeps_all_that_fits(count, budget):
    prompt = build_prompt("what now?", HISTORY, count, budget=budget)
    assert count(prompt.text) <= budget
    kept = len(prompt.turns)
    assert prompt.turns == HISTORY[len(HISTORY) - kept:]
    if kept < len(HISTORY):  # maximal: one more (older) turn would not fit
        assert count(render_exchange(*HISTORY[-kept - 1]) + prompt.text) > budget


def test_a_budget_the_old_count_overran_fits(count):
    assert count(build_prompt("what now?", HISTORY, count, budget=108).text) <= 108  # was 113


class TiktokenEngine(ScriptedEngine):
    """The scripted model, counting with GPT-2's real tokenizer."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.count_tokens = Tokenizer().count


@pytest.mark.parametrize("max_new_tokens", [14, 20, 27, 33])
def test_prompts_through_the_bot_fit_the_engine(tmp_path, count, max_new_tokens):
    engine = TiktokenEngine(["item 3 is a fine thing."], block_size=128)
    bot = make_bot(tmp_path, engine=engine, config={"generation": {"max_new_tokens": max_new_tokens},
                                                   # 30 turns from one user: above the default rate limit
                                                   "plugins": {"commands": {"rate_limit": {"messages": 100}}}})
    try:
        async def chat():
            for i in range(30):
                await bot.handle(Message(text=f"tell me about item {i}, please", adapter="test",
                                         channel="c", user="u", is_direct=True))

        asyncio.run(chat())
    finally:
        asyncio.run(bot.close())
    budget = 128 - max_new_tokens
    assert max(count(p) for p in engine.prompts) <= budget
    assert max(count(p) for p in engine.prompts) > budget - 25  # the history was used, not dropped
