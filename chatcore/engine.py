"""The Engine: model + tokenizer + sampler + stop rules + streaming (one conversation).

``Engine.stream(prompt, params)`` runs the prompt through the model once
(prefill, filling a KV cache), then feeds one token per step. It yields decoded
text as it comes and stops at the first of: a newline (``stop_at_newline``), a
stop string (matched on the decoded text, so ``"\\nHuman:"`` is caught however
it was tokenised; the stop string is not yielded), end-of-text,
``max_new_tokens``, or ``cancelled()`` turning true. Text that might be the
start of a stop string is held back until it is known not to be.

``Engine.from_config(model_cfg)`` finds the weights to serve (``model:`` keys):

    checkpoint: null   # a native .safetensors, a seed/nanoGPT .pt, or a Hugging Face directory
    base: gpt2         # hub name used when no checkpoint is configured
    download: true     # may fetch `base` from the Hugging Face hub when it is not cached
    cache_dir: null    # Hugging Face cache directory (null: huggingface_hub's default)
    device: auto       # auto (cuda -> mps -> cpu), cpu, cuda, cuda:1, mps
    dtype: auto        # auto (float32 on cpu, bfloat16/float16 on accelerators), float32, bfloat16, float16
    threads: null      # torch CPU threads (null: torch's default)

Resolution order: configured checkpoint -> ``base`` in the Hugging Face cache
-> ``base`` downloaded (when ``download`` and online) -> the ``starter`` seam
(a callable returning a checkpoint path or None; the learning loop provides the
offline starter model) -> ModelNotFound, saying what is missing and how to fix it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .model import GPT
from .prompt import ASSISTANT, HUMAN
from .sampling import SamplingParams, make_generator, sample, validate
from .tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelNotFound(RuntimeError):
    """No weights to serve could be found; the message says what to do."""


def pick_device(name: str | None = "auto") -> torch.device:
    """``auto``: cuda, then mps, then cpu; anything else is passed to torch.device."""
    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"model.device is {name!r} but CUDA is not available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"model.device is {name!r} but MPS is not available")
    return device


def pick_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """``auto``: float32 on the CPU (no fast half precision there), bfloat16 on CUDA when
    supported else float16, float16 on MPS."""
    if name in (None, "", "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device.type == "mps" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"model.dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


def turn_marker_ids(tokenizer: Tokenizer) -> frozenset[int]:
    """Tokens of the turn markers and line breaks: exempt from the repetition penalty
    (penalising them makes it harder for the model to end its turn)."""
    ids: set[int] = set()
    for text in (HUMAN, ASSISTANT, " " + HUMAN, " " + ASSISTANT, "\n" + HUMAN, "\n" + ASSISTANT, "\n", "\n\n"):
        ids.update(tokenizer.encode(text))
    return frozenset(ids)


def decode_column_major(name: str) -> bool:
    """Whether the engine keeps this weight column-major on the CPU: every Linear
    weight and the tied embedding/head, not the position table.

    One decode step is a matrix-vector product per Linear. With the weight in
    ``[in, out]`` memory order (same values, same shape, transposed storage)
    torch's CPU kernel reads it markedly faster (measured on a 2-core AVX2 CPU:
    GPT-2 124M's output head 14.4 -> 9.2 ms, its 48 block matrices 31.8 -> 28.2 ms
    per token); prefill matmuls are as fast either way.
    """
    return name.endswith(".weight") and name != "transformer.wpe.weight"


def prepare_for_inference(model: GPT, device: torch.device, dtype: torch.dtype) -> GPT:
    """Move the model, freeze it, and on the CPU lay its weights out for decoding.

    Weights loaded column-major already (``Engine.from_config`` reads them that
    way) are not copied again; the tied embedding follows the head.
    """
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    if device.type == "cpu":
        for name, p in model.named_parameters():  # the tied head is listed once, as wte
            if p.dim() == 2 and decode_column_major(name):
                p.data = ckpt.as_column_major(p.data)
        model.lm_head.weight = model.transformer.wte.weight
    return model


class _StopScanner:
    """Finds stop strings in streamed text; holds back text that may start one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.buf = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Text safe to emit now, and whether a stop string was found (emission ends there)."""
        self.buf += text
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf = self.buf[: min(hits)], ""
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.buf)), hold, -1):
                if self.buf.endswith(s[:k]):
                    hold = k
                    break
        cut = len(self.buf) - hold
        out, self.buf = self.buf[:cut], self.buf[cut:]
        return out, False

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


class Engine:
    """Serves one GPT: ``stream`` and ``generate`` per the contract in docs/architecture.md."""

    def __init__(
        self,
        model: GPT,
        tokenizer: Tokenizer | None = None,
        *,
        model_id: str = "gpt",
        device: str | torch.device | None = "auto",
        dtype: str | torch.dtype | None = "auto",
        threads: int | None = None,
        meta: dict | None = None,
    ):
        if threads:
            torch.set_num_threads(int(threads))
        self.device = device if isinstance(device, torch.device) else pick_device(device)
        self.dtype = dtype if isinstance(dtype, torch.dtype) else pick_dtype(dtype, self.device)
        self.tokenizer = tokenizer or Tokenizer()
        # every engine (start-up, fallback, hot swap) is built here: no unservable weights get further
        ckpt.check_servable(model, (meta or {}).get("source") or model_id, self.tokenizer.n_vocab)
        self.model = prepare_for_inference(model, self.device, self.dtype)
        self.model_id = model_id
        self.meta = meta or {}
        self.block_size = model.config.block_size
        self._exempt = turn_marker_ids(self.tokenizer)

    def count_tokens(self, text: str) -> int:
        return self.tokenizer.count(text)

    def generate(self, prompt: str, params: SamplingParams = SamplingParams()) -> str:
        return "".join(self.stream(prompt, params))

    def stream(
        self,
        prompt: str,
        params: SamplingParams = SamplingParams(),
        cancelled: Callable[[], bool] | None = None,
    ) -> Iterator[str]:
        """Yield the reply's text as it is generated (see the module docstring)."""
        validate(params)
        stops = list(params.stop) + (["\n"] if params.stop_at_newline else [])
        scanner = _StopScanner(stops)
        decoder = self.tokenizer.stream_decoder()
        for tok in self.tokens(self.tokenizer.encode(prompt), params, cancelled):
            text, stopped = scanner.feed(decoder.push(tok))
            if text:
                yield text
            if stopped:
                return
        text, stopped = scanner.feed(decoder.flush())
        rest = text if stopped else text + scanner.flush()
        if rest:
            yield rest

    def tokens(
        self,
        ids: Sequence[int],
        params: SamplingParams = SamplingParams(),
        cancelled: Callable[[], bool] | None = None,
    ) -> Iterator[int]:
        """Yield new token ids after prompt ``ids`` until end-of-text (not yielded),
        ``max_new_tokens`` or ``cancelled()``. No text-level stop rules here.

        The next step is computed only when the consumer asks for the next token,
        so a consumer that stops iterating wastes no work.
        """
        validate(params)
        if params.max_new_tokens == 0:
            return
        ids = list(ids) or [self.tokenizer.eot_token]  # empty prompt: the start of a document
        ids = ids[-(self.block_size - 1) :]  # leave room for at least one new token
        gen = make_generator(params.seed, self.device)
        vocab = self.tokenizer.n_vocab
        reply: list[int] = []
        # one row, filled in order: no slot is read before it is written, so no zeroing
        cache = self.model.new_cache(1, max_len=min(self.block_size, len(ids) + params.max_new_tokens), zeroed=False)
        if cancelled is not None and cancelled():
            return
        logits = self._forward(ids, cache)
        for i in range(params.max_new_tokens):
            # the model's vocabulary may be padded (nanoGPT's 50304): never pick a padding id
            tok = int(sample(logits[:, :vocab], params, [gen], [reply], self._exempt)[0])
            if tok == self.tokenizer.eot_token:
                return
            reply.append(tok)
            yield tok
            if i == params.max_new_tokens - 1 or (cancelled is not None and cancelled()):
                return
            if cache.length(0) >= cache.max_len:
                # context full: restart from the newest half, as nanoGPT's sliding crop would
                context = (ids + reply)[-(self.block_size // 2) :]
                cache.reset()
                logits = self._forward(context, cache)
            else:
                logits = self._forward([tok], cache)

    def _forward(self, ids: list[int], cache) -> torch.Tensor:
        idx = torch.tensor([ids], dtype=torch.long, device=self.device)
        with torch.inference_mode():
            return self.model.forward_cached(idx, cache)

    # --- model resolution ---------------------------------------------------------------

    @classmethod
    def from_config(
        cls,
        model_cfg: dict | None = None,
        starter: Callable[[], str | Path | None] | None = None,
        tokenizer: Tokenizer | None = None,
    ) -> "Engine":
        """Build the serving engine from the ``model:`` config section (see the module docstring)."""
        cfg = dict(model_cfg or {})
        device = pick_device(cfg.get("device", "auto"))
        dtype = pick_dtype(cfg.get("dtype", "auto"), device)
        model, meta, model_id = resolve_model(cfg, starter, decode_column_major if device.type == "cpu" else None)
        engine = cls(
            model,
            tokenizer,
            model_id=model_id,
            device=device,
            dtype=dtype,
            threads=cfg.get("threads"),
            meta=meta,
        )
        if cfg.get("quantize") == "int8":
            from .quant import quantize_int8

            quantize_int8(engine.model)
            engine.model_id += " int8"  # stored with every exchange: which weights answered
        return engine


def resolve_model(
    cfg: dict,
    starter: Callable[[], str | Path | None] | None = None,
    column_major: ckpt.ColumnMajor | None = None,
) -> tuple[GPT, dict, str]:
    """(model, metadata, model_id) from the first source that has weights; ModelNotFound otherwise.

    ``column_major`` picks weights to read straight into column-major memory (see
    `chatcore.checkpoint.load`)."""
    checkpoint = cfg.get("checkpoint")
    if checkpoint:
        path = Path(os.path.expanduser(str(checkpoint)))
        if not path.exists():
            raise ModelNotFound(
                f"model.checkpoint is {str(checkpoint)!r} but no such file or directory exists. "
                "Point it at a .safetensors checkpoint, a .pt file or a Hugging Face GPT-2 directory, "
                "or remove it to use GPT-2."
            )
        model, meta = ckpt.load(path, column_major=column_major)
        return model, meta, _model_id(path, meta)

    from . import hf

    base = cfg.get("base") or "gpt2"
    cache_dir = cfg.get("cache_dir")
    tried: list[str] = []
    try:
        model, meta = hf.load_hf(base, cache_dir=cache_dir, local_files_only=True, column_major=column_major)
        return model, meta, base
    except ckpt.CheckpointError:
        raise
    except Exception as e:  # not cached (huggingface_hub's own error types vary by version)
        tried.append(f"{base!r} is not in the Hugging Face cache ({type(e).__name__})")
    if cfg.get("download", True) and not _hub_offline():
        try:
            model, meta = hf.load_hf(base, cache_dir=cache_dir, local_files_only=False, column_major=column_major)
            return model, meta, base
        except ckpt.CheckpointError:
            raise
        except Exception as e:  # offline, proxy, no such repo...
            tried.append(f"downloading {base!r} failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
    else:
        tried.append("downloading is off (model.download: false or HF_HUB_OFFLINE=1)")
    if starter is not None:
        path = starter()
        if path:
            model, meta = ckpt.load(path, column_major=column_major)
            return model, meta, _model_id(Path(path), meta)
        tried.append("no offline starter model has been built")
    raise ModelNotFound(
        "No model to serve: no model.checkpoint is configured, "
        + "; ".join(tried)
        + ". To fix it: connect to the internet once so GPT-2 can be downloaded (about 500 MB), "
        "or copy a Hugging Face GPT-2 directory (config.json + model.safetensors) and set model.checkpoint to it"
        + (", or build the offline starter model" if starter is not None else "")
        + "."
    )


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _model_id(path: Path, meta: dict) -> str:
    base = (meta.get("provenance") or {}).get("base_model")
    name = path.stem if path.is_file() else path.name
    return f"{name} ({base})" if base and base != name else name
