"""Load test: many concurrent clients against the HTTP adapter on loopback.

A whole bot (plugins, SQLite history store, prompt building, continuous
batching) serves GPT-2 124M shapes with random weights (``--model tiny`` for a
small one) through the HTTP adapter on 127.0.0.1. Each client sends messages
back to back for the duration, half of them through ``POST /chat``, half
through ``POST /v1/chat/completions`` with ``"stream": true``, each client its
own conversation. A busy answer (503, code ``busy``, or 429) is honoured as
OpenAI's SDKs do: wait the Retry-After seconds, then send the same message again.
A request counts once, however many attempts it took: answered (its latency runs
from its first attempt to its answer), or refused when the test ended while it was
still being refused. ``--no-retry`` counts every busy answer as a refused request
and moves on to the next message (this script's behaviour before retries).

Checked afterwards: every request was answered or refused with the busy answer
(anything else is an error; the target is 0), and every answered exchange is in
the history store with exactly the text the client received. Also reported: the
batch and queue sizes the server ran with (``serving.max_batch`` / ``max_queue``,
``auto`` by default: chatcore/serving.py, batch_limits), the tokens it generated
per second, the latency of the requests sent in each third of the run beside the context a
decoding conversation attended over then (conversations grow turn by turn, and so does the
cost of every decode step), how much of the run the model worker spent in decode steps and in
prompt forwards (the rest goes to sampling, moving conversations' keys and values in and out
of the prefix cache, admitting requests, or waiting), and what a p95 latency within ``--target-p95`` seconds would need: with
every client waiting for its answer before sending again, answers per second =
clients / mean latency (Little's law), so at least clients / target x max_new_tokens
tokens per second.

    python benchmarks/loadtest.py                 # 32 clients, 60 s, auto batch and queue
    python benchmarks/loadtest.py --int8          # int8 weights
    python benchmarks/loadtest.py --max-batch 8 --max-queue 16 --no-retry   # the fixed sizes of before
    python benchmarks/loadtest.py --quick         # 8 clients, 10 s, tiny model
    python benchmarks/loadtest.py --json          # one JSON object with the results

Several instances (``--instances N`` or ``--history``): N real ``chatcore run`` processes,
each with the HTTP adapter on its own loopback port, all on one history URL and one shared
models folder (``bot.data_dir``), as on N machines sharing a volume; client i talks to
instance i mod N, authenticated with the API key (so its exchanges train). ``--history
temp`` starts a throwaway PostgreSQL cluster (tests/pgcluster.py); a postgresql:// URL
should name an empty database: the run imports the sample conversations into it and
marks them as already learned from. With ``--finetune-every N`` (default 100) auto
fine-tuning is on (tiny training settings), the clients keep talking until every
instance serves the promoted model, and the report adds the fine-tune jobs started and
each instance's final model. Reported per instance and in total: answered, busy, errors,
p50/p95 latency; and whether every answered exchange is stored exactly once (rows read
back from the history with SQL).

    python benchmarks/loadtest.py --instances 2 --history temp --model tiny --seconds 20
    python benchmarks/loadtest.py --instances 2 --history postgresql://chatcore@127.0.0.1:5432/loadtest
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import chatcore  # noqa: F401  before torch, as the `chatcore` command: its OpenMP default is read when torch loads
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import build_model  # noqa: E402
from serving import conversations  # noqa: E402  (the serving benchmark's data)


@dataclass
class Record:
    client: int
    endpoint: str
    outcome: str  # answered | busy | error
    latency: float
    text: str
    reply: str = ""
    detail: str = ""
    instance: str = ""
    attempts: int = 1  # busy answers retried, plus the last attempt
    sent: float = 0.0  # time.monotonic() of its first attempt


class Server:
    """The bot and its HTTP adapter on their own thread and event loop."""

    def __init__(self, args: argparse.Namespace, data_dir: str) -> None:
        self.args, self.data_dir = args, data_dir
        self.ready = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.port: int | None = None
        self.bot = self.adapter = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="loadtest-server", daemon=True)

    def start(self) -> int:
        self._thread.start()
        self.ready.wait()
        if self.error:
            raise self.error
        return self.port

    def call(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.call(self.adapter.stop())
        self._thread.join(30)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:
            self.error = exc
            self.ready.set()

    async def _serve(self) -> None:
        from chatcore.engine import Engine
        from chatcore.threads import release_thread_pool
        from chatcore.model import GPT, GPTConfig
        from chatcore.quant import quantize_int8
        from chatcore.testing import make_bot

        a = self.args
        if a.model == "tiny":
            torch.manual_seed(0)
            model = GPT(GPTConfig(block_size=256, n_layer=2, n_head=2, n_embd=64))
        else:
            model = build_model()
        engine = Engine(model, model_id=f"{a.model}-random", device="cpu", dtype="float32")
        if a.int8:
            quantize_int8(engine.model)
        release_thread_pool()  # as build_engine does: the decoding thread's pool is the only one
        self.prompt_tokens = 0  # prompt tokens run through the model (a prefix cache hit runs only the rest)
        self.decode_steps: list[tuple[float, int, int]] = []  # (time, rows, tokens those rows attend over)
        forward = engine.model.forward_cached

        self.forward_s = {"prompt": 0.0, "decode": 0.0}  # the model worker's time in each kind of forward

        def counted(idx, cache, rows=None, pos=None, n_new=None, last_only=True, **kw):
            kind = "prompt" if idx.size(1) > 1 or last_only is False else "decode"
            if kind == "prompt":
                self.prompt_tokens += int(sum(n_new)) if n_new is not None else idx.numel()
            elif rows is not None:
                self.decode_steps.append((time.monotonic(), len(rows), int(cache.lengths[list(rows)].sum()) + len(rows)))
            started = time.perf_counter()
            try:
                return forward(idx, cache, rows=rows, pos=pos, n_new=n_new, last_only=last_only, **kw)
            finally:
                self.forward_s[kind] += time.perf_counter() - started

        engine.model.forward_cached = counted
        config = {
            "adapters": {"http": {"enabled": True, "host": "127.0.0.1", "port": 0}},
            "generation": {"max_new_tokens": a.max_tokens},
            "serving": {"max_queue": a.max_queue, "max_batch": a.max_batch, "adapt_threads": not a.fixed_threads},
            "plugins": {"commands": {"rate_limit": {"messages": 0}}, "auto_finetune": {"enabled": False}},
        }
        self.bot = make_bot(self.data_dir, engine=engine, config=config)
        self.adapter = self.bot.enabled_adapters(["http"])[0]
        self.loop = asyncio.get_running_loop()
        task = asyncio.create_task(self.adapter.start())
        await self.adapter.ready.wait()
        self.port = self.adapter.port
        self.ready.set()
        try:
            await task
        finally:
            await self.bot.close()

    def stored(self) -> dict[str, str]:
        """user text -> reply text of every exchange in the history store."""
        async def read():
            return {e.user_text: e.reply_text for e in self.bot.store.exchanges(include_opted_out=True)}
        return self.call(read())


async def client(i: int, url: str, deadline: float, lines: list[str], out: list[Record], *,
                 api_key: str | None = None, prefix: str = "", instance: str = "", until=None,
                 retry: bool = True) -> None:
    """Send messages back to back until `deadline` (and, when given, until `until()` is true).

    A busy answer waits its Retry-After; with `retry` the same message is then sent again
    (until it is answered, or the test is over), as OpenAI's SDKs retry 429 and 503."""
    endpoint = "/chat" if i % 2 == 0 else "/v1/chat/completions"
    timeout = aiohttp.ClientTimeout(total=600)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None

    def going() -> bool:
        return time.monotonic() < deadline or (until is not None and not until())

    async with aiohttp.ClientSession(timeout=timeout, headers=headers) as session:
        j = 0
        while going():
            text = f"{prefix}[client {i} #{j}] {lines[(i * 31 + j) % len(lines)]}"
            j += 1
            t0 = time.perf_counter()
            attempts = 0
            while True:
                attempts += 1
                try:
                    if endpoint == "/chat":
                        rec = await _chat(session, url, i, text)
                    else:
                        rec = await _stream(session, url, i, text)
                except Exception as exc:  # connection errors, bad JSON: all count as errors
                    rec = Record(i, endpoint, "error", 0.0, text, detail=f"{type(exc).__name__}: {exc}")
                if rec.outcome != "busy":
                    break
                await asyncio.sleep(float(rec.detail or 1))
                if not retry or not going():
                    break
            rec.latency = time.perf_counter() - t0
            rec.sent = time.monotonic() - rec.latency
            rec.instance = instance
            rec.attempts = attempts
            out.append(rec)


