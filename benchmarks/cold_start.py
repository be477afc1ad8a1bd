"""Cold start: from process start to the first reply, weights on disk (GPT-2 124M shapes).

A GPT-2 124M-shaped checkpoint with random weights is saved as chatcore saves
them (fp32 safetensors + sidecar, `chatcore.checkpoint.save`) in a temporary
folder, with a minimal config (the checkpoint, ``model.quantize`` none or int8,
``generation.max_new_tokens``, a temporary data folder; everything else default).
Each measurement is a fresh process with an empty history (a new conversation), for fp32
and int8, ``--repeats`` times:

- ``first reply``: ``chatcore chat -c CONFIG`` (what a user runs, through
  `chatcore.cli.main`) with one line piped in; the time from just before the
  process is started to the first reply line on its stdout, the process's
  peak RSS (``wait4``'s ``ru_maxrss``) and its CPU time, user + system, to its
  exit (on a busy machine the steadier figure);
- phases: a process that runs the same steps as `chatcore chat` one by one
  and timestamps them: python (interpreter start), imports (chatcore, torch,
  the plugins and adapters; through `chatcore.cli.import_bot`, as `chatcore
  chat` does, where the code has it), config, weight load (reading the file; int8
  quantizes each matrix as it is read), quantize (`Int8Loader.finish`: packing
  the int8 matrices), tokenizer, validate (`check_servable`), other (store,
  generator), first generation (one message through `Bot.handle`: prompt,
  decode, history write) and a second one (what the first one's warm-up cost
  shows against); plus its resident memory after loading (anonymous vs file
  pages).

With ``--baseline REF`` the same cases also run on the code of git ref REF
(its chatcore, adapters and plugins, extracted to a temporary folder),
interleaved with the working tree's (each repeat runs every case of both in
turn), and the report gives the ratio baseline / now per phase.

    python benchmarks/cold_start.py                         # 3 repeats, 8 new tokens
    python benchmarks/cold_start.py --baseline 5280312 --repeats 5
    python benchmarks/cold_start.py --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MESSAGE = "hello there, how are you today?"

# Runs in a fresh process: the steps `chatcore chat` takes (cli.build_bot, then one message), timed.
PHASES = r"""
import time
t_main = time.monotonic()
import json, os, sys
started, cfg_path = float(sys.argv[1]), sys.argv[2]
marks = {"python": t_main - started}

def timed(owner, attr, phase):
    inner = getattr(owner, attr)
    def wrapper(*args, **kwargs):
        t = time.monotonic()
        try:
            return inner(*args, **kwargs)
        finally:
            marks[phase] = marks.get(phase, 0.0) + time.monotonic() - t
    setattr(owner, attr, wrapper)

t = time.monotonic()
import chatcore.cli
if hasattr(chatcore.cli, "import_bot"):  # as `chatcore chat` imports (a --baseline's older code may lack it)
    chatcore.cli.import_bot()
import chatcore.bot, chatcore.checkpoint, chatcore.quant, chatcore.tokenizer, chatcore.weights
from chatcore.plugin_manager import make_plugin_manager
pm = make_plugin_manager()
marks["imports"] = time.monotonic() - t

t = time.monotonic()
from chatcore.config import load_config
config = load_config(cfg_path, pm.schema())
marks["config"] = time.monotonic() - t

timed(chatcore.weights, "resolve_model", "weight load")
timed(chatcore.quant.Int8Loader, "finish", "quantize")
timed(chatcore.tokenizer.Tokenizer, "__init__", "tokenizer")
timed(chatcore.checkpoint, "check_servable", "validate")
t = time.monotonic()
bot = chatcore.bot.Bot.from_config(config, pm=pm)
built = time.monotonic() - t
marks["other"] = built - sum(marks.get(k, 0.0) for k in ("weight load", "quantize", "tokenizer", "validate"))

