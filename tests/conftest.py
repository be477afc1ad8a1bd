"""Shared test setup: keep every test offline and on loopback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Nothing in the suite may reach the Hugging Face hub or tiktoken's download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the project root (GPT-2 BPE files, sample conversations, naughty strings)."""
    path = SHARED / "data"
    if not path.is_dir():
        pytest.skip("../shared/data is not present")
    return path


@pytest.fixture(scope="session")
def sample_conversations(shared_data: Path) -> Path:
    """The 350-exchange seed-format chat_history.jsonl in ../shared/data."""
    return shared_data / "sample_conversations.jsonl"