async def _chat(session, url: str, i: int, text: str) -> Record:
    async with session.post(f"{url}/chat", json={"message": text, "user": f"client{i}"}) as r:
        body = await r.json(content_type=None)
        if r.status == 200:
            return Record(i, "/chat", "answered", 0, text, reply=body["response"])
        return _refusal(i, "/chat", text, r, body)


async def _stream(session, url: str, i: int, text: str) -> Record:
    body = {"model": "x", "stream": True, "user": f"client{i}", "messages": [{"role": "user", "content": text}]}
    async with session.post(f"{url}/v1/chat/completions", json=body) as r:
        if r.status != 200:
            return _refusal(i, "/v1/chat/completions", text, r, await r.json(content_type=None))
        parts, done = [], False
        async for raw in r.content:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return Record(i, "/v1/chat/completions", "error", 0, text, detail=str(chunk["error"]))
            parts.append(chunk["choices"][0]["delta"].get("content") or "")
        if not done:
            return Record(i, "/v1/chat/completions", "error", 0, text, detail="stream ended without [DONE]")
        return Record(i, "/v1/chat/completions", "answered", 0, text, reply="".join(parts))


def _refusal(i: int, endpoint: str, text: str, r, body) -> Record:
    busy = r.status == 503 and (body or {}).get("error", {}).get("code") == "busy"
    if busy or r.status == 429:  # the model queue is full, or a rate limit: both say when to retry
        return Record(i, endpoint, "busy", 0, text, detail=r.headers.get("Retry-After", "1"))
    return Record(i, endpoint, "error", 0, text, detail=f"HTTP {r.status}: {body}")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def summary(records: list[Record], wall: float) -> dict:
    """answered / busy / errors, requests per second and latency percentiles of some requests."""
    answered = [r.latency for r in records if r.outcome == "answered"]
    busy = [r for r in records if r.outcome == "busy"]
    return dict(requests=len(records), answered=len(answered), busy=len(busy),
                errors=sum(r.outcome == "error" for r in records), answered_per_s=round(len(answered) / wall, 2),
                p50_s=percentile(answered, 0.5), p95_s=percentile(answered, 0.95),
                busy_p50_s=percentile([r.latency for r in busy], 0.5))


