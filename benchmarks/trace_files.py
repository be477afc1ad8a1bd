"""Which chatcore source files one stdin message runs through, to its reply and on to a training row.

    python benchmarks/trace_files.py [ROOT]

Builds a bot around a tiny real model (not traced), then records every chatcore
file whose functions run while the stdin adapter answers one line, the exchange
is logged and counted by the auto-fine-tune plugin, and the training data reader
turns it into a training row. Counts what a newcomer must read to follow the path.
"""

from __future__ import annotations

import asyncio
import io
import sys
import tempfile
from pathlib import Path

ROOT = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1]).resolve()
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from chatcore.adapters.stdin import StdinAdapter  # noqa: E402
from chatcore.engine import Engine  # noqa: E402
from chatcore.model import GPT, GPTConfig  # noqa: E402
from chatcore.testing import make_bot  # noqa: E402
from chatcore.training import data  # noqa: E402


def main() -> int:
    torch.manual_seed(0)
    engine = Engine(GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=1, n_head=2, n_embd=16)),
                    device="cpu", dtype=torch.float32)
    seen: dict[str, str] = {}

    def profile(frame, event, arg):
        if event == "call":
            path = Path(frame.f_code.co_filename).resolve()
            for top in ("chatcore", "adapters", "plugins"):
                if (ROOT / top) in path.parents:
                    seen.setdefault(str(path.relative_to(ROOT)), frame.f_code.co_name)

    with tempfile.TemporaryDirectory() as tmp:
        bot = make_bot(tmp, engine=engine, config={"generation": {"max_new_tokens": 4}})
        adapter = StdinAdapter(bot, {"user": "ada", "stream": True}, stdin=io.BytesIO(b"hello there\n"),
                               stdout=io.StringIO())
        sys.setprofile(profile)
        threading_profile(profile)
        asyncio.run(adapter.start())
        rows = data.from_store(bot.store)
        sys.setprofile(None)
        threading_profile(None)
        bot.store.close()
    assert rows, "the exchange became a training row"
    for name in sorted(seen):
        print(f"  {name}  (first: {seen[name]})")
    print(f"files: {len(seen)}")
    return 0


def threading_profile(fn) -> None:
    import threading

    threading.setprofile(fn)  # the model runs on a worker thread


if __name__ == "__main__":
    sys.exit(main())
