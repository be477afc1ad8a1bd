"""Single-conversation generation speed: chatcore as served vs CTranslate2, transformers and the seed's loop.

GPT-2 124M shapes with random weights (the same weights in every contestant),
fp32, 2 torch threads, the same sampling settings (temperature 0.8, top-k 200,
seeded) and the same number of new tokens. Prompts of 32 and 512 tokens.

The weights are written to a temporary directory first (a chatcore checkpoint
and a Hugging Face directory); each contestant runs in its own fresh process
(same command, ``--worker``) and loads them as it would in real use, so its
peak RSS is its own, loading included, and no contestant warms the caches for
another.

    python benchmarks/engine.py            # full run (the seed's loop takes minutes at 512 tokens)
    python benchmarks/engine.py --quick    # 24 new tokens: a smoke run
    python benchmarks/engine.py --json     # one JSON object per measurement
    python benchmarks/engine.py --speculative prompt_lookup --greedy --engines chatcore,chatcore-int8
                                           # speculative decoding (chatcore-spec, chatcore-int8-spec) vs plain
    python benchmarks/engine.py --engines chatcore-packed,chatcore-plain,ct2-float32,chatcore-int8,ct2-int8 --rounds 3
                                           # fp32 oneDNN-packed vs torch's layout vs CTranslate2, interleaved
    python benchmarks/engine.py --engines chatcore-int8,chatcore-int8-fixed,ct2-int8 --busy 3
                                           # a busy machine: adapting decode threads (chatcore.threads) vs not
    python benchmarks/engine.py --batch 8 --engines chatcore,chatcore-int8,ct2-float32,ct2-int8
                                           # 8 conversations at once: aggregate tok/s and peak RSS at batch 8

chatcore is measured through the path a user's request takes: weights loaded by
`build_engine` on the main thread, the reply streamed by `chatcore.serving.Generator`
(decoding on its batching thread). ``chatcore-direct`` drives the Engine on the
calling thread: a reference only, not what a bot gets. ``chatcore`` serves fp32 as
the bot does on a CPU with ``model.quantize: none`` (``model.cpu_layout: auto``);
``chatcore-packed`` and ``chatcore-plain`` force oneDNN-packed matrices
(`chatcore.cpu_linear`) and torch's own layout; ``chatcore-fixed`` and
``chatcore-int8-fixed`` serve with ``serving.adapt_threads: false`` (`chatcore.threads`). CTranslate2 (float32 and
int8, when ``pip install -e .[bench]`` installed it) runs the same weights,
converted from the Hugging Face directory by its Transformers converter.

Columns: TTFT (prompt in -> first new token out), decode tok/s (the tokens after
the first, per second of decoding), total tok/s (all new tokens over the whole
call), peak RSS of the process. Ratios: chatcore (served) / each other contestant.
With ``--batch N`` each contestant gets N different prompts of each length at once
(chatcore: N streams through one `Generator` with ``max_batch`` N; CTranslate2: one
static batch): TTFT is the median conversation's, total tok/s the aggregate, and
peak RSS is what serving N conversations costs. Only the served chatcore contestants
and CTranslate2 take part.
With ``--speculative DRAFT`` (``prompt_lookup`` or a draft checkpoint), each served
chatcore contestant also runs as ``-spec`` with ``model.speculative: {draft: DRAFT,
k: --spec-k}``: its ratio to plain decoding and the share of guesses that stood.
Random weights say little about how often a trained model agrees with a drafter.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import busy_processes, ct2_batch, first_token_timer, peak_rss_mb  # benchmarks/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parents[1]
CONTESTANTS = ("chatcore", "chatcore-packed", "chatcore-plain", "chatcore-int8", "chatcore-fixed", "chatcore-int8-fixed",
               "chatcore-direct", "chatcore-int8-direct",
               "ct2-float32", "ct2-int8", "seed-loop", "transformers")
GPT2_VOCAB = ROOT.parent / "shared" / "data" / "gpt2"  # encoder.json + vocab.bpe: the tokenizer CTranslate2 converts


def has_ctranslate2() -> bool:
    try:
        import ctranslate2  # noqa: F401
    except ImportError:
        return False
    return True


def convert_ct2(hf_dir: Path, out: Path, quantization: str | None) -> Path:
    """The same weights as a CTranslate2 model (its Transformers converter reads the HF directory)."""
    import shutil

    import ctranslate2

    for src, dst in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):  # GPT2Tokenizer's files
        if not (hf_dir / dst).exists():
            shutil.copy(GPT2_VOCAB / src, hf_dir / dst)
    ctranslate2.converters.TransformersConverter(str(hf_dir)).convert(str(out), quantization=quantization, force=True)
    return out
TEMPERATURE, TOP_K, SEED = 0.8, 200, 1234
BATCH = 1  # conversations at once (--batch)


def write_models(d: Path) -> tuple[Path, Path]:
    """Random GPT-2 124M weights saved twice: a chatcore checkpoint and a Hugging Face directory.

    Every contestant loads its weights from disk the way it would in real use,
    so peak RSS includes loading.
    """
    import torch
    from safetensors.torch import save_file

    from chatcore import checkpoint
    from chatcore.hf import to_hf_state_dict
    from chatcore.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig()).eval()  # GPT-2 124M shapes, GPT-2's init
    native = checkpoint.save(model, d / "gpt2-random.safetensors", base_model="random")
    hf_dir = d / "hf"
    hf_dir.mkdir()
    c = model.config
    (hf_dir / "config.json").write_text(json.dumps(dict(
        model_type="gpt2", architectures=["GPT2LMHeadModel"], n_positions=c.block_size, n_ctx=c.block_size,
        vocab_size=c.vocab_size, n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd,
        activation_function="gelu_new", bos_token_id=50256, eos_token_id=50256)))
    hf_state = {k: v.contiguous() for k, v in to_hf_state_dict(model).items() if k != "lm_head.weight"}
    save_file(hf_state, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    return native, hf_dir


def prompt_ids(n: int, variant: int = 0) -> list[int]:
    import torch

    g = torch.Generator().manual_seed(n + 100_000 * variant)
    return torch.randint(0, 50256, (n,), generator=g).tolist()


# --- contestants: each returns (time to first token, end time, tokens) from a start time ----


def load_chatcore_direct(native: Path, hf_dir: Path, threads: int, quantize: str = "none", cpu_layout: str = "auto"):
    from chatcore.weights import build_engine

    return build_engine({"checkpoint": str(native), "device": "cpu", "dtype": "float32", "threads": threads,
                         "quantize": quantize, "cpu_layout": cpu_layout})


def load_chatcore_int8_direct(native: Path, hf_dir: Path, threads: int):
    """The same engine with `model.quantize: int8` (fp32 activations, int8 weights, quantized while loading)."""
    return load_chatcore_direct(native, hf_dir, threads, "int8")


def run_chatcore_direct(engine, ids, new_tokens):
    from chatcore.sampling import SamplingParams

    params = SamplingParams(temperature=TEMPERATURE, top_k=TOP_K, max_new_tokens=new_tokens, seed=SEED, stop_at_newline=False)
    t0 = time.perf_counter()
    first, n = None, 0
    for _ in engine.tokens(ids, params):
        n += 1
        if first is None:
            first = time.perf_counter()
    return t0, first, time.perf_counter(), n


class Served:
    """An engine behind `chatcore.serving.Generator`, as the bot serves it (an event loop, the batching thread)."""

    def __init__(self, engine, adapt_threads: bool = True) -> None:
        import asyncio

        from chatcore.serving import Generator

        self.engine = engine
        self.loop = asyncio.new_event_loop()
        self.generator = Generator(engine, max_batch=BATCH, adapt_threads=adapt_threads)

    def run(self, ids, new_tokens):
        from chatcore.sampling import SamplingParams

        # no stop rule fires: the reply is exactly new_tokens tokens unless end-of-text is sampled (~0.3%)
        params = SamplingParams(temperature=TEMPERATURE, top_k=TOP_K, max_new_tokens=new_tokens, seed=SEED,
                                stop_at_newline=False, stop=[])
        prompt = self.engine.tokenizer.decode(ids)

        async def go():
            t0, first, parts = time.perf_counter(), None, []
            async for part in self.generator.stream(prompt, params):
                parts.append(part)
                if first is None:
                    first = time.perf_counter()
            self.reply = "".join(parts)  # -spec contestants compare theirs with plain decoding's
            return t0, first, time.perf_counter(), new_tokens

        return self.loop.run_until_complete(go())

    def run_batch(self, prompts: list[list[int]], new_tokens: int):
        """All prompts submitted at once; returns (start, the median conversation's first token, end, tokens)."""
        import asyncio
        import statistics

        from chatcore.sampling import SamplingParams

        async def one(i, ids):
            params = SamplingParams(temperature=TEMPERATURE, top_k=TOP_K, max_new_tokens=new_tokens, seed=SEED + i,
                                    stop_at_newline=False, stop=[])
            first = None
            async for _ in self.generator.stream(self.engine.tokenizer.decode(ids), params):
                first = first or time.perf_counter()
            return first

        async def go():
            rows = self.generator.stats()["decode_rows"]
            t0 = time.perf_counter()
            firsts = await asyncio.gather(*(one(i, ids) for i, ids in enumerate(prompts)))
            end = time.perf_counter()
            # tokens sampled: each conversation's first (after its prompt), then one per decode step it was in
            return t0, statistics.median(firsts), end, len(prompts) + self.generator.stats()["decode_rows"] - rows

        return self.loop.run_until_complete(go())


def load_chatcore(native: Path, hf_dir: Path, threads: int):
    return Served(load_chatcore_direct(native, hf_dir, threads))


SPECULATIVE: dict = {}  # model.speculative for the -spec contestants (set from the command line)


def load_chatcore_spec(native: Path, hf_dir: Path, threads: int, quantize: str = "none"):
    from chatcore.weights import build_engine

    return Served(build_engine({"checkpoint": str(native), "device": "cpu", "dtype": "float32", "threads": threads,
                                "quantize": quantize, "speculative": SPECULATIVE}))


def load_chatcore_packed(native: Path, hf_dir: Path, threads: int):
    """fp32 served with oneDNN-packed matrices (``model.cpu_layout: packed``, `chatcore.cpu_linear`)."""
    return Served(load_chatcore_direct(native, hf_dir, threads, cpu_layout="packed"))


def load_chatcore_plain(native: Path, hf_dir: Path, threads: int):
    """fp32 served with torch's own layout (``model.cpu_layout: plain``): the baseline of chatcore.cpu_linear."""
    return Served(load_chatcore_direct(native, hf_dir, threads, cpu_layout="plain"))


def load_chatcore_int8(native: Path, hf_dir: Path, threads: int):
    return Served(load_chatcore_direct(native, hf_dir, threads, "int8"))


def load_chatcore_fixed(native: Path, hf_dir: Path, threads: int, quantize: str = "none"):
    """Served with ``serving.adapt_threads: false``: always all threads, however busy the machine."""
    return Served(load_chatcore_direct(native, hf_dir, threads, quantize), adapt_threads=False)


def run_chatcore(served, ids, new_tokens):
    return served.run(ids, new_tokens)


def load_ct2(models: Path, threads: int, kind: str):
    import ctranslate2

    vocab = json.loads((GPT2_VOCAB / "encoder.json").read_text(encoding="utf-8"))
    by_id = {i: t for t, i in vocab.items()}
    gen = ctranslate2.Generator(str(models / f"ct2-{kind}"), device="cpu", compute_type=kind, intra_threads=threads)
    return gen, by_id


def run_ct2_batch(model, prompts, new_tokens):
    gen, by_id = model
    r = ct2_batch(gen, [[by_id[i] for i in ids] for ids in prompts], new_tokens, TOP_K, TEMPERATURE)
    return 0.0, r["ttft_p50_s"], r["seconds"], r["tokens"]  # first and end from 0: TTFT and seconds as measured


def run_ct2(model, ids, new_tokens):
    gen, by_id = model
    tokens = [by_id[i] for i in ids]
    t0, first, n = time.perf_counter(), None, 0
    for _ in gen.generate_tokens(tokens, max_length=new_tokens, min_length=new_tokens, sampling_temperature=TEMPERATURE,
                                 sampling_topk=TOP_K):
        n += 1
        if first is None:
            first = time.perf_counter()
        if n == new_tokens:
            break
    return t0, first, time.perf_counter(), n


def load_seed_loop(native: Path, hf_dir: Path, threads: int):
    from chatcore import checkpoint

    return checkpoint.load(native)[0]


def run_seed_loop(model, ids, new_tokens):
    """The seed's generation: the whole context through the model for every token, no cache."""
    import torch
    from torch.nn import functional as F

    g = torch.Generator().manual_seed(SEED)
    idx = torch.tensor([ids])
    t0 = time.perf_counter()
    first = None
    with torch.no_grad():
        for _ in range(new_tokens):
            idx_cond = idx[:, -model.config.block_size :]
            pos = torch.arange(idx_cond.size(1))
            x = model.transformer.wte(idx_cond) + model.transformer.wpe(pos)
            for block in model.transformer.h:
                x = block(x)
            logits = model.lm_head(model.transformer.ln_f(x[:, [-1], :]))[:, -1, :] / TEMPERATURE
            v, _ = torch.topk(logits, min(TOP_K, logits.size(-1)))
            logits[logits < v[:, [-1]]] = -float("inf")
            nxt = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=g)
            idx = torch.cat((idx, nxt), dim=1)
            if first is None:
                first = time.perf_counter()
    return t0, first, time.perf_counter(), idx.size(1) - len(ids)