def run_instances(args: argparse.Namespace, lines: list[str]) -> tuple[dict, list[Record]]:
    """N `chatcore run` processes on one history and one models folder (see the module docstring)."""
    import secrets

    from chatcore import checkpoint
    from chatcore.model import GPT, GPTConfig
    from chatcore.registry import Registry

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.instances import finetune_jobs, free_port, instance_config, seed_history, start_instances, stored_replies

    cluster = None
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        url = args.history
        if url == "temp":
            from tests.pgcluster import Cluster, find_bin

            if (bin_dir := find_bin()) is None:
                sys.exit("--history temp needs the PostgreSQL server binaries (initdb, pg_ctl)")
            cluster = Cluster(bin_dir).start()
            url = cluster.new_database()
        instances = []
        try:
            torch.manual_seed(0)
            model = GPT(GPTConfig(block_size=256, n_layer=2, n_head=2, n_embd=64)) if args.model == "tiny" else build_model()
            base = checkpoint.save(model, tmp / f"{args.model}-random", base_model=f"{args.model}-random")
            shared, key, run = tmp / "shared", secrets.token_hex(16), secrets.token_hex(3)
            every = args.finetune_every or 10**9  # 0: never crosses (the plugin stays quiet)
            configs = [instance_config(name=f"instance{n}", data_dir=shared, history_url=url, port=free_port(),
                                       api_key=key, checkpoint=base, every=every, max_new_tokens=args.max_tokens,
                                       max_queue=args.max_queue, threads=args.threads) for n in range(args.instances)]
            instances = start_instances(configs, tmp)
            if args.finetune_every:
                seed_history(url, Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "sample_conversations.jsonl")
            models = shared / "models"

            def settled() -> bool:
                """A fine-tune's verdict is in and every instance serves what the registry says."""
                jobs = list((models / "jobs").glob("*/result.json")) if (models / "jobs").is_dir() else []
                serving = Registry(models).current() if jobs else None
                return bool(jobs) and all((h := inst.health()) and (serving is None or h["model"].startswith(serving.stem))
                                          for inst in instances)

            records: list[Record] = []
            started = time.perf_counter()

            async def go() -> None:
                done = asyncio.Event()
                if not args.finetune_every:
                    done.set()
                deadline, cap = time.monotonic() + args.seconds, time.monotonic() + args.seconds + args.finetune_wait

                async def watch() -> None:  # off the event loop: the clients' latencies stay honest
                    while not await asyncio.to_thread(settled):
                        await asyncio.sleep(1)
                    done.set()

                watcher = asyncio.create_task(watch()) if not done.is_set() else None
                await asyncio.gather(*(client(i, instances[i % len(instances)].url, deadline, lines, records,
                                              api_key=key, prefix=f"[lt{run}]", instance=instances[i % len(instances)].name,
                                              until=lambda: done.is_set() or time.monotonic() > cap)
                                       for i in range(args.clients)))
                if watcher is not None:
                    watcher.cancel()

            asyncio.run(go())
            wall = time.perf_counter() - started
            finals = {inst.name: (inst.health() or {}).get("model") for inst in instances}
            stored = stored_replies(url, f"[lt{run}]")
            jobs = finetune_jobs(url, models)
        finally:
            codes = [inst.stop() for inst in instances]
            logs = [inst.log() for inst in instances]
            if cluster is not None:
                cluster.stop()

    logged = [r for r in records if r.outcome == "answered" and r.reply.strip()]  # empty replies: not logged
    result = dict(
        instances=args.instances, history="throwaway PostgreSQL cluster" if cluster else _redact(url),
        clients=args.clients, seconds=args.seconds, wall_s=round(wall, 1), model=f"{args.model}-random",
        threads=args.threads, max_tokens=args.max_tokens, max_queue=args.max_queue,
        total=summary(records, wall),
        per_instance={inst.name: summary([r for r in records if r.instance == inst.name], wall) for inst in instances},
        answered_exchanges_logged=len(logged),
        empty_replies=sum(r.outcome == "answered" and not r.reply.strip() for r in records),
        stored_once=sum(stored.get(r.text) == [r.reply.strip()] for r in logged),
        missing=sum(r.text not in stored for r in logged),
        duplicated=sum(len(stored.get(r.text, [])) > 1 for r in logged),
        different=sum(len(stored.get(r.text, [])) == 1 and stored[r.text] != [r.reply.strip()] for r in logged),
        stored_for_refused=sum(r.text in stored for r in records if r.outcome != "answered"),
        finetune_every=args.finetune_every,
        finetune_jobs_started=len(jobs["jobs"]),
        finetune_started_in_logs=sum(len(re.findall(r"fine-tune job \S+ started", log)) for log in logs),
        promoted=jobs["promoted"], rejected=jobs["rejected"],
        final_models=finals, exit_codes=codes,
        load_average=round(os.getloadavg()[0], 1),
    )
    result["mismatches"] = [(r, stored.get(r.text)) for r in logged if stored.get(r.text) != [r.reply.strip()]]
    return result, records


