"""int8 weights for CPU serving, and the check that they still speak like fp32.

`quantize_int8(model)` swaps every ``nn.Linear`` of a `chatcore.model.GPT`
(the output head included) for `Int8Linear`: weights stored as int8 with one
scale per output channel (symmetric), activations quantized per call (torch's
dynamic quantization kernels: fbgemm/x86 on Intel and AMD, qnnpack on ARM).
Decoding one token is bound by reading the weights, so a quarter of the bytes
and kernels that use every core make it several times faster than fp32.
Embeddings and LayerNorms stay fp32; the embedding keeps the fp32 copy of the
tied output head.

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

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from .checkpoint import CheckpointError


def _quantized_engine() -> str:
    supported = torch.backends.quantized.supported_engines
    for name in ("x86", "fbgemm", "qnnpack"):
        if name in supported:
            return name
    raise RuntimeError(f"this torch build has no int8 CPU kernels (quantized engines: {supported}); serve fp32 instead")


def quantize_weight(w: torch.Tensor) -> torch.Tensor:
    """An fp32 ``[out, in]`` weight as int8 with one symmetric scale per output channel (a torch.qint8 tensor)."""
    w = w.detach().float().cpu().contiguous()
    # max(amax, -amin): no temporary as large as the weight (the 154 MB output head of GPT-2); one pass over it
    lo, hi = torch.aminmax(w, dim=1)
    amax = torch.maximum(hi, lo.neg())
    scale = (amax / 127.0).clamp(min=1e-12)
    with warnings.catch_warnings():  # torch marks its quantized-tensor constructors deprecated; the kernels remain
        warnings.simplefilter("ignore")
        return torch.quantize_per_channel(
            w, scale.double(), torch.zeros(len(scale), dtype=torch.long), axis=0, dtype=torch.qint8
        )


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


@torch.no_grad()
def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` in `model` by `Int8Linear`; returns `model` (eval mode, CPU)."""
    _check_quantizable(model)
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for name, linear in targets:
        _swap(model, name, Int8Linear(linear))
    model.quantized = "int8"  # for /status and the benchmark table
    return model


def _check_quantizable(model: nn.Module) -> None:
    if next(model.parameters()).device.type != "cpu":
        raise ValueError("int8 weights are a CPU serving option; move the model to the CPU first")
    if next(model.parameters()).dtype != torch.float32:
        raise ValueError("quantize from fp32 weights")
    model.eval()


def _swap(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


class Int8Loader:
    """Loads a model's Linear weights straight into int8, one tensor at a time (no fp32 copy of the model).

    Pass it as ``transform`` to the checkpoint readers (`chatcore.hf.load_any`): each block
    weight is quantized as soon as it is read and its fp32 tensor dropped, leaving a
    4-byte stand-in in the state dict; `finish(model)` then puts `Int8Linear` layers in
    their place. The output head is quantized from the (fp32) embedding it is tied to.
    """

    def __init__(self) -> None:
        self.quantized: dict[str, torch.Tensor] = {}
        self.nonfinite: list[str] = []  # weights read with NaN or infinite values

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dim() != 2 or not name.startswith("transformer.h.") or not name.endswith(".weight"):
            return tensor  # embeddings, LayerNorms and biases stay as they are
        q = self.quantized[name] = quantize_weight(tensor)
        if not bool(torch.isfinite(q.q_per_channel_scales()).all()):  # a row's NaN/inf shows in its scale
            self.nonfinite.append(name)  # the serving check can no longer see it once it is int8
        return torch.zeros((), dtype=tensor.dtype).expand(tensor.shape)  # shape only; finish() replaces it

    @torch.no_grad()
    def finish(self, model: nn.Module, source: str = "checkpoint") -> nn.Module:
        """Swap every Linear of `model` for `Int8Linear`, using the weights quantized while loading."""
        if self.nonfinite:
            raise CheckpointError(f"{source}: {self.nonfinite[0]} holds NaN or infinite values: it cannot serve")
        _check_quantizable(model)
        for name, linear in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]:
            q = self.quantized.pop(name + ".weight", None)
            _swap(model, name, Int8Linear(linear) if q is None else Int8Linear.from_weights(q, linear.bias))
        if self.quantized:
            raise ValueError(f"weights quantized while loading have no Linear layer: {sorted(self.quantized)[:3]}")
        model.quantized = "int8"
        return model


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, Int8Linear) for m in model.modules())


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