def load_transformers(native: Path, hf_dir: Path, threads: int):
    import torch
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(str(hf_dir), dtype=torch.float32).eval()


def run_transformers(hf, ids, new_tokens):
    import torch
    timer = first_token_timer()
    torch.manual_seed(SEED)
    inp = torch.tensor([ids])
    t0 = time.perf_counter()
    out = hf.generate(
        inp,
        attention_mask=torch.ones_like(inp),
        do_sample=True,
        temperature=TEMPERATURE,
        top_k=TOP_K,
        top_p=1.0,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=50256,
        streamer=timer,
    )
    return t0, timer.first, time.perf_counter(), out.size(1) - len(ids)


RUNNERS = {
    "chatcore": (load_chatcore, run_chatcore),
    "chatcore-packed": (load_chatcore_packed, run_chatcore),
    "chatcore-plain": (load_chatcore_plain, run_chatcore),
    "chatcore-int8": (load_chatcore_int8, run_chatcore),
    "chatcore-fixed": (load_chatcore_fixed, run_chatcore),
    "chatcore-int8-fixed": (lambda native, hf_dir, threads: load_chatcore_fixed(native, hf_dir, threads, "int8"),
                            run_chatcore),
    "chatcore-spec": (load_chatcore_spec, run_chatcore),
    "chatcore-int8-spec": (lambda native, hf_dir, threads: load_chatcore_spec(native, hf_dir, threads, "int8"), run_chatcore),
    "chatcore-direct": (load_chatcore_direct, run_chatcore_direct),
    "chatcore-int8-direct": (load_chatcore_int8_direct, run_chatcore_direct),
    "ct2-float32": (lambda native, hf_dir, threads: load_ct2(native.parent, threads, "float32"), run_ct2),
    "ct2-int8": (lambda native, hf_dir, threads: load_ct2(native.parent, threads, "int8"), run_ct2),
    "seed-loop": (load_seed_loop, run_seed_loop),
    "transformers": (load_transformers, run_transformers),
}


