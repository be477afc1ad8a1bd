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


@pytest.fixture(scope="session")
def pg_cluster():
    """A real PostgreSQL server for the session (Debian's `postgresql` package), stopped at the end."""
    from tests.pgcluster import Cluster, find_bin

    bin_dir = find_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql, "
                    "or set CHATCORE_PG_BIN")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg is not installed: pip install -e '.[postgres]'")
    cluster = Cluster(bin_dir).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def history_url(request, tmp_path):
    """Where a test's history lives, once per backend: an SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield tmp_path / "history.db"
        return
    url = request.getfixturevalue("pg_cluster").new_database()
    yield url
    import psycopg

    with psycopg.connect(url) as conn:  # the test's history really lived in PostgreSQL, not in a file named like the URL
        assert conn.execute("SELECT to_regclass('exchanges')").fetchone()[0] is not None