def rss():
    out = {}
    for line in open("/proc/self/status"):
        key = line.split(":")[0]
        if key in ("RssAnon", "RssFile", "VmRSS", "VmHWM"):
            out[key] = int(line.split()[1]) / 1024
    return out

after_load = rss()

import asyncio
from chatcore.message import Message

async def talk():
    for phase in ("first generation", "second generation"):
        t = time.monotonic()
        reply = await bot.handle(Message(text=sys.argv[3], adapter="stdin", channel="terminal", user="bench", is_direct=True))
        marks[phase] = time.monotonic() - t
    await bot.close()

asyncio.run(talk())
marks["total to first reply"] = sum(v for k, v in marks.items() if k != "second generation")
print(json.dumps({"marks": marks, "rss_after_load_mb": after_load}))
"""


MAKE_CHECKPOINT = r"""
import sys, torch
from chatcore import checkpoint
from chatcore.model import GPT, GPTConfig
torch.manual_seed(0)
with torch.no_grad():
    model = GPT(GPTConfig(block_size=1024, vocab_size=50257, n_layer=12, n_head=12, n_embd=768))
print(checkpoint.save(model, sys.argv[1], base_model="gpt2-random"))
"""


def make_checkpoint(folder: Path) -> Path:
    """Saved by another process: this one stays small, so the peak RSS its children
    inherit at fork (wait4's ru_maxrss counts it) is not the model's."""
    out = subprocess.run([sys.executable, "-c", MAKE_CHECKPOINT, str(folder / "gpt2-random")], check=True,
                         capture_output=True, text=True, cwd=str(ROOT))
    return Path(out.stdout.strip().splitlines()[-1])


def write_config(folder: Path, ckpt: Path, quantize: str, tokens: int, threads: int | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{quantize}.yaml"
    data = folder / f"data-{quantize}"
    lines = ["bot:", f"  data_dir: {data}", "model:", f"  checkpoint: {ckpt}", f"  quantize: {quantize}",
             "  download: false", "  starter: false"]
    if threads:
        lines.append(f"  threads: {threads}")
    lines += ["generation:", f"  max_new_tokens: {tokens}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def extract(ref: str, folder: Path) -> Path:
    """The chatcore package of git ref ``ref`` as an importable folder (adapters and plugins inside, as installed)."""
    out = folder / "baseline"
    out.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "chatcore", "adapters", "plugins"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    (out / "adapters").rename(out / "chatcore" / "adapters")
    (out / "plugins").rename(out / "chatcore" / "plugins")
    return out


def env_for(code: Path | None) -> dict:
    env = dict(os.environ)
    if code is not None:  # ahead of the installed (editable) chatcore
        env["PYTHONPATH"] = str(code) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def first_reply(config: Path, code: Path | None) -> dict:
    """`chatcore chat -c config` with one piped line: seconds to the first reply line, peak RSS."""
    cmd = [sys.executable, "-c", "import sys; from chatcore.cli import main; sys.exit(main(sys.argv[1:]))",
           "chat", "-c", str(config)]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env_for(code), cwd=tempfile.gettempdir())
    proc.stdin.write((MESSAGE + "\n").encode())
    proc.stdin.close()
    line = proc.stdout.readline()
    elapsed = time.monotonic() - started
    proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 or not line.strip():
        raise RuntimeError(f"chatcore chat failed ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
    # CPU seconds of the whole run (to its exit, one reply): the figure a busy machine disturbs least.
    return {"first_reply_s": elapsed, "peak_rss_mb": usage.ru_maxrss / 1024,
            "cpu_s": usage.ru_utime + usage.ru_stime}


def phases(config: Path, code: Path | None) -> dict:
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", PHASES, str(started), str(config), MESSAGE], capture_output=True,
                         text=True, env=env_for(code), cwd=tempfile.gettempdir(), timeout=600)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=8, help="generation.max_new_tokens of the first reply")
    ap.add_argument("--baseline", help="a git ref whose code runs the same cases, interleaved")
    ap.add_argument("--threads", type=int, default=None, help="model.threads (default: torch's, all cores)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = make_checkpoint(tmp)
        codes = {"now": None}
        if args.baseline:
            codes = {"baseline": extract(args.baseline, tmp), "now": None}
        runs: dict[tuple[str, str], list[dict]] = {}
        for i in range(args.repeats):
            for quantize in ("none", "int8"):
                for name, code in codes.items():
                    # Each process on a history of its own: the first reply of a new conversation, not one
                    # whose prompt grew with every earlier run (and longer for whichever code ran second).
                    def config(step: str) -> Path:
                        return write_config(tmp / f"{name}-{i}-{step}", ckpt, quantize, args.tokens, args.threads)

                    run = phases(config("phases"), code)
                    run.update(first_reply(config("chat"), code))
                    runs.setdefault((name, quantize), []).append(run)
    report(runs, codes, args)


def report(runs: dict, codes: dict, args: argparse.Namespace) -> None:
    load = os.getloadavg()[0]
    table = {}
    for (name, quantize), rs in runs.items():
        marks = {k: statistics.median(r["marks"][k] for r in rs if k in r["marks"])
                 for k in rs[0]["marks"]}
        table[f"{name} {'fp32' if quantize == 'none' else 'int8'}"] = dict(
            phases_s=marks,
            first_reply_s=[round(r["first_reply_s"], 3) for r in rs],
            first_reply_median_s=statistics.median(r["first_reply_s"] for r in rs),
            cpu_median_s=statistics.median(r["cpu_s"] for r in rs),
            peak_rss_mb=max(r["peak_rss_mb"] for r in rs),
            rss_after_load_mb=rs[-1]["rss_after_load_mb"],
        )
    if args.json:
        print(json.dumps({"repeats": args.repeats, "tokens": args.tokens, "baseline": args.baseline,
                          "load_average": round(load, 2), "cases": table}))
        return
    print(f"cold start, GPT-2 124M shapes, {args.tokens} new tokens, medians of {args.repeats} fresh processes; "
          f"load average {load:.2f}" + (f"; baseline = {args.baseline}" if args.baseline else ""))
    for precision in ("fp32", "int8"):
        now = table[f"now {precision}"]
        base = table.get(f"baseline {precision}")
        print(f"\n{precision}:")
        print(f"  {'phase':24s} {'baseline s':>11s} {'now s':>8s} {'ratio':>7s}" if base else f"  {'phase':24s} {'now s':>8s}")
        for phase, value in now["phases_s"].items():
            if base:
                b = base["phases_s"].get(phase)
                ratio = f"{b / value:6.1f}x" if b is not None and value > 0 else "      -"
                print(f"  {phase:24s} {b if b is not None else float('nan'):11.3f} {value:8.3f} {ratio}")
            else:
                print(f"  {phase:24s} {value:8.3f}")
        for label, key in (("chatcore chat: first reply s", "first_reply_median_s"),
                           ("chatcore chat: CPU s", "cpu_median_s"), ("peak RSS MiB", "peak_rss_mb")):
            if base:
                print(f"  {label:30s} {base[key]:8.2f} -> {now[key]:8.2f}  ({base[key] / now[key]:.2f}x)")
            else:
                print(f"  {label:30s} {now[key]:8.2f}")
        for name, case in (("baseline", base), ("now", now)):
            if case:
                r = case["rss_after_load_mb"]
                print(f"  {name}: RSS after load {r.get('VmRSS', 0):.0f} MiB (anonymous {r.get('RssAnon', 0):.0f}, "
                      f"file {r.get('RssFile', 0):.0f}), peak while loading {r.get('VmHWM', 0):.0f}; "
                      f"first replies (s) {case['first_reply_s']}")


if __name__ == "__main__":
    main()