BATCHED = ("chatcore", "chatcore-packed", "chatcore-plain", "chatcore-int8", "chatcore-fixed", "chatcore-int8-fixed",
           "ct2-float32", "ct2-int8")  # the contestants that serve --batch N conversations at once

SPEC_PAIRS = 3  # plain/speculative pairs per prompt in a -spec worker


def speculation_pairs(served, backend, p: int, new_tokens: int) -> dict:
    """Plain and speculative decoding in turn on the same served engine (SPEC_PAIRS pairs): the ratios
    come from back-to-back runs in one process, so load drifting on a shared machine cancels out."""
    import statistics

    speculator, out = backend.speculator, {"decode": [], "total": [], "same_reply": []}
    drafted0, accepted0 = backend.drafted, backend.accepted
    for _ in range(SPEC_PAIRS):
        runs = {}
        for mode in ("plain", "spec"):
            backend.speculator = speculator if mode == "spec" else None
            t0, first, end, n = served.run(prompt_ids(p), new_tokens)
            runs[mode] = ((n - 1) / (end - first), n / (end - t0), served.reply, n, first - t0)
        out["decode"].append(runs["spec"][0] / runs["plain"][0])
        out["total"].append(runs["spec"][1] / runs["plain"][1])
        out["same_reply"].append(runs["spec"][2] == runs["plain"][2])
    backend.speculator = speculator
    return dict(new_tokens=runs["spec"][3], ttft_s=round(runs["spec"][4], 4), decode_tok_s=round(runs["spec"][0], 3),
                total_tok_s=round(runs["spec"][1], 3), plain_decode_tok_s=round(runs["plain"][0], 3),
                decode_ratio=round(statistics.median(out["decode"]), 3),
                total_ratio=round(statistics.median(out["total"]), 3), same_reply=all(out["same_reply"]),
                drafted=backend.drafted - drafted0, accepted=backend.accepted - accepted0)


