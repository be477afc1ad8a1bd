"""Serving many conversations: continuous batching, prefix reuse, int8 weights.

GPT-2 124M shapes with random weights (the same in every contestant), 2 torch threads, all contestants side by side in ONE run:

1. Aggregate tokens/s: 8 conversations (prompts from the sample conversations),
   150 new tokens each (temperature 0.8, top-k 200, seeded), arriving 0.25 s
   apart. chatcore's continuous batching (fp32 with oneDNN-packed matrices as a CPU
   serves it, fp32 in torch's own layout, and int8) vs the same Engine
   serving them one at a time vs transformers' static batch of 8 (left-padded,
   all 8 prompts at once: it is not charged for the staggered arrivals).
   Aggregate = all new tokens / (first arrival -> last token). chatcore's figures
   come through `chatcore.serving.Generator` (the path a bot's requests take);
   the BatchScheduler driven directly is shown beside them as a reference.
   CTranslate2 float32 and int8 (when installed: ``pip install -e .[bench]``),
   converted from the same weights, run a static batch of all prompts at once.
2. Time to first token of a follow-up turn after a 512-token conversation:
   reusing the conversation's cached state vs re-running the whole history.
3. Single-stream decode tokens/s (32-token prompt, 150 new tokens, greedy):
   chatcore int8 vs chatcore fp32 vs transformers fp32.
5. Many LoRA adapters in one batch (issue 12): the same 8 conversations over 1,
   2 and 8 different adapters (rank 8 on c_attn, c_proj, c_fc, mlp c_proj; one
   per scope) vs no adapter: aggregate tokens/s; target 8 adapters >= 80% of none.
   The four run interleaved for --adapter-rounds rounds (order alternating); the
   median round of each is reported.
4. int8 quality: perplexity and greedy (top-1) next-token agreement vs fp32 on
   held-out sample conversations. Random weights say nothing about quality, so
   this uses a small model trained here on the other conversations (or a real
   checkpoint: --checkpoint). Tolerance: perplexity within 2%, agreement >= 95%.

    python benchmarks/serving.py            # full run (a few minutes)
    python benchmarks/serving.py --quick    # smaller numbers: a smoke run
    python benchmarks/serving.py --json     # one JSON object per measurement
    python benchmarks/serving.py --skip followup,decode,quality,adapters --batch-rounds 3
                                            # section 1 only: fp32 packed vs plain layout vs CTranslate2, interleaved

Timings on a shared machine drift: compare within one run, as ratios.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import threading
import time
import warnings
from pathlib import Path

from _common import build_model, ct2_batch, first_token_timer  # benchmarks/ is on sys.path when a script runs

try:  # CTranslate2's own OpenMP runtime reads the environment as it loads: before chatcore sets its default
    import ctranslate2  # noqa: F401
except ImportError:
    pass
import chatcore  # noqa: E402,F401  before torch, as the `chatcore` command: its OpenMP default is read when torch loads
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".." / "shared" / "data" / "sample_conversations.jsonl"
TEMPERATURE, TOP_K, SEED = 0.8, 200, 1234
PPL_TOLERANCE, MIN_AGREEMENT = 0.02, 0.95


def prompt_ids(n: int) -> list[int]:
    return torch.randint(0, 50256, (n,), generator=torch.Generator().manual_seed(n)).tolist()


def conversations() -> list[dict]:
    return [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]


def make_engine(model, int8: bool = False, layout: str = "packed"):
    """The engine as `chatcore.weights.build_engine` serves it on a CPU: int8, or fp32 with its matrices
    oneDNN-packed (``model.cpu_layout: auto``) or in torch's own layout (``plain``)."""
    from chatcore.cpu_linear import pack_linears
    from chatcore.engine import Engine
    from chatcore.threads import release_thread_pool
    from chatcore.quant import quantize_int8

    engine = Engine(copy.deepcopy(model), model_id="bench", device="cpu", dtype="float32")
    if int8:
        quantize_int8(engine.model)
    elif layout == "packed":
        pack_linears(engine.model)
    release_thread_pool()  # as build_engine does: the decoding thread's pool is the only one
    return engine