def _redact(url: str) -> str:
    from chatcore.postgres import redact

    return redact(url)


def print_instances(result: dict, records: list[Record], mismatches: list) -> None:
    def line(name: str, s: dict) -> str:
        lat = (f"; latency p50 {s['p50_s']:.2f} s, p95 {s['p95_s']:.2f} s" if s["p50_s"] is not None else "")
        return (f"  {name}: requests {s['requests']}, answered {s['answered']} ({s['answered_per_s']}/s), "
                f"busy {s['busy']}, errors {s['errors']}{lat}")

    r = result
    print(f"{r['instances']} instances on {r['history']}, {r['clients']} clients x {r['seconds']:.0f} s "
          f"(ran {r['wall_s']} s), {r['model']}, {r['threads']} thread(s) each, max_new_tokens {r['max_tokens']}, "
          f"max_queue {r['max_queue']}; load average {r['load_average']}")
    for name, s in r["per_instance"].items():
        print(line(name, s))
    print(line("total", r["total"]))
    print(f"  history: {r['stored_once']} of {r['answered_exchanges_logged']} answered exchanges stored exactly once "
          f"(missing {r['missing']}, duplicated {r['duplicated']}, another reply {r['different']}, "
          f"refused but stored {r['stored_for_refused']}; "
          f"{r['empty_replies']} empty replies, not logged by design)")
    if r["finetune_every"]:
        print(f"  fine-tune every {r['finetune_every']}: {r['finetune_jobs_started']} job(s) started "
              f"({r['finetune_started_in_logs']} in the instances' logs), promoted {r['promoted'] or 'none'}, "
              f"rejected {r['rejected'] or 'none'}")
    print(f"  final models: {r['final_models']}; exit codes {r['exit_codes']}")
    for rec in [x for x in records if x.outcome == "error"][:5]:
        print(f"  error: {rec.instance} client {rec.client} {rec.endpoint}: {rec.detail}", file=sys.stderr)
    for rec, rows in mismatches[:5]:
        print(f"  not stored once as answered: {rec.text!r} -> {rec.reply!r}, stored {rows!r}", file=sys.stderr)