def worker(name: str, native: Path, hf_dir: Path, prompts: list[int], new_tokens: int, threads: int) -> None:
    if name.startswith("chatcore"):
        import chatcore  # noqa: F401  before torch, as the `chatcore` command: its OpenMP default is read when torch loads
    import torch

    torch.set_num_threads(threads)
    load, run = RUNNERS[name]
    model = load(native, hf_dir, threads)
    run(model, prompt_ids(8), 4)  # warm-up: kernels, allocator, lazy imports
    backend = getattr(getattr(model, "generator", None), "backend", None)
    speculator = getattr(backend, "speculator", None)
    for p in prompts:
        if BATCH > 1:
            batch = [prompt_ids(p, i) for i in range(BATCH)]
            t0, first, end, n = (model.run_batch(batch, new_tokens) if isinstance(model, Served)
                                 else run_ct2_batch(model, batch, new_tokens))
            print(json.dumps(dict(engine=name, prompt_tokens=p, batch=BATCH, new_tokens=n, ttft_s=round(first - t0, 4),
                                  decode_tok_s=None, total_tok_s=round(n / (end - t0), 3))), flush=True)
            continue
        if speculator is not None:
            print(json.dumps(dict(engine=name, prompt_tokens=p, **speculation_pairs(model, backend, p, new_tokens))),
                  flush=True)
            continue
        t0, first, end, n = run(model, prompt_ids(p), new_tokens)
        rec = dict(
            engine=name,
            prompt_tokens=p,
            new_tokens=n,
            ttft_s=round(first - t0, 4),
            decode_tok_s=round((n - 1) / (end - first), 3) if n > 1 else None,
            total_tok_s=round(n / (end - t0), 3),
        )
        if isinstance(model, Served):
            rec["reply_sha1"] = hashlib.sha1(model.reply.encode()).hexdigest()[:12]
        print(json.dumps(rec), flush=True)
    print(json.dumps(dict(engine=name, peak_rss_mb=round(peak_rss_mb(), 1))), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="24 new tokens instead of 150")
    ap.add_argument("--json", action="store_true", help="one JSON object per measurement")
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--prompts", default="32,512", help="prompt lengths in tokens, comma-separated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engines", default=",".join(CONTESTANTS))
    ap.add_argument("--seed-tokens", type=int, default=None,
                    help="new tokens for the seed's loop only (it needs minutes at 512 tokens); default: --new-tokens")
    ap.add_argument("--speculative", default=None,
                    help="also run chatcore-spec / chatcore-int8-spec with this draft: prompt_lookup or a checkpoint")
    ap.add_argument("--spec-k", type=int, default=4, help="tokens guessed per step (--speculative)")
    ap.add_argument("--greedy", action="store_true", help="greedy decoding (top-k 1) in every contestant")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every contestant this many times, in turn (the order reversed every other round), "
                         "and report each one's median: drift on a shared machine hits all alike")
    ap.add_argument("--busy", type=int, default=0,
                    help="run N busy-looping processes beside the contestants (another program on the machine)")
    ap.add_argument("--batch", type=int, default=1,
                    help="conversations at once (served chatcore and CTranslate2 only): aggregate tok/s, peak RSS")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--models", help=argparse.SUPPRESS)
    args = ap.parse_args()
    new_tokens = args.new_tokens or (24 if args.quick else 150)
    prompts = [int(p) for p in args.prompts.split(",")]
    global TOP_K, BATCH
    BATCH = args.batch
    if args.greedy:
        TOP_K = 1
    if args.speculative:
        SPECULATIVE.update(draft=args.speculative, k=args.spec_k)
        if not args.worker:  # each -spec contestant runs right after its plain twin (and times plain itself too)
            args.engines = ",".join(e + ("," + e + "-spec" if e in ("chatcore", "chatcore-int8") else "")
                                    for e in args.engines.split(","))
    if args.worker:
        d = Path(args.models)
        worker(args.worker, d / "gpt2-random.safetensors", d / "hf", prompts, new_tokens, args.threads)
        return
    engines = [e for e in args.engines.split(",") if has_ctranslate2() or not e.startswith("ct2-")]
    if engines != args.engines.split(","):
        print("# CTranslate2 is not installed (pip install -e .[bench]): its contestants are left out", file=sys.stderr)
    if BATCH > 1:
        left_out = [e for e in engines if e not in BATCHED]
        engines = [e for e in engines if e in BATCHED]
        if left_out:
            print(f"# --batch {BATCH}: {', '.join(left_out)} left out (one conversation at a time only)", file=sys.stderr)
    args.engines = ",".join(engines)
    with tempfile.TemporaryDirectory(prefix="chatcore-bench-") as d:
        native, hf_dir = write_models(Path(d))
        for kind in ("float32", "int8"):
            if f"ct2-{kind}" in engines:
                convert_ct2(hf_dir, Path(d) / f"ct2-{kind}", None if kind == "float32" else "int8")
        with busy_processes(args.busy):
            run_all(args, Path(d), prompts, new_tokens)