def hf_model(model):
    from transformers import GPT2Config, GPT2LMHeadModel

    from chatcore.hf import to_hf_state_dict

    c = model.config
    cfg = GPT2Config(n_positions=c.block_size, vocab_size=c.vocab_size, n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd)
    with torch.device("meta"):
        hf = GPT2LMHeadModel(cfg)
    hf.load_state_dict(to_hf_state_dict(model), strict=False, assign=True)
    hf.tie_weights()
    return hf.eval()


class Sink:
    """Collects one request's text and timings from the scheduler thread."""

    def __init__(self) -> None:
        self.first = self.end = None
        self.done = threading.Event()
        self.error = None

    def __call__(self, item) -> None:
        from chatcore.batching import DONE

        now = time.perf_counter()
        if item is DONE or isinstance(item, BaseException):
            self.error = None if item is DONE else item
            self.end = now
            self.done.set()
        elif self.first is None:
            self.first = now


def make_adapters(model, n: int, folder: Path) -> list[Path]:
    """`n` random rank-8 adapters on every projection of `model` (what a scope's fine-tune writes)."""
    from chatcore import lora

    paths = []
    m = copy.deepcopy(model)  # one copy: each adapter re-draws its A and B
    cfg = lora.LoRAConfig(rank=8, alpha=16)
    lora.apply_lora(m, cfg)
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for _, layer in lora.lora_layers(m):
                layer.lora_A.normal_(0.0, 0.02, generator=g)
                layer.lora_B.normal_(0.0, 0.02, generator=g)
        paths.append(lora.save_adapter(m, folder / f"adapter_{i}.safetensors", cfg, base_model="bench"))
    return paths


# --- 1. aggregate throughput ------------------------------------------------------------


def batched(engine, prompts: list[str], new_tokens: int, stagger: float, adapters: list | None = None) -> dict:
    from chatcore.batching import BatchScheduler
    from chatcore.sampling import SamplingParams

    sched = BatchScheduler(engine, max_batch=len(prompts))
    try:
        _warm(sched)
        for i, path in enumerate(adapters or []):  # loaded before the clock starts (lazy loading is timed apart)
            _warm(sched, (f"scope{i}", str(path)))
        steps0 = sched.steps
        t0 = time.perf_counter()
        requests, sinks = [], []
        for i, prompt in enumerate(prompts):
            time.sleep(max(0.0, t0 + i * stagger - time.perf_counter()))
            sink = Sink()
            params = SamplingParams(temperature=TEMPERATURE, top_k=TOP_K, max_new_tokens=new_tokens,
                                    stop_at_newline=False, seed=SEED + i)
            adapter = (f"scope{i % len(adapters)}", str(adapters[i % len(adapters)])) if adapters else None
            requests.append(sched.submit(prompt, params, sink, adapter=adapter))
            sinks.append(sink)
        for s in sinks:
            s.done.wait()
            if s.error:
                raise s.error
        end = max(s.end for s in sinks)
        tokens = sum(len(r.reply) for r in requests)
        return dict(tokens=tokens, seconds=end - t0, tok_s=tokens / (end - t0),
                    ttft_p50_s=statistics.median(s.first - (t0 + i * stagger) for i, s in enumerate(sinks)),
                    decode_steps=sched.steps - steps0)
    finally:
        sched.close(timeout=10)


