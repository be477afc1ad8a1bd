"""int8 weights for CPU serving, and the check that they still speak like fp32.

`quantize_int8(model)` swaps every ``nn.Linear`` of a `chatcore.model.GPT`
(the output head included) for `Int8Linear`: weights stored as int8 with one
scale per output channel (symmetric), activations quantized per call (torch's
dynamic quantization kernels: fbgemm/x86 on Intel and AMD, qnnpack on ARM).
Decoding one token is bound by reading the weights, so a quarter of the bytes
and kernels that use every core make it several times faster than fp32.
The token embedding, tied to the head, is served from the same int8 rows
(`Int8Embedding`: only the rows looked up are dequantized), so int8 serving holds
no fp32 copy of it; the position embedding and LayerNorms stay fp32.

It is a load-time transform for serving, never saved or trained (packed int8
weights are not parameters). `Int8Loader` quantizes while the checkpoint is read,
so serving int8 never holds an fp32 copy of the model; `quantize_int8` converts
a model already in memory. ``model.quantize: auto`` (the default) serves int8 on
a CPU and the configured dtype elsewhere (`chatcore.weights.build_engine`).

Batching note: the activation scale is per call, i.e. shared by the rows of a
batch, so an int8 model's batched logits are close to, not bit-identical with,
its unbatched ones (fp32 batching is exact up to float rounding).

`quality(reference, candidate, documents)` measures what the swap costs:
perplexity of both models on the same documents, and how often their greedy
(top-1) next tokens agree under teacher forcing.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from .checkpoint import CheckpointError, all_finite, release_read_pages


@functools.cache  # torch.backends.quantized.supported_engines costs ~2 ms a call; int8 loading asks once per matrix
def _quantized_engine() -> str:
    supported = torch.backends.quantized.supported_engines
    for name in ("x86", "fbgemm", "qnnpack"):
        if name in supported:
            return name
    raise RuntimeError(f"this torch build has no int8 CPU kernels (quantized engines: {supported}); serve fp32 instead")


# elements quantized at a time: a block's temporaries stay small (4 MB), and are large enough for both cores
# (blocks of 16k elements ran 100x slower on a busy 2-core machine: OpenMP wake-ups per tiny op)
QUANTIZE_BLOCK = 1 << 20


def quantize_rows(w: torch.Tensor, done: Callable[[torch.Tensor], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """An fp32 ``[out, in]`` weight as int8 values and one symmetric fp32 scale per row.

    Bit for bit what ``torch.quantize_per_channel`` gives for these scales (fbgemm's
    ``round(x * (1 / scale))``, ties to even, clamped), but in multi-threaded tensor
    ops where torch's per-channel kernel runs one scalar loop on one core. Done in
    blocks of rows, so no temporary is as large as the weight; ``done(block)`` is
    called with each fp32 block once it has been read (int8 loading hands its file
    pages back there: the 154 MB embedding of GPT-2 is never resident at once).
    """
    w = w.detach()
    rows = w.size(0)
    q = torch.empty(w.shape, dtype=torch.int8)
    scale = torch.empty(rows, dtype=torch.float32)
    step = max(1, QUANTIZE_BLOCK // max(w.size(1), 1))
    for start in range(0, rows, step):
        block = w[start : start + step]
        x = block.float().cpu()
        # max(amax, -amin): no temporary for abs(); one pass over the block
        lo, hi = torch.aminmax(x, dim=1)
        s = torch.maximum(hi, lo.neg()).div_(127.0).clamp_(min=1e-12)
        scale[start : start + len(s)] = s
        y = x * torch.reciprocal(s)[:, None]  # float32 1/scale, as fbgemm's Quantize multiplies by
        q[start : start + len(s)] = y.round_().clamp_(-128, 127)
        if done is not None:
            done(block)
    return q, scale


def per_channel(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 values and per-row scales as a torch.qint8 tensor (what ``linear_prepack`` takes)."""
    with warnings.catch_warnings():  # torch marks its quantized-tensor constructors deprecated; the kernels remain
        warnings.simplefilter("ignore")
        return torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros(len(scale), dtype=torch.long), 0)


