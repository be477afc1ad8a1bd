"""fp32 Linear layers in oneDNN's packed layout, for serving on a CPU.

torch 2.13 runs an fp32 matrix-vector product (decoding one token) on one core
however many threads it has, and its small-batch fp32 matrix products (a batch
of 8 conversations, a speculative check of k tokens) stream the weights at a
fraction of the memory bandwidth. oneDNN's inner product, given the weight
already reordered into the blocked layout it computes from
(``torch.ops.mkldnn._reorder_linear_weight``), splits those products over every
thread. `pack_linears(model)` swaps a GPT's block matrices for `PackedLinear`s
doing exactly that; the same values, so greedy tokens stay those of the plain
model (up to float rounding: the sums run in another order).

A load-time transform for serving, like `chatcore.quant` (``model.cpu_layout``,
decided in `chatcore.weights.build_engine`; ``auto`` packs where it measured
faster: `packed_by_default`): applied after the weights are
loaded and laid out (`chatcore.engine.prepare_for_inference`), never trained.
Each packed matrix replaces its dense copy, so the model takes no more memory.
The output head stays a plain ``nn.Linear`` by default: it is tied to the token
embedding, whose lookups need the dense matrix, so packing it would hold the
largest matrix twice (``head=True`` does, for measuring).

Composition:

- LoRA serving (`chatcore.lora`): a `PackedLinear` *is* a `lora.LoRALinear`
  with no trainable adapter, so `lora.attach` / `lora.route` add served
  adapters to its rows exactly as they do to a plain layer; `state_dict()`
  gives the dense weights back (an adapter's base check reads them).
- the KV cache, continuous batching, speculative decoding and hot swap see the
  same ``forward_cached``; a hot-swapped engine is built (and packed) in full
  before it serves.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .checkpoint import release_free_heap
from .lora import LoRALinear

LAYOUTS = ("auto", "packed", "plain")

BATCH_HINT = 8
"""The batch oneDNN picks its blocked layout for: serving's default ``max_batch``. Measured on a 2-vCPU
AVX-512 Xeon, one thread, GPT-2 124M block matrices: packed for 8 rows, a decode step of 8
conversations ran 1.42x faster than torch's layout; packed with no hint or for 1 row, 0.97-0.98x."""