def served_batch(engine, prompts: list[str], new_tokens: int, stagger: float) -> dict:
    """The same staggered arrivals through `Generator.stream`, as the bot's adapters submit them."""
    import asyncio

    from chatcore.sampling import SamplingParams
    from chatcore.serving import Generator

    gen = Generator(engine, max_batch=len(prompts))

    async def one(i: int, prompt: str, t0: float) -> tuple[float, float, int]:
        await asyncio.sleep(max(0.0, t0 + i * stagger - time.perf_counter()))
        params = SamplingParams(temperature=TEMPERATURE, top_k=TOP_K, max_new_tokens=new_tokens,
                                stop_at_newline=False, stop=[], seed=SEED + i)
        first, text = None, ""
        async for delta in gen.stream(prompt, params):
            first = first or time.perf_counter()
            text += delta
        return first - (t0 + i * stagger), time.perf_counter(), engine.count_tokens(text)

    async def run() -> dict:
        await gen.generate("Human: hi\nAssistant:", SamplingParams(max_new_tokens=4, stop_at_newline=False))  # warm-up
        t0 = time.perf_counter()
        done = await asyncio.gather(*(one(i, p, t0) for i, p in enumerate(prompts)))
        end = max(d[1] for d in done)
        tokens = sum(d[2] for d in done)  # the replies re-tokenized: close to the tokens generated
        await gen.close()
        return dict(tokens=tokens, seconds=end - t0, tok_s=tokens / (end - t0),
                    ttft_p50_s=statistics.median(d[0] for d in done))

    return asyncio.run(run())


