"""chatcore.text.split_message: paragraph, sentence, word cuts; code blocks kept whole or re-fenced."""

import random

import pytest

from chatcore.text import split_message


def _words(text: str) -> list[str]:
    return text.split()


def test_short_text_is_one_chunk_and_blank_is_none():
    assert split_message("hello there", 2000) == ["hello there"]
    assert split_message("   \n\n ", 2000) == []
    assert split_message("", 50) == []


def test_limit_too_small_is_a_clear_error():
    with pytest.raises(ValueError, match="at least"):
        split_message("abc", 3)


def test_prefers_paragraph_boundaries():
    paras = [("Paragraph %d. " % i) + "word " * 30 for i in range(6)]
    text = "\n\n".join(p.strip() for p in paras)
    chunks = split_message(text, 400)
    assert all(len(c) <= 400 for c in chunks)
    # every chunk is made of whole paragraphs
    for c in chunks:
        for para in c.split("\n\n"):
            assert para.startswith("Paragraph")
            assert para.endswith("word")
    assert _words(" ".join(chunks)) == _words(text)


def test_falls_back_to_sentences_then_words():
    sentence = "This is a sentence with several words in it."
    text = " ".join([sentence] * 40)  # one long paragraph
    chunks = split_message(text, 200)
    assert all(len(c) <= 200 for c in chunks)
    assert all(c.endswith(".") for c in chunks)
    assert _words(" ".join(chunks)) == _words(text)

    no_punct = " ".join(f"w{i}" for i in range(500))
    chunks = split_message(no_punct, 100)
    assert all(len(c) <= 100 for c in chunks)
    assert _words(" ".join(chunks)) == _words(no_punct)  # no word was cut


def test_hard_cut_only_for_a_word_longer_than_the_limit():
    text = "start " + "x" * 250 + " end"
    chunks = split_message(text, 100)
    assert all(len(c) <= 100 for c in chunks)
    assert "".join(chunks).replace(" ", "") == text.replace(" ", "")


def test_a_code_block_that_fits_is_never_cut():
    code = "```python\n" + "\n".join(f"x{i} = {i}  # line" for i in range(20)) + "\n```"
    text = "Intro sentence here.\n\n" + code + "\n\nOutro. " + "more words " * 30
    assert len(code) < 500 < len(text)
    chunks = split_message(text, 500)
    assert all(len(c) <= 500 for c in chunks)
    assert sum(code in c for c in chunks) == 1
    assert all(c.count("```") % 2 == 0 for c in chunks)


def test_code_block_moves_to_next_chunk_rather_than_being_cut():
    prose = "Some words before. " * 10
    code = "```\n" + "\n".join("print('hello world')" for _ in range(10)) + "\n```"
    chunks = split_message(prose + "\n\n" + code, 300)
    assert chunks[-1] == code
    assert all(len(c) <= 300 for c in chunks)


def test_too_long_code_block_is_refenced_across_chunks():
    lines = [f"    value_{i} = compute({i})" for i in range(100)]
    code = "```python\n" + "\n".join(lines) + "\n```"
    chunks = split_message("Here you go:\n\n" + code, 400)
    assert len(chunks) > 3
    assert all(len(c) <= 400 for c in chunks)
    code_chunks = [c for c in chunks if "value_" in c]
    for c in code_chunks:
        assert c.startswith("```python\n") and c.endswith("\n```"), c[:30] + "..." + c[-30:]
    # the code lines survive intact, indentation included, in order
    body = [ln for c in code_chunks for ln in c.split("\n") if ln.startswith("    value_")]
    assert body == lines


def test_unclosed_fence_and_single_huge_code_line():
    text = "```\n" + "y" * 1000
    chunks = split_message(text, 200)
    assert all(len(c) <= 200 for c in chunks)
    assert "".join(c.replace("```\n", "").replace("\n```", "") for c in chunks) == "y" * 1000


@pytest.mark.parametrize("seed", range(20))
def test_random_text_keeps_every_character_and_respects_the_limit(seed):
    rng = random.Random(seed)
    pieces = ["word", "Sentence.", "\n", "\n\n", "x" * rng.randint(1, 90), "\n```\n", "\n```py\n", "  ", "?!", "é🙂"]
    text = " ".join(rng.choice(pieces) for _ in range(rng.randint(50, 600)))
    limit = rng.choice([16, 40, 100, 2000])
    chunks = split_message(text, limit)
    assert all(0 < len(c) <= limit for c in chunks)
    # nothing but whitespace and re-added fences is ever lost or added
    strip = lambda s: "".join(s.split()).replace("`", "")  # noqa: E731
    assert strip("".join(chunks)).replace("py", "") == strip(text).replace("py", "")
