"""The load-test script still runs against the bot as it is now (a tiny model, a few seconds).

Benchmarks are scripts, not tests, so nothing else runs them: a change to a model or serving
signature once made every request of `benchmarks/loadtest.py` fail with a 500 while the
whole suite passed. This runs its quick mode and checks what the script itself checks.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_quick_load_test_answers_every_request_and_stores_every_exchange():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "loadtest.py"), "--quick", "--seconds", "4", "--json"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["answered"] > 0 and result["errors"] == 0, result
    assert result["missing_from_store"] == 0, result
    assert 0 < result["decode_forward_s"] + result["prompt_forward_s"] < result["wall_s"]
    assert [phase["answered"] for phase in result["phases"]] and sum(p["answered"] for p in result["phases"]) <= result["answered"]