def ct2_models(model, d: Path) -> dict:
    """The same weights converted by CTranslate2's Transformers converter: {compute type: model dir}."""
    import shutil

    import ctranslate2
    from safetensors.torch import save_file

    from chatcore.hf import to_hf_state_dict

    hf_dir = d / "hf"
    hf_dir.mkdir()
    c = model.config
    (hf_dir / "config.json").write_text(json.dumps(dict(
        model_type="gpt2", architectures=["GPT2LMHeadModel"], n_positions=c.block_size, n_ctx=c.block_size,
        vocab_size=c.vocab_size, n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd,
        activation_function="gelu_new", bos_token_id=50256, eos_token_id=50256)))
    save_file({k: v.contiguous() for k, v in to_hf_state_dict(model).items() if k != "lm_head.weight"},
              str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    vocab = ROOT / ".." / "shared" / "data" / "gpt2"
    shutil.copy(vocab / "encoder.json", hf_dir / "vocab.json")
    shutil.copy(vocab / "vocab.bpe", hf_dir / "merges.txt")
    out = {}
    for kind, quant in (("float32", None), ("int8", "int8")):
        out[kind] = ctranslate2.converters.TransformersConverter(str(hf_dir)).convert(
            str(d / f"ct2-{kind}"), quantization=quant, force=True)
    return out


def ct2_static(model_dir: str, kind: str, tokenizer, prompts: list[str], new_tokens: int, threads: int) -> dict:
    """CTranslate2's static batch of all prompts at once (not charged for the staggered arrivals)."""
    import ctranslate2

    vocab = json.loads((ROOT / ".." / "shared" / "data" / "gpt2" / "encoder.json").read_text(encoding="utf-8"))
    by_id = {i: t for t, i in vocab.items()}
    gen = ctranslate2.Generator(model_dir, device="cpu", compute_type=kind, intra_threads=threads)
    return ct2_batch(gen, [[by_id[i] for i in tokenizer.encode(p)] for p in prompts], new_tokens, TOP_K, TEMPERATURE)


def _warm(sched, adapter=None) -> None:
    from chatcore.sampling import SamplingParams

    sink = Sink()
    sched.submit("Human: hi\nAssistant:", SamplingParams(max_new_tokens=4, stop_at_newline=False), sink, adapter=adapter)
    sink.done.wait()


def one_at_a_time(engine, prompts: list[str], new_tokens: int) -> dict:
    from chatcore.sampling import SamplingParams

    engine.generate("Human: hi\nAssistant:", SamplingParams(max_new_tokens=4))
    t0 = time.perf_counter()
    tokens = 0
    for i, prompt in enumerate(prompts):  # arrivals are 0.25 s apart; each waits for the previous reply
        params = SamplingParams(temperature=TEMPERATURE, top_k=TOP_K, max_new_tokens=new_tokens,
                                stop_at_newline=False, seed=SEED + i)
        tokens += sum(1 for _ in engine.tokens(engine.tokenizer.encode(prompt), params))
    seconds = time.perf_counter() - t0
    return dict(tokens=tokens, seconds=seconds, tok_s=tokens / seconds)


def transformers_static(hf, tokenizer, prompts: list[str], new_tokens: int) -> dict:
    ids = [tokenizer.encode(p) for p in prompts]
    width = max(len(i) for i in ids)
    inp = torch.tensor([[50256] * (width - len(i)) + i for i in ids])  # left padding, masked out
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    kw = dict(do_sample=True, temperature=TEMPERATURE, top_k=TOP_K, top_p=1.0, pad_token_id=50256)
    with torch.inference_mode():
        hf.generate(inp[:, :8], attention_mask=mask[:, :8], max_new_tokens=2, **kw)  # warm-up
        torch.manual_seed(SEED)
        t0 = time.perf_counter()
        out = hf.generate(inp, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
    seconds = time.perf_counter() - t0
    tokens = (out.size(1) - width) * len(prompts)
    return dict(tokens=tokens, seconds=seconds, tok_s=tokens / seconds)


# --- 2. follow-up time to first token ----------------------------------------------------------


def follow_up_ttft(engine, history_tokens: int, reps: int) -> dict:
    from chatcore.batching import BatchScheduler
    from chatcore.prefix_cache import PrefixCache
    from chatcore.prompt import render_exchange, render_prompt
    from chatcore.sampling import SamplingParams

    convs = conversations()
    history = ""
    for c in convs:  # whole exchanges until the history reaches `history_tokens`
        if engine.count_tokens(history) >= history_tokens:
            break
        history += render_exchange(c["user"], c["assistant"])
    params = SamplingParams(temperature=0, max_new_tokens=12, stop_at_newline=False)
    reuse = BatchScheduler(engine, max_batch=1, prefix_cache=PrefixCache(512 * 2**20))
    fresh = BatchScheduler(engine, max_batch=1)

    def ask(sched, prompt):
        sink = Sink()
        t0 = time.perf_counter()
        request = sched.submit(prompt, params, sink)
        sink.done.wait()
        if sink.error:
            raise sink.error
        return sink.first - t0, request

    try:
        _warm(reuse), _warm(fresh)
        with_cache, without, reused = [], [], []
        for i in range(reps):
            turn = history + render_prompt(f"and what about number {i}?")
            _, first = ask(reuse, turn)  # the conversation so far: its state is now cached
            reply = engine.tokenizer.decode(first.reply).strip()
            follow = f"{history}{render_exchange(f'and what about number {i}?', reply)}{render_prompt('tell me more')}"
            t, r = ask(reuse, follow)
            with_cache.append(t)
            reused.append(r.reused)
            without.append(ask(fresh, follow)[0])
        prompt_tokens = engine.count_tokens(follow)
    finally:
        reuse.close(timeout=10), fresh.close(timeout=10)
    return dict(history_tokens=engine.count_tokens(history), prompt_tokens=prompt_tokens,
                reused_tokens=min(reused), ttft_reuse_s=statistics.median(with_cache),
                ttft_rerun_s=statistics.median(without))


# --- 3. single-stream decode ---------------------------------------------------------------------


def decode_chatcore(engine, ids: list[int], new_tokens: int) -> dict:
    from chatcore.sampling import SamplingParams

    params = SamplingParams(temperature=0, max_new_tokens=new_tokens, stop_at_newline=False)
    list(engine.tokens(ids[:8], params.updated(max_new_tokens=4)))  # warm-up
    t0 = time.perf_counter()
    first, n = None, 0
    for _ in engine.tokens(ids, params):
        n += 1
        first = first or time.perf_counter()
    end = time.perf_counter()
    return dict(tokens=n, ttft_s=first - t0, decode_tok_s=(n - 1) / (end - first))


def decode_transformers(hf, ids: list[int], new_tokens: int) -> dict:

    inp = torch.tensor([ids])
    kw = dict(attention_mask=torch.ones_like(inp), do_sample=False, pad_token_id=50256)
    with torch.inference_mode():
        hf.generate(inp[:, :8], max_new_tokens=4, **{**kw, "attention_mask": torch.ones_like(inp[:, :8])})
        timer = first_token_timer()
        t0 = time.perf_counter()
        out = hf.generate(inp, max_new_tokens=new_tokens, min_new_tokens=new_tokens, streamer=timer, **kw)
    end = time.perf_counter()
    n = out.size(1) - len(ids)
    return dict(tokens=n, ttft_s=timer.first - t0, decode_tok_s=(n - 1) / (end - timer.first))


# --- 4. int8 quality ------------------------------------------------------------------------------


def int8_quality(checkpoint: str | None, steps: int) -> dict:
    from chatcore.model import GPT, GPTConfig
    from chatcore.prompt import render_exchange
    from chatcore.quant import quality, quantize_int8
    from chatcore.tokenizer import Tokenizer

    tok = Tokenizer()
    docs = [tok.encode(render_exchange(c["user"], c["assistant"])) for c in conversations()]
    train, held_out = docs[:300], docs[300:]
    if checkpoint:
        from chatcore.checkpoint import load

        model, _ = load(checkpoint)
        model = model.float().eval()
        source = f"checkpoint {checkpoint}"
    else:  # a small model that has learned something, over the corpus' own tokens
        vocab = sorted({t for d in docs for t in d})
        compact = {t: i for i, t in enumerate(vocab)}
        train = [[compact[t] for t in d] for d in train]
        held_out = [[compact[t] for t in d] for d in held_out]
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=64, vocab_size=len(vocab), n_layer=2, n_head=4, n_embd=128))
        stream = torch.tensor([t for d in train for t in d])
        opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
        g = torch.Generator().manual_seed(0)
        for _ in range(steps):
            starts = torch.randint(0, len(stream) - 65, (8,), generator=g)
            batch = torch.stack([stream[s : s + 65] for s in starts])
            _, loss = model(batch[:, :-1].contiguous(), batch[:, 1:].contiguous())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        source = f"2-layer 128-wide model trained {steps} steps on 300 sample conversations"
    q = quality(model, quantize_int8(copy.deepcopy(model)), held_out)
    return dict(evaluated=source, held_out_tokens=q.tokens, ppl_fp32=q.reference_ppl, ppl_int8=q.candidate_ppl,
                ppl_change=q.ppl_change, top1_agreement=q.top1_agreement,
                within_tolerance=abs(q.ppl_change) <= PPL_TOLERANCE and q.top1_agreement >= MIN_AGREEMENT)