def available() -> bool:
    """Whether this torch build has oneDNN's CPU kernels."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def packed_here(layout: str | None, device: torch.device, dtype: torch.dtype, quantized: bool = False) -> bool:
    """Whether to serve fp32 weights packed: ``auto`` on a CPU in float32 where it measured faster
    (`packed_by_default`), ``packed`` insists (an error on another device or dtype), ``plain``
    (or null) never.

    int8 weights (`chatcore.quant`, the CPU default) hold their own layout: there is no
    float32 matrix to pack, whatever the setting."""
    if layout not in (None, *LAYOUTS):
        raise ValueError(f"model.cpu_layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
    if layout in (None, "plain"):
        return False
    applies = device.type == "cpu" and dtype == torch.float32
    if layout == "packed" and not applies:
        raise ValueError(f"model.cpu_layout: packed applies to float32 weights on the CPU, not on {device} in {dtype}")
    if layout == "packed" and not available():
        raise ValueError("model.cpu_layout: packed needs a torch build with oneDNN (torch.backends.mkldnn)")
    return applies and not quantized and available() and (layout == "packed" or packed_by_default())


def packed_by_default() -> bool:
    """Where ``auto`` packs: AMD CPUs, where it was measured faster; elsewhere torch's layout.

    torch's fp32 matrix-vector product (one conversation's decode step) is MKL's. On a
    2-core AMD EPYC (Zen 3, AVX2) it ran on one core (24-28 tokens/s against CTranslate2's
    46-49) and a packed prototype there gave the same tokens 1.1-1.8x faster. On a
    2-vCPU Intel Xeon (AVX-512) MKL's product beat oneDNN's: packed decoded one
    conversation at 0.59-0.66x (served, a loaded machine; 0.80-0.84x on one thread),
    while 8 conversations decoded 1.42x faster (one thread). Other CPUs: not measured."""
    return _cpu_vendor() == "AuthenticAMD"


def _cpu_vendor() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.partition(":")[2].strip()
    except OSError:  # not Linux
        pass
    return None


class PackedLinear(LoRALinear):
    """``nn.Linear`` computed by oneDNN from a weight packed once into its blocked layout (CPU, fp32).

    Holds the packed weight only (the dense ``weight`` is gone; `state_dict` rebuilds it).
    As a `LoRALinear` with no adapter of its own, it adds served adapters to routed rows."""

    def __init__(self, linear: nn.Linear, batch_size: int | None = None) -> None:
        super().__init__(linear)  # in/out features, the bias, and the served-adapter state
        weight = linear.weight.detach()
        if weight.device.type != "cpu" or weight.dtype != torch.float32:
            raise ValueError(f"PackedLinear packs float32 CPU weights, not {weight.dtype} on {weight.device}")
        # the batch size only steers which blocked layout oneDNN picks; any batch computes with it
        self.batch_size = batch_size
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), batch_size)
        self.register_parameter("weight", None)  # the packed copy replaces it: no second copy of the matrix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("PackedLinear serves only: oneDNN's packed product has no backward")
        y = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        if self.rows is not None:  # served LoRA adapters (chatcore.lora.route)
            self._add_served(x, y)
        return y

    def dense_weight(self) -> torch.Tensor:
        """The weight as a plain ``[out, in]`` tensor (a new copy)."""
        return self.packed.to_dense()

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        # the plain layer's keys, values and order (an adapter's base fingerprint hashes them in order)
        destination[prefix + "weight"] = self.dense_weight()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def __deepcopy__(self, memo):
        # an opaque oneDNN tensor has no storage to copy: repack from the dense values
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        plain.weight = nn.Parameter(self.dense_weight(), requires_grad=False)
        plain.bias = None if self.bias is None else nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        new = PackedLinear(plain, self.batch_size)
        new.served = copy.deepcopy(self.served, memo)
        memo[id(self)] = new
        return new

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, oneDNN packed"


@torch.no_grad()
def pack_linears(model: nn.Module, batch_size: int | None = BATCH_HINT, head: bool = False) -> nn.Module:
    """Replace, in place, the block ``nn.Linear``s of `model` (and the output head with `head`) by
    `PackedLinear`; returns `model`. Served adapters already attached are kept."""
    if next(model.parameters()).device.type != "cpu" or next(model.parameters()).dtype != torch.float32:
        raise ValueError("pack_linears: the model must be float32 on the CPU")
    if not available():
        raise RuntimeError("this torch build has no oneDNN CPU kernels; serve the plain layout")
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, PackedLinear)
             and (name.startswith("transformer.h.") or (head and name == "lm_head"))]
    for name in names:  # by name, one at a time: each dense matrix is freed as soon as its packed copy exists
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        module = getattr(owner, attr)
        if isinstance(module, LoRALinear) and module.lora_A is not None:
            raise ValueError(f"{name} trains an adapter: merge it first (chatcore.lora.merge)")
        packed = PackedLinear(module, batch_size)
        if isinstance(module, LoRALinear):
            packed.served = module.served
        setattr(owner, attr, packed)
        del module, packed
        # the dense matrix and its row-major copy are freed as each packed one (a differently sized, aligned
        # block) is made; glibc keeps such holes mapped: without this the process peaked ~130 MB above plain
        # loading (GPT-2 124M) and kept ~150 MB it never used
        release_free_heap()
    model.cpu_layout = "packed"  # for /status and the benchmark table
    return model


def is_packed(model: nn.Module) -> bool:
    return any(isinstance(m, PackedLinear) for m in model.modules())
