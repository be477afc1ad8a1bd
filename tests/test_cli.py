"""The `chatcore` command: history round trip, exit codes, help everywhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chatcore.cli import main


@pytest.fixture
def config(tmp_path) -> Path:
    path = tmp_path / "bot.yaml"
    path.write_text(f"bot:\n  data_dir: {tmp_path / 'data'}\n")
    return path


def test_history_import_export_round_trip(config, tmp_path, shared_data, capsys):
    source = shared_data / "sample_conversations.jsonl"
    assert main(["history", "import", "-c", str(config), str(source)]) == 0
    assert "imported 350 exchange(s), skipped 0 line(s)" in capsys.readouterr().out
    out = tmp_path / "out.jsonl"
    assert main(["history", "export", "-c", str(config), "-o", str(out)]) == 0
    assert out.read_bytes() == source.read_bytes()
    assert main(["history", "stats", "-c", str(config)]) == 0
    assert json.loads(capsys.readouterr().out)["exchanges"] == 350


def test_import_reports_bad_lines_with_numbers(config, tmp_path, capsys):
    data = tmp_path / "in.jsonl"
    data.write_text('{"user": "a", "assistant": "b"}\nnot json\n{"user": 1, "assistant": "x"}\n'
                    '{"user": "c", "assistant": "d"}\n')
    assert main(["history", "import", "-c", str(config), str(data)]) == 0
    captured = capsys.readouterr()
    assert "imported 2 exchange(s), skipped 2 line(s)" in captured.out
    assert "in.jsonl:2: skipped" in captured.err and "in.jsonl:3: skipped" in captured.err


def test_exit_codes(config, tmp_path, capsys):
    assert main([]) == 2  # no command: help, usage error
    assert main(["history", "import", "-c", str(config), str(tmp_path / "nope.jsonl")]) == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("bott: {}\n")
    assert main(["history", "stats", "-c", str(bad)]) == 2
    assert "bott: unknown key (did you mean 'bot'?) (bad.yaml, line 1)" in capsys.readouterr().err


def test_unreadable_database_is_a_clear_error(tmp_path, capsys):
    not_db = tmp_path / "data" / "history.db"
    not_db.parent.mkdir()
    not_db.write_bytes(b"this is not a database" * 100)
    config = tmp_path / "bot.yaml"
    config.write_text(f"bot:\n  data_dir: {tmp_path / 'data'}\n")
    assert main(["history", "stats", "-c", str(config)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("chatcore: ") and "Traceback" not in err


@pytest.mark.parametrize("args", [[], ["run"], ["chat"], ["history"], ["history", "export"], ["history", "import"],
                                  ["history", "stats"], ["config"], ["config", "check"]])
def test_help_everywhere(args):
    out = subprocess.run([sys.executable, "-m", "chatcore.cli", *args, "--help"], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0 and "usage: chatcore" in out.stdout


def test_a_reader_that_stops_early_gets_no_traceback(config, shared_data):
    assert main(["history", "import", "-c", str(config), str(shared_data / "sample_conversations.jsonl")]) == 0
    # the export (350 exchanges, ~100 KB) outgrows the pipe buffer long after the reader has gone
    proc = subprocess.run(
        f"{sys.executable} -m chatcore.cli history export -c {config} | head -n 1",
        shell=True, capture_output=True, text=True, timeout=120,
    )
    assert proc.stdout.count("\n") == 1 and proc.stdout.startswith("{")
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
