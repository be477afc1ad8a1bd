"""The Engine: model + tokenizer + sampler + stop rules + streaming (one conversation).

``Engine.stream(prompt, params)`` runs the prompt through the model once
(prefill, filling a KV cache), then feeds one token per step. It yields decoded
text as it comes and stops at the first of: a newline (``stop_at_newline``), a
stop string (matched on the decoded text, so ``"\\nHuman:"`` is caught however
it was tokenised; the stop string is not yielded), end-of-text,
``max_new_tokens``, or ``cancelled()`` turning true. Text that might be the
start of a stop string is held back until it is known not to be.

Which weights an engine serves is decided in `chatcore.weights`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from . import checkpoint as ckpt
from .model import GPT
from .reply_text import ReplyText, prompt_window, slide_window, turn_marker_ids
from .sampling import SamplingParams, make_generator, sample, validate
from .threads import SERVING_THREADS
from .tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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

    Weights loaded column-major already (`chatcore.weights.build_engine` reads them
    that way) are not copied again; the tied embedding follows the head.
    """
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    if device.type == "cpu" and not getattr(model, "quantized", None):  # int8 layers hold their own layout
        for name, p in model.named_parameters():  # the tied head is listed once, as wte
            if p.dim() == 2 and decode_column_major(name):
                p.data = ckpt.as_column_major(p.data)
        model.lm_head.weight = model.transformer.wte.weight
    return model


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
        self.threads = int(threads) if threads else SERVING_THREADS  # what a CPU batch worker decodes on
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
        self.speculator = None  # a drafter (chatcore.speculative) for batching's lone conversations; None: off

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
        text = ReplyText(self.tokenizer, params)
        for tok in self.tokens(self.tokenizer.encode(prompt), params, cancelled):
            out, stopped = text.push(tok)
            if out:
                yield out
            if stopped:
                return
        rest = text.finish()
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
        ids = prompt_window(ids, self.block_size, self.tokenizer.eot_token)
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
                context = slide_window(ids + reply, self.block_size)
                cache.reset()
                logits = self._forward(context, cache)
            else:
                logits = self._forward([tok], cache)

    def _forward(self, ids: list[int], cache) -> torch.Tensor:
        idx = torch.tensor([ids], dtype=torch.long, device=self.device)
        with torch.inference_mode():
            return self.model.forward_cached(idx, cache)