# --- main ---------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4 conversations x 24 tokens, fewer repetitions")
    ap.add_argument("--json", action="store_true", help="one JSON object per measurement")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--conversations", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--stagger", type=float, default=0.25, help="seconds between arrivals")
    ap.add_argument("--history", type=int, default=512, help="follow-up test: history tokens")
    ap.add_argument("--checkpoint", help="int8 quality on this checkpoint instead of a model trained here")
    ap.add_argument("--adapter-rounds", type=int, default=3, help="interleaved rounds of the LoRA adapter section")
    ap.add_argument("--batch-rounds", type=int, default=1,
                    help="interleaved rounds of the served and CTranslate2 contestants of section 1 (median reported)")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: batch,followup,decode,quality,adapters")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    n_conv = args.conversations or (4 if args.quick else 8)
    new_tokens = args.new_tokens or (24 if args.quick else 150)
    skip = set(filter(None, args.skip.split(",")))

    from chatcore.prompt import render_prompt

    model = build_model()
    fp32 = make_engine(model)  # oneDNN-packed (model.cpu_layout: packed)
    plain = make_engine(model, layout="plain") if not {"batch", "decode"} <= skip else None
    int8 = make_engine(model, int8=True)
    hf = hf_model(model) if not {"batch", "decode"} <= skip else None
    prompts = [render_prompt(c["user"]) for c in conversations()[:n_conv]]
    out: list[dict] = []
    started = time.perf_counter()

    def emit(section: str, name: str, **rec) -> None:
        rec = dict(section=section, name=name, threads=args.threads, model="gpt2-124M-random", **rec)
        out.append(rec)
        brief = {k: round(v, 3) if isinstance(v, float) else v for k, v in rec.items() if k not in ("section", "name", "threads", "model")}
        print(f"[{time.perf_counter() - started:6.1f}s] {section}: {name}: {brief}", file=sys.stderr, flush=True)
        if args.json:
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()}), flush=True)

    if "batch" not in skip:
        import tempfile

        try:
            import ctranslate2  # noqa: F401
        except ImportError:
            print("# CTranslate2 is not installed (pip install -e .[bench]): left out", file=sys.stderr)
            has_ct2 = False
        else:
            has_ct2 = True
        with tempfile.TemporaryDirectory(prefix="chatcore-ct2-") as d:
            contestants = {
                "chatcore served fp32 packed": lambda: served_batch(fp32, prompts, new_tokens, args.stagger),
                "chatcore served fp32 plain layout": lambda: served_batch(plain, prompts, new_tokens, args.stagger),
                "chatcore served int8": lambda: served_batch(int8, prompts, new_tokens, args.stagger),
            }
            if has_ct2:
                for kind, path in ct2_models(model, Path(d)).items():
                    contestants[f"ctranslate2 static batch {kind}"] = (
                        lambda path=path, kind=kind: ct2_static(path, kind, fp32.tokenizer, prompts, new_tokens, args.threads))
            runs: dict[str, list[dict]] = {name: [] for name in contestants}
            for i in range(args.batch_rounds):  # interleaved, the order alternating: drift hits all alike
                for name in (list(contestants) if i % 2 == 0 else list(contestants)[::-1]):
                    runs[name].append(dict(contestants[name](), load=os.getloadavg()[0]))
            for name, results in runs.items():  # the median round by tokens/s
                mid = sorted(results, key=lambda r: r["tok_s"])[len(results) // 2]
                emit("batch", name, **mid, rounds=len(results), tok_s_all=[round(r["tok_s"], 2) for r in results],
                     ttft_all=[round(r["ttft_p50_s"], 3) for r in results if r.get("ttft_p50_s")])
        emit("batch", "chatcore continuous batching fp32 packed (direct)", **batched(fp32, prompts, new_tokens, args.stagger))
        emit("batch", "chatcore continuous batching int8 (direct)", **batched(int8, prompts, new_tokens, args.stagger))
        emit("batch", "chatcore one at a time fp32", **one_at_a_time(fp32, prompts, new_tokens))
        emit("batch", f"transformers static batch of {n_conv} fp32", **transformers_static(hf, fp32.tokenizer, prompts, new_tokens))
    if "followup" not in skip:
        emit("followup", "chatcore fp32", **follow_up_ttft(fp32, args.history, 2 if args.quick else 3))
    if "decode" not in skip:
        ids = prompt_ids(32)
        emit("decode", "chatcore int8", **decode_chatcore(int8, ids, new_tokens))
        emit("decode", "chatcore fp32 packed", **decode_chatcore(fp32, ids, new_tokens))
        emit("decode", "chatcore fp32 plain layout", **decode_chatcore(plain, ids, new_tokens))
        emit("decode", "transformers fp32", **decode_transformers(hf, ids, new_tokens))
    if "quality" not in skip:
        emit("quality", "int8 vs fp32", **int8_quality(args.checkpoint, 100 if args.quick else 200))
    if "adapters" not in skip:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            paths = make_adapters(model, 8, Path(tmp))
            runs: dict[int, list[dict]] = {n: [] for n in (0, 1, 2, 8)}
            for i in range(args.adapter_rounds):  # interleaved, the order alternating: drift hits all alike
                for n in (list(runs) if i % 2 == 0 else list(runs)[::-1]):
                    runs[n].append(batched(fp32, prompts, new_tokens, args.stagger, paths[:n] if n else None))
            for n, results in runs.items():  # the median round by tokens/s
                mid = sorted(results, key=lambda r: r["tok_s"])[len(results) // 2]
                emit("adapters", f"{n} adapters" if n else "no adapter", **mid, rounds=len(results),
                     tok_s_all=[round(r["tok_s"], 2) for r in results])
    ratios = _ratios(out, n_conv)
    if args.json:
        for r in ratios:
            print(json.dumps(r))
        return
    _table(out, ratios, n_conv, new_tokens, args)


def _find(out, section, prefix):
    return next((r for r in out if r["section"] == section and r["name"].startswith(prefix)
                 and "plain layout" not in r["name"][len(prefix):]), None)


def _ratios(out: list[dict], n_conv: int) -> list[dict]:
    ratios = []
    tf = _find(out, "batch", "transformers")
    for name in ("chatcore served fp32", "chatcore served int8", "chatcore one at a time"):
        r = _find(out, "batch", name)
        if r and tf:
            ratios.append(dict(ratio=f"{name} / transformers static batch", value=round(r["tok_s"] / tf["tok_s"], 3), target=2.0))
    packed, plain = _find(out, "batch", "chatcore served fp32 packed"), _find(out, "batch", "chatcore served fp32 plain layout")
    if packed and plain:
        ratios.append(dict(ratio="served fp32 packed / plain layout tok/s", value=round(packed["tok_s"] / plain["tok_s"], 3)))
        ratios.append(dict(ratio="served fp32 packed / plain layout TTFT (lower is better)",
                           value=round(packed["ttft_p50_s"] / plain["ttft_p50_s"], 3)))
    for ours, kind, target in (("fp32", "float32", 1.0), ("int8", "int8", 1.3)):
        r, ct = _find(out, "batch", f"chatcore served {ours}"), _find(out, "batch", f"ctranslate2 static batch {kind}")
        if r and ct:
            ratios.append(dict(ratio=f"chatcore served {ours} / ctranslate2 {kind} tok/s", value=round(r["tok_s"] / ct["tok_s"], 3), target=target))
            if ct.get("ttft_p50_s"):
                ratios.append(dict(ratio=f"chatcore served {ours} / ctranslate2 {kind} TTFT (lower is better)",
                                   value=round(r["ttft_p50_s"] / ct["ttft_p50_s"], 3)))
    f = _find(out, "followup", "chatcore")
    if f:
        ratios.append(dict(ratio="follow-up TTFT: re-run / reuse", value=round(f["ttft_rerun_s"] / f["ttft_reuse_s"], 3), target=5.0))
    tf1, i8, f32 = _find(out, "decode", "transformers"), _find(out, "decode", "chatcore int8"), _find(out, "decode", "chatcore fp32")
    if tf1 and i8:
        ratios.append(dict(ratio="int8 decode / transformers fp32", value=round(i8["decode_tok_s"] / tf1["decode_tok_s"], 3), target=3.0))
    if f32 and i8:
        ratios.append(dict(ratio="int8 decode / chatcore fp32", value=round(i8["decode_tok_s"] / f32["decode_tok_s"], 3)))
    f32_plain = _find(out, "decode", "chatcore fp32 plain layout")
    if f32 and f32_plain:
        ratios.append(dict(ratio="fp32 packed decode / plain layout", value=round(f32["decode_tok_s"] / f32_plain["decode_tok_s"], 3)))
    none = _find(out, "adapters", "no adapter")
    for n in (1, 2, 8):
        r = _find(out, "adapters", f"{n} adapters")
        if r and none:
            ratios.append(dict(ratio=f"{n} LoRA adapters / no adapter (batch tok/s)", value=round(r["tok_s"] / none["tok_s"], 3),
                               **({"target": 0.8} if n == 8 else {})))
    return ratios


def _table(out, ratios, n_conv, new_tokens, args) -> None:
    print(f"GPT-2 124M shapes, random weights, {args.threads} threads; load average {os.getloadavg()[0]:.1f}")
    rows = [r for r in out if r["section"] == "batch"]
    if rows:
        print(f"\n1. {n_conv} conversations x {new_tokens} new tokens, arrivals {args.stagger} s apart "
              f"(temperature {TEMPERATURE}, top-k {TOP_K})")
        print(f"   {'server':<42} {'tokens':>6} {'seconds':>8} {'tok/s':>7} {'TTFT p50 s':>10}")
        for r in rows:
            ttft = f"{r['ttft_p50_s']:.2f}" if r.get("ttft_p50_s") else "-"
            rounds = f"   (rounds: {r['tok_s_all']} tok/s, TTFT {r['ttft_all']} s)" if r.get("rounds", 1) > 1 else ""
            print(f"   {r['name']:<42} {r['tokens']:>6} {r['seconds']:>8.1f} {r['tok_s']:>7.1f} {ttft:>10}{rounds}")
    f = _find(out, "followup", "chatcore")
    if f:
        print(f"\n2. follow-up turn after a {f['history_tokens']}-token history ({f['prompt_tokens']}-token prompt)")
        print(f"   TTFT reusing the cached conversation: {f['ttft_reuse_s'] * 1000:.0f} ms ({f['reused_tokens']} tokens reused)")
        print(f"   TTFT re-running the history:          {f['ttft_rerun_s'] * 1000:.0f} ms")
    rows = [r for r in out if r["section"] == "decode"]
    if rows:
        print(f"\n3. single stream, 32-token prompt, {new_tokens} new tokens, greedy")
        print(f"   {'engine':<20} {'tokens':>6} {'TTFT s':>7} {'decode tok/s':>13}")
        for r in rows:
            print(f"   {r['name']:<20} {r['tokens']:>6} {r['ttft_s']:>7.3f} {r['decode_tok_s']:>13.1f}")
    q = _find(out, "quality", "int8")
    if q:
        print(f"\n4. int8 quality on {q['held_out_tokens']} held-out tokens of the sample conversations ({q['evaluated']})")
        print(f"   perplexity fp32 {q['ppl_fp32']:.2f}, int8 {q['ppl_int8']:.2f} ({q['ppl_change'] * 100:+.2f}%), "
              f"greedy next-token agreement {q['top1_agreement'] * 100:.1f}% "
              f"(tolerance: |ppl change| <= {PPL_TOLERANCE * 100:.0f}%, agreement >= {MIN_AGREEMENT * 100:.0f}%: "
              f"{'within' if q['within_tolerance'] else 'OUTSIDE'})")
    rows = [r for r in out if r["section"] == "adapters"]
    if rows:
        print(f"\n5. {n_conv} conversations x {new_tokens} new tokens over LoRA adapters (one per scope, rank 8)")
        print(f"   {'adapters':<42} {'tokens':>6} {'seconds':>8} {'tok/s':>7}")
        for r in rows:
            rounds = f"   (each round: {r['tok_s_all']})" if r.get("tok_s_all") else ""
            print(f"   {r['name']:<42} {r['tokens']:>6} {r['seconds']:>8.1f} {r['tok_s']:>7.1f}{rounds}")
    if ratios:
        print("\nratios")
        for r in ratios:
            target = f"  (target >= {r['target']}x)" if "target" in r else ""
            if "TTFT" in r["ratio"]:
                target = "  (target <= 1.0x)"
            print(f"   {r['ratio']:<58} {r['value']:>6.2f}x{target}")


if __name__ == "__main__":
    main()