def quantize_weight(w: torch.Tensor) -> torch.Tensor:
    """An fp32 ``[out, in]`` weight as int8 with one symmetric scale per output channel (a torch.qint8 tensor)."""
    return per_channel(*quantize_rows(w))


class Int8Linear(nn.Module):
    """``nn.Linear`` with int8 per-channel weights and dynamically quantized activations (CPU)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self._pack(linear.weight, linear.bias)

    @classmethod
    def from_weights(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> "Int8Linear":
        """From an fp32 weight, or one already quantized by `quantize_weight` (int8 loading)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._pack(weight, bias)
        return self

    def _pack(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        engine = _quantized_engine()
        if torch.backends.quantized.engine != engine:
            torch.backends.quantized.engine = engine
        qweight = weight if weight.dtype == torch.qint8 else quantize_weight(weight)
        self.out_features, self.in_features = qweight.shape
        bias = None if bias is None else bias.detach().float().cpu()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._packed = torch.ops.quantized.linear_prepack(qweight, bias)
        # fbgemm multiplies int8 weights by uint8 activations in int16 pairs; 7-bit
        # activations (reduce_range) keep those sums from saturating, as torch does.
        self._reduce_range = engine in ("x86", "fbgemm")
        self.weight_bytes = qweight.numel() + 4 * self.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            raise TypeError(f"Int8Linear takes float32 activations, got {x.dtype}")
        shape = x.shape
        y = torch.ops.quantized.linear_dynamic(x.reshape(-1, shape[-1]).contiguous(), self._packed, self._reduce_range)
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


class Int8Embedding(nn.Module):
    """``nn.Embedding`` served from int8 rows with one fp32 scale per row; only the rows looked up are dequantized.

    GPT-2's token embedding is tied to its output head, and the head's per-output-channel
    int8 weight is a per-row quantization of that same ``[V, C]`` matrix: this table is
    those int8 values. fbgemm's packed copy of the head cannot be indexed, so the table
    sits beside it (GPT-2: 38.6 MB, against 154 MB for the fp32 embedding it replaces).
    A lookup equals the dequantized row of the int8 head.
    """

    def __init__(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        if q.dtype != torch.int8 or scale.shape != q.shape[:1]:
            raise ValueError("Int8Embedding takes int8 rows [V, C] and one scale per row [V]")
        self.num_embeddings, self.embedding_dim = q.shape
        # plain attributes, as Int8Linear's packed weight: serving state, not parameters, never saved or trained
        self.q, self.scale = q, scale.float()
        self.weight_bytes = q.numel() + 4 * self.num_embeddings

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.q[idx].float().mul_(self.scale[idx].unsqueeze(-1))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per-row"


def _serve_int8(model: nn.Module, embedding: tuple[torch.Tensor, torch.Tensor],
                quantized: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Put int8 layers in place: the token embedding and the tied head from ``embedding`` (one int8
    quantization of their shared matrix), every other Linear from its entry in ``quantized``
    (popped: int8 values and per-row scales) or, without one, from its fp32 weight."""
    q, scale = embedding
    model.lm_head = Int8Linear.from_weights(per_channel(q, scale), None)
    model.transformer.wte = Int8Embedding(q, scale)
    for name, linear in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]:
        weights = quantized.pop(name + ".weight", None)
        int8 = Int8Linear(linear) if weights is None else Int8Linear.from_weights(per_channel(*weights), linear.bias)
        _swap(model, name, int8)
    model.quantized = "int8"  # for /status and the benchmark table


@torch.no_grad()
def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` in `model` by `Int8Linear`; returns `model` (eval mode, CPU)."""
    _check_quantizable(model)
    if model.lm_head.weight is not model.transformer.wte.weight:
        raise ValueError("int8 serving expects the output head tied to the token embedding (GPT-2's layout)")
    _serve_int8(model, quantize_rows(model.transformer.wte.weight), {})
    return model


def _check_quantizable(model: nn.Module) -> None:
    if model.device.type != "cpu":
        raise ValueError("int8 weights are a CPU serving option; move the model to the CPU first")
    if model.dtype != torch.float32:
        raise ValueError("quantize from fp32 weights")
    model.eval()


def _swap(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


class Int8Loader:
    """Loads a model's weights straight into int8, one tensor at a time (no fp32 copy of the model).

    Pass it as ``transform`` to the checkpoint readers (`chatcore.hf.load_any`): each block
    weight, and the token embedding (in blocks of rows, each block's file pages handed back
    once read), is quantized as soon as it is read and its fp32 tensor dropped, leaving a
    4-byte stand-in in the state dict; `finish(model)` then puts `Int8Linear` layers and
    an `Int8Embedding` in their place. The output head is tied to the embedding: it is
    packed from the embedding's int8 rows.
    """

    EMBEDDING = "transformer.wte.weight"

    def __init__(self) -> None:
        self.quantized: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name: (int8 values, per-row scales)
        self.nonfinite: list[str] = []  # weights read with NaN or infinite values

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        block = tensor.dim() == 2 and name.startswith("transformer.h.") and name.endswith(".weight")
        if not block and name != self.EMBEDDING:
            return tensor  # the position embedding, LayerNorms and biases stay as they are
        q, scale = self.quantized[name] = quantize_rows(tensor, release_read_pages)
        if not bool(torch.isfinite(scale).all()):  # a row's NaN/inf shows in its scale
            self.nonfinite.append(name)  # the serving check can no longer see it once it is int8
        return torch.zeros((), dtype=tensor.dtype).expand(tensor.shape)  # shape only; finish() replaces it

    @torch.no_grad()
    def finish(self, model: nn.Module, source: str = "checkpoint") -> nn.Module:
        """Swap every Linear of `model` for `Int8Linear` and its token embedding for `Int8Embedding`,
        using the weights quantized while loading (those it did not see, e.g. a ``.bin`` file's or a
        merged adapter's, are quantized here)."""
        if self.nonfinite:
            raise CheckpointError(f"{source}: {self.nonfinite[0]} holds NaN or infinite values: it cannot serve")
        _check_quantizable(model)
        embedding = self.quantized.pop(self.EMBEDDING, None)
        if embedding is None:
            if not all_finite(model.transformer.wte.weight):
                raise CheckpointError(f"{source}: {self.EMBEDDING} holds NaN or infinite values: it cannot serve")
            embedding = quantize_rows(model.transformer.wte.weight)
        _serve_int8(model, embedding, self.quantized)
        if self.quantized:
            raise ValueError(f"weights quantized while loading have no Linear layer: {sorted(self.quantized)[:3]}")
        return model


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (Int8Linear, Int8Embedding)) for m in model.modules())


@dataclass
class Quality:
    """How a candidate model compares with a reference on the same tokens."""

    tokens: int  # predicted positions compared
    reference_ppl: float
    candidate_ppl: float
    top1_agreement: float  # fraction of positions where both models' argmax agree

    @property
    def ppl_change(self) -> float:
        """Relative perplexity change (0.01 = 1% worse)."""
        return self.candidate_ppl / self.reference_ppl - 1.0


@torch.no_grad()
def quality(reference: nn.Module, candidate: nn.Module, documents: Iterable[Sequence[int]], block_size: int | None = None) -> Quality:
    """Teacher-forced perplexity of both models and their greedy-token agreement on `documents` (token ids)."""
    n = 0
    nll_ref = nll_cand = 0.0
    agree = 0
    for doc in documents:
        ids = torch.as_tensor(list(doc), dtype=torch.long)
        size = block_size or reference.config.block_size
        for start in range(0, max(len(ids) - 1, 0), size):
            chunk = ids[start : start + size + 1]
            if len(chunk) < 2:
                break
            x, y = chunk[None, :-1], chunk[1:]
            lr, _ = reference(x)
            lc, _ = candidate(x)
            lr, lc = lr[0].float(), lc[0].float()
            nll_ref += F.cross_entropy(lr, y, reduction="sum").item()
            nll_cand += F.cross_entropy(lc, y, reduction="sum").item()
            agree += int((lr.argmax(-1) == lc.argmax(-1)).sum())
            n += len(y)
    if n == 0:
        raise ValueError("no document has two tokens or more")
    return Quality(n, math.exp(nll_ref / n), math.exp(nll_cand / n), agree / n)