def by_phase(records: list[Record], decode_steps: list[tuple[float, int, int]], start: float, seconds: float,
             parts: int = 3) -> list[dict]:
    """Latency of the answered requests sent in each third of the run, and the mean context a decoding
    conversation attended over then: every client's conversation grows with each turn, so each
    decode step reads more keys and values as the run goes on (its cost grows with it)."""
    out = []
    for i in range(parts):
        lo, hi = start + seconds * i / parts, start + seconds * (i + 1) / parts
        lat = [r.latency for r in records if r.outcome == "answered" and lo <= r.sent < hi]
        steps = [(rows, n) for t, rows, n in decode_steps if lo <= t < hi]
        out.append(dict(from_s=round(lo - start), to_s=round(hi - start), answered=len(lat),
                        p50_s=percentile(lat, 0.5), p95_s=percentile(lat, 0.95),
                        context_tokens=round(sum(n for _, n in steps) / max(1, sum(rows for rows, _ in steps)))))
    return out


def auto_or_int(text: str) -> int | str:
    return text if text == "auto" else int(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=None, help="concurrent clients (default 32)")
    ap.add_argument("--seconds", type=float, default=None, help="how long clients keep sending (default 60)")
    ap.add_argument("--model", choices=("gpt2", "tiny"), default=None, help="gpt2: 124M shapes (default); tiny: 2 layers")
    ap.add_argument("--int8", action="store_true", help="serve int8 weights")
    ap.add_argument("--max-tokens", type=int, default=32, help="generation.max_new_tokens")
    ap.add_argument("--max-queue", type=auto_or_int, default="auto",
                    help="serving.max_queue (requests waiting for a batch row): auto (default) or a number")
    ap.add_argument("--max-batch", type=auto_or_int, default="auto",
                    help="serving.max_batch (conversations decoding together): auto (default) or a number")
    ap.add_argument("--no-retry", action="store_true",
                    help="a busy answer is a refused request; the client moves on to its next message")
    ap.add_argument("--target-p95", type=float, default=8.0, help="the p95 latency target the report checks (s)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fixed-threads", action="store_true",
                    help="serving.adapt_threads: false (decode on --threads however busy the machine is)")
    ap.add_argument("--quick", action="store_true", help="8 clients, 10 s, tiny model")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--instances", type=int, default=1, help="chatcore run processes (above 1: needs --history)")
    ap.add_argument("--history", help="the instances' history: a postgresql:// URL, or temp (a throwaway cluster)")
    ap.add_argument("--finetune-every", type=int, default=100,
                    help="with --history: auto fine-tune threshold (0: off)")
    ap.add_argument("--finetune-wait", type=float, default=180,
                    help="with fine-tuning: how long past --seconds the clients may wait for the swap")
    args = ap.parse_args()
    if args.instances > 1 and not args.history:
        ap.error("--instances above 1 needs --history (a postgresql:// URL, or temp)")
    args.clients = args.clients or (8 if args.quick else 32)
    args.seconds = args.seconds or (10 if args.quick else 60)
    args.model = args.model or ("tiny" if args.quick else "gpt2")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    lines = [c["user"][:200] for c in conversations()]
    if args.history:
        result, records = run_instances(args, lines)
        mismatches = result.pop("mismatches")
        if args.json:
            print(json.dumps(result, default=str))
        else:
            print_instances(result, records, mismatches)
        bad = (result["total"]["errors"] or mismatches or result["stored_for_refused"]
               or not result["total"]["answered"] or (args.finetune_every and result["finetune_jobs_started"] != 1))
        sys.exit(1 if bad else 0)

    with tempfile.TemporaryDirectory() as data_dir:
        server = Server(args, data_dir)
        port = server.start()
        url = f"http://127.0.0.1:{port}"
        records: list[Record] = []
        started, cpu_started, started_at = time.perf_counter(), time.process_time(), time.monotonic()

        async def run() -> None:
            deadline = time.monotonic() + args.seconds
            await asyncio.gather(*(client(i, url, deadline, lines, records, retry=not args.no_retry)
                                   for i in range(args.clients)))

        asyncio.run(run())
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        stored = server.stored()
        backend = server.bot.generator.backend
        sizes = dict(max_batch=backend.max_batch, max_queue=backend.max_queue)
        stats = server.bot.generator.stats()
        prompt_tokens, forward_s = server.prompt_tokens, dict(server.forward_s)
        phases = by_phase(records, server.decode_steps, started_at, args.seconds)
        server.stop()

    answered = [r for r in records if r.outcome == "answered"]
    busy = [r for r in records if r.outcome == "busy"]
    errors = [r for r in records if r.outcome == "error"]
    # the bot logs what it answered (stripped); an all-whitespace reply is answered empty and not logged
    expected = [r for r in answered if r.reply.strip()]
    missing = [r for r in expected if stored.get(r.text) != r.reply.strip()]
    lat = [r.latency for r in answered]
    # every token but the first of each reply is one row of a decode step; the first comes from its prompt's last chunk
    generated = stats["decode_rows"] + len(answered)
    result = dict(
        clients=args.clients, seconds=args.seconds, wall_s=round(wall, 1), model=f"{args.model}-random",
        int8=args.int8, threads=args.threads, max_tokens=args.max_tokens, max_queue=args.max_queue,
        max_batch=args.max_batch, ran_with=sizes, retry=not args.no_retry,
        requests=len(records), answered=len(answered), busy=len(busy), errors=len(errors),
        answered_pct=round(100 * len(answered) / max(1, len(records)), 1),
        busy_attempts=sum(r.attempts - (r.outcome != "busy") for r in records),
        over_sdk_retries=sum(r.attempts > 3 for r in records),  # OpenAI's SDKs retry twice by default
        empty_replies=len(answered) - len(expected), missing_from_store=len(missing),
        p50_s=percentile(lat, 0.5), p95_s=percentile(lat, 0.95),
        busy_p50_s=percentile([r.latency for r in busy], 0.5),
        answered_per_s=round(len(answered) / wall, 2),
        generated_tokens_per_s=round(generated / wall, 1),
        prompt_tokens_per_s=round(prompt_tokens / wall, 1),
        prompt_tokens_per_answer=round(prompt_tokens / max(1, len(answered)), 1),
        mean_batch=round(stats["decode_rows"] / max(1, stats["decode_steps"]), 1),
        # the model worker's wall time in decode and prompt forwards; the rest of the run it sampled, moved
        # conversations' keys and values in and out of the prefix cache, admitted requests, or waited
        decode_forward_s=round(forward_s["decode"], 1), prompt_forward_s=round(forward_s["prompt"], 1),
        decode_threads=stats.get("decode_threads", 0), thread_switches=stats.get("thread_switches", 0),
        phases=phases,
        needed_answers_per_s=round(args.clients / args.target_p95, 2),
        needed_tokens_per_s=round(args.clients / args.target_p95 * args.max_tokens, 1),
        load_average=round(os.getloadavg()[0], 1),
        # CPU time of this process (server and clients) per second of the run: on a shared machine it got fewer
        # cores than it has; answers/s x cores / cores used is what it would answer alone, if work scales with CPU
        cores_used=round(cpu / wall, 2),
        cpu_s_per_answer=round(cpu / max(1, len(answered)), 3),
        answers_per_s_alone=round(len(answered) / cpu * (os.cpu_count() or 1), 2) if cpu else None,
    )
    result["targets_met"] = bool(result["answered_pct"] >= 95 and lat and result["p95_s"] <= args.target_p95
                                 and not errors and not missing)
    if args.json:
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}))
    else:
        print(f"{args.clients} clients x {args.seconds:.0f} s on loopback, {result['model']}"
              f"{' int8' if args.int8 else ' fp32'}, {args.threads} threads, max_new_tokens {args.max_tokens}, "
              f"max_batch {args.max_batch} -> {sizes['max_batch']}, max_queue {args.max_queue} -> {sizes['max_queue']}, "
              f"{'busy answers retried' if not args.no_retry else 'no retries'}; load average {result['load_average']}")
        print(f"  decode threads at the end: {result['decode_threads'] or 'fixed'} "
              f"({result['thread_switches']} switches; serving.adapt_threads {not args.fixed_threads})")
        print(f"  requests {len(records)}: answered {len(answered)} ({result['answered_pct']}%, "
              f"{result['answered_per_s']}/s), refused busy {len(busy)}, errors {len(errors)} (target 0); "
              f"busy answers {result['busy_attempts']}, requests that needed more than the OpenAI SDK's 2 retries "
              f"{result['over_sdk_retries']}")
        if lat:
            print(f"  answered latency p50 {result['p50_s']:.2f} s, p95 {result['p95_s']:.2f} s"
                  + (f"; refused requests p50 {result['busy_p50_s']:.2f} s" if busy else ""))
        print(f"  generated {result['generated_tokens_per_s']} tokens/s (mean batch {result['mean_batch']}), prompts "
              f"{result['prompt_tokens_per_s']} tokens/s ({result['prompt_tokens_per_answer']} per answer); "
              f"a p95 within {args.target_p95:g} s needs >= {result['needed_answers_per_s']} answers/s, i.e. "
              f">= {result['needed_tokens_per_s']} tokens/s (clients / target x max_new_tokens)")
        print(f"  of the run's {result['wall_s']:.0f} s, the model worker spent {result['decode_forward_s']:.1f} s in "
              f"decode steps ({100 * result['decode_forward_s'] / wall:.0f}%) and {result['prompt_forward_s']:.1f} s in "
              f"prompt forwards ({100 * result['prompt_forward_s'] / wall:.0f}%); the rest in sampling, moving cached "
              f"conversations, admitting requests, or idle")
        for ph in phases:
            lat_text = f"p50 {ph['p50_s']:.2f} s, p95 {ph['p95_s']:.2f} s" if ph["p50_s"] is not None else "none answered"
            print(f"  requests sent in {ph['from_s']:.0f}-{ph['to_s']:.0f} s: {ph['answered']} answered, {lat_text}; "
                  f"each decoding conversation attended over {ph['context_tokens']} tokens on average")
        print(f"  CPU: {result['cores_used']} of {os.cpu_count()} cores used, {result['cpu_s_per_answer']} CPU s per "
              f"answer: alone on this machine about {result['answers_per_s_alone']} answers/s")
        print(f"  targets (>= 95% answered, p95 <= {args.target_p95:g} s, 0 errors, all stored): "
              f"{'met' if result['targets_met'] else 'NOT met'}")
        print(f"  history store: {len(expected) - len(missing)} of {len(expected)} answered exchanges present "
              f"with the exact reply ({result['empty_replies']} empty replies, not logged by design)")
    for r in errors[:5]:
        print(f"  error: client {r.client} {r.endpoint}: {r.detail}", file=sys.stderr)
    for r in missing[:5]:
        print(f"  missing: {r.text!r} -> {r.reply!r}", file=sys.stderr)
    if errors or missing or not answered:
        sys.exit(1)


if __name__ == "__main__":
    main()
