"""The engine benchmark's batch mode still runs against the bot's serving path (a few seconds of GPT-2 shapes).

Benchmarks are scripts that nothing else runs (see test_loadtest_smoke.py): this runs
``benchmarks/engine.py --batch`` for the served int8 contestant, in its own worker process
as a real run does, and checks it reports every conversation's tokens and its peak RSS.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_engine_benchmark_serves_a_batch_and_reports_its_peak_rss():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "engine.py"), "--engines", "chatcore-int8",
                          "--batch", "3", "--prompts", "8", "--new-tokens", "4", "--json"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    runs = [r for r in records if "total_tok_s" in r]
    assert [(r["engine"], r["batch"], r["prompt_tokens"]) for r in runs] == [("chatcore-int8", 3, 8)]
    # 4 tokens each: the weights and every draw are seeded, and none of these draws is end-of-text
    assert runs[0]["new_tokens"] == 12 and runs[0]["ttft_s"] > 0 and runs[0]["total_tok_s"] > 0
    assert [r["peak_rss_mb"] > 100 for r in records if "peak_rss_mb" in r] == [True]
