"""How long `chatcore history import` keeps a running bot waiting: the longest wait for the write lock.

A probe thread plays the bot: it takes and releases the write lock every 10 ms on its own
connection and records its longest wait, while the import runs. Usage:

    python benchmarks/store_import.py [lines]   (default 1,000,000)
"""

from __future__ import annotations

import json
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

from chatcore.store import Store


def main(lines: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path, source = Path(tmp) / "history.db", Path(tmp) / "history.jsonl"
        with open(source, "w", encoding="utf-8") as f:
            for i in range(lines):
                f.write(json.dumps({"user": f"question number {i}?", "assistant": f"answer number {i}."}) + "\n")
        store = Store(path)
        done, waits = threading.Event(), []

        def probe() -> None:
            db = sqlite3.connect(path, timeout=600, isolation_level=None)
            while not done.is_set():
                start = time.perf_counter()
                db.execute("BEGIN IMMEDIATE")
                db.execute("COMMIT")
                waits.append(time.perf_counter() - start)
                time.sleep(0.01)
            db.close()

        thread = threading.Thread(target=probe)
        thread.start()
        start = time.perf_counter()
        report = store.import_jsonl(source)
        total = time.perf_counter() - start
        done.set()
        thread.join()
        store.close()
    print(f"imported {report.imported:,} lines in {total:.1f} s; a writer beside it waited at most "
          f"{max(waits):.2f} s for the lock ({len(waits)} probes)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000)