def run_all(args, models: Path, prompts: list[int], new_tokens: int) -> None:
    import statistics

    runs: dict[tuple[str, int], list[dict]] = {}
    rss: dict[str, float] = {}
    loads: list[float] = []
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false")
    names = args.engines.split(",")
    for round_ in range(args.rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            n = args.seed_tokens if name == "seed-loop" and args.seed_tokens else new_tokens
            cmd = [sys.executable, __file__, "--worker", name, "--models", str(models), "--prompts", args.prompts,
                   "--new-tokens", str(n), "--threads", str(args.threads)]
            cmd += ["--batch", str(args.batch)] + ["--greedy"] * args.greedy + (["--speculative", args.speculative, "--spec-k", str(args.spec_k)]
                                                 if args.speculative else [])
            loads.append(os.getloadavg()[0])
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
            if proc.returncode != 0:
                sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
            for line in proc.stdout.splitlines():
                if not line.startswith("{"):
                    continue
                rec = json.loads(line)
                if args.json:
                    print(json.dumps(dict(rec, threads=args.threads, dtype="float32", model="gpt2-124M-random",
                                          round=round_)))
                if "peak_rss_mb" in rec:
                    rss[name] = max(rss.get(name, 0.0), rec["peak_rss_mb"])
                else:
                    runs.setdefault((name, rec["prompt_tokens"]), []).append(rec)

    def median_run(recs: list[dict]) -> dict:  # the median of each figure over the rounds
        out = dict(recs[0])
        for key in ("ttft_s", "decode_tok_s", "total_tok_s"):
            vals = [r[key] for r in recs if r.get(key)]
            out[key] = statistics.median(vals) if vals else None
        out["all_decode_tok_s"] = [r.get("decode_tok_s") for r in recs]
        return out

    results = {k: median_run(v) for k, v in runs.items()}

    if args.json:
        for p in prompts:
            ours, ref = results.get(("chatcore", p)), results.get(("transformers", p))
            if ours and ref and ours["decode_tok_s"] and ref["decode_tok_s"]:
                print(json.dumps(dict(
                    ratio="chatcore/transformers", prompt_tokens=p,
                    decode_speedup=round(ours["decode_tok_s"] / ref["decode_tok_s"], 3),
                    ttft_ratio=round(ours["ttft_s"] / ref["ttft_s"], 3),
                )))
        return

    print(f"GPT-2 124M shapes, random weights, fp32, {args.threads} threads, {new_tokens} new tokens, "
          + (f"{args.batch} conversations at once (TTFT: the median one's; total tok/s: all of them), " if args.batch > 1 else "")
          +
          f"temperature {TEMPERATURE}, top-k {TOP_K}; {args.rounds} round(s), medians; "
          f"load average {min(loads):.1f}-{max(loads):.1f} at the contestants' starts"
          + (f"; {args.busy} busy-looping processes beside them" if args.busy else ""))
    head = f"{'engine':<21} {'prompt':>6} {'new':>4} {'TTFT s':>8} {'decode tok/s':>13} {'total tok/s':>12} {'peak RSS MB':>12}"
    print(head)
    print("-" * len(head))
    for name in args.engines.split(","):
        for p in prompts:
            r = results.get((name, p))
            if r:
                dec = f"{r['decode_tok_s']:.2f}" if r["decode_tok_s"] else "-"
                print(f"{name:<21} {p:>6} {r['new_tokens']:>4} {r['ttft_s']:>8.3f} {dec:>13} {r['total_tok_s']:>12.2f} {rss.get(name, 0):>12.0f}")
    def ratio(a, b, key):
        ra, rb = results.get((a, p)), results.get((b, p))
        return ra[key] / rb[key] if ra and rb and ra.get(key) and rb.get(key) else None

    for p in prompts:
        for ours in ("chatcore", "chatcore-packed", "chatcore-plain", "chatcore-int8"):
            parts = []
            others = ("chatcore-plain",) * (ours == "chatcore-packed") + ("ct2-float32", "ct2-int8", "transformers",
                                                                         "seed-loop", ours + "-direct", ours + "-fixed")
            for other in others:
                dec, ttft = ratio(ours, other, "decode_tok_s"), ratio(ours, other, "ttft_s")
                tot = ratio(ours, other, "total_tok_s")
                if dec:
                    parts.append(f"{other}: decode {dec:.2f}x, TTFT {ttft:.2f}x, total {tot:.2f}x")
                elif tot:  # --batch: no single stream's decode rate
                    parts.append(f"{other}: total {tot:.2f}x, TTFT {ttft:.2f}x")
            if parts:
                print(f"prompt {p:>4}, {ours} (served) vs " + "; ".join(parts))
    for p in prompts:
        for ours in ("chatcore", "chatcore-int8"):
            spec = results.get((ours + "-spec", p))
            if spec and spec.get("drafted"):
                print(f"prompt {p:>4}, {ours}-spec vs plain, {SPEC_PAIRS} interleaved pairs (median): "
                      f"decode {spec['decode_ratio']:.2f}x, total {spec['total_ratio']:.2f}x; "
                      f"{spec['accepted']}/{spec['drafted']} guesses stood ({spec['accepted'] / spec['drafted']:.0%}); "
                      f"same reply as plain: {spec['same_reply']}")
    print("peak RSS MB: " + ", ".join(f"{k} {v:.0f}" for k, v in rss.items()))
    for ours, other in (("chatcore", "ct2-float32"), ("chatcore-int8", "ct2-int8")):
        if rss.get(ours) and rss.get(other):
            print(f"peak RSS, {ours} / {other}: {rss[ours] / rss[other]:.2f}x (target <= 1.0x)")


if __name__ == "__main__":
    main()
