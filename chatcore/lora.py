"""LoRA: low-rank adapters on the GPT's projections: train, merge, save, load, and serve many at once.

Plain PyTorch, not ``peft``: peft 0.21 requires ``transformers`` and
``accelerate`` at runtime, and transformers is only a dev extra of chatcore;
the whole method is ~one class here.

A target ``nn.Linear`` (``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``,
``mlp.c_proj`` by default) becomes a `LoRALinear`: the same ``weight`` and
``bias`` (shared, frozen), plus

    y = x W^T + b + (alpha / rank) * dropout(x) A^T B^T     A: [rank, in], B: [out, rank]

B starts at zero, so a fresh adapter changes nothing. ``layers: N`` puts adapters in
the last N transformer blocks only: the backward then stops below the lowest
adapted block (nothing under it needs a gradient): on GPT-2 small, the last 4 of 12
blocks train at 2.41x full fine-tuning's tokens/s, every block at 1.56x (2 threads,
idle; one thread: 2.5-2.9x and 1.8-2.0x; benchmarks/training.py). `merge` folds the update into the weight
(``W + (alpha/rank) B A``) and gives back plain ``nn.Linear``s.

An adapter file is ``NAME.safetensors`` holding only the ``*.lora_A`` /
``*.lora_B`` tensors, its metadata (``format: chatcore-lora/1``, the LoRA
options, the GPT config, and the provenance naming its ``base_model`` and the
base's fingerprint) in the safetensors header and a JSON sidecar, like a
native checkpoint (`chatcore.checkpoint`).

Serving many adapters in one batch: `attach` loads an adapter's tensors into
every target layer under a key (no parameters, the model's state dict is
unchanged); `route(model, groups)` says, for the next forward, which batch rows
use which key. The base matmul runs once for the whole batch; the rows with an
adapter then add their own adapter's low-rank update, all of them in one pair of
batched matmuls per layer over per-row stacked A and B (stacked again only when the
batch's mix of adapters changes).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .checkpoint import CheckpointError, atomic_write, sidecar_path
from .model import GPT

FORMAT = "chatcore-lora/1"
_META_KEY = "chatcore"
TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    # 0 as in peft: dropout on the adapter's input costs a mask the size of every target's input
    # (10-15% of a GPT-2 LoRA step on the CPU, benchmarks/training.py), and the model's own dropout
    # (training.dropout) still regularises.
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(TARGETS))
    layers: int | None = None  # adapters in the last N transformer blocks only; None (or N >= blocks): all

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "LoRAConfig":
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown lora option(s): {', '.join(sorted(unknown))}")
        cfg = cls(**d)
        if cfg.rank < 1:
            raise ValueError("training.lora.rank must be at least 1")
        if not 0 <= cfg.dropout < 1:
            raise ValueError("training.lora.dropout must lie in [0, 1)")
        bad = set(cfg.targets) - set(TARGETS)
        if bad or not cfg.targets:
            raise ValueError(f"training.lora.targets must be some of {', '.join(TARGETS)}; got {cfg.targets}")
        if cfg.layers is not None and (isinstance(cfg.layers, bool) or not isinstance(cfg.layers, int)
                                       or cfg.layers < 1):
            raise ValueError(f"training.lora.layers must be a whole number of at least 1 (the last N transformer "
                             f"blocks get adapters) or null for all of them; got {cfg.layers!r}")
        return cfg

    def blocks(self, n_layer: int) -> range:
        """The transformer blocks that get adapters in a model of `n_layer` blocks: the last `layers`, or
        all of them (a model with fewer blocks, e.g. the 3-block starter, is adapted whole, not refused)."""
        return range(n_layer - min(self.layers or n_layer, n_layer), n_layer)


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` (same weight and bias tensors) plus a trainable low-rank update and served adapters."""

    def __init__(self, base: nn.Linear, cfg: LoRAConfig | None = None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # shared: state-dict keys stay the base's
        self.lora_A: nn.Parameter | None = None
        self.lora_B: nn.Parameter | None = None
        self.scale = 0.0
        self.lora_dropout = 0.0
        self.served: dict[Any, tuple[torch.Tensor, torch.Tensor, float]] = {}  # key -> (A, B, scale)
        # for the next forward (set by `route`): the batch rows with an adapter here, and each one's key
        self.rows: torch.Tensor | slice | None = None
        self.row_keys: tuple = ()
        self._stacked: tuple | None = None  # (row_keys, A^T [n, in, r], scale * B^T [n, r, out]) of the last mix
        if cfg is not None:
            w = base.weight
            self.lora_A = nn.Parameter(torch.empty(cfg.rank, self.in_features, device=w.device, dtype=w.dtype))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear (and peft) initialise A
            self.lora_B = nn.Parameter(torch.zeros(self.out_features, cfg.rank, device=w.device, dtype=w.dtype))
            self.scale = cfg.scale
            self.lora_dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lora_A is None:
            y = super().forward(x)
        else:
            # On 2-D views, the update added in place by the matmul's own accumulate with the scale
            # as its alpha: no output-sized multiply, sum or copy, forward or backward (the base
            # weight is frozen, so its matmul saves only what the input's gradient needs).
            x2 = x.reshape(-1, self.in_features)
            h = nn.functional.dropout(x2, self.lora_dropout, self.training) if self.lora_dropout else x2
            y = nn.functional.linear(x2, self.weight, self.bias)
            y = _Update.apply(y, h, self.lora_A, self.lora_B, self.scale).view(*x.shape[:-1], self.out_features)
        if self.rows is not None:
            self._add_served(x, y)
        return y

    def _add_served(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Each routed batch row adds its own adapter's update: one bmm pair for all of them, not a loop."""
        if self._stacked is None or self._stacked[0] != self.row_keys:
            # stacked once per mix of adapters (a decode run keeps it), the scale folded into B
            r = max(self.served[k][0].shape[0] for k in self.row_keys)  # lower ranks padded with zeros
            at = x.new_zeros(len(self.row_keys), self.in_features, r)
            bt = x.new_zeros(len(self.row_keys), r, self.out_features)
            for i, k in enumerate(self.row_keys):
                a, b, s = self.served[k]
                at[i, :, : a.shape[0]] = a.t()
                bt[i, : a.shape[0]] = b.t() * s
            self._stacked = (self.row_keys, at, bt)
        _, at, bt = self._stacked
        x, y = x.reshape(x.shape[0], -1, self.in_features), y.view(y.shape[0], -1, self.out_features)  # [rows, T, .]
        with _one_thread():
            if isinstance(self.rows, slice):  # the batch's first rows, in order: added in place, no gather
                y[self.rows].baddbmm_(torch.bmm(x[self.rows], at), bt)
            else:
                y.index_add_(0, self.rows, torch.bmm(torch.bmm(x.index_select(0, self.rows), at), bt))


@contextmanager
def _one_thread():
    """Rank-r products are microseconds of work: run them on one thread. Sent to the thread pool, each
    waits for every worker to be scheduled, which on a busy machine costs more than a base matmul."""
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if threads > 1:
            torch.set_num_threads(threads)


class _Update(torch.autograd.Function):
    """``y += scale * (h A^T) B^T`` in place (the matmul's own accumulate, the scale as its alpha), and its
    gradients: no output-sized multiply, sum or copy, and every rank-r product on one thread."""

    @staticmethod
    def forward(ctx, y, h, a, b, scale):
        with _one_thread():
            ha = h @ a.t()
            y.addmm_(ha, b.t(), alpha=scale)
        ctx.mark_dirty(y)
        ctx.save_for_backward(h, a, b, ha)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, g):
        h, a, b, ha = ctx.saved_tensors
        with _one_thread():
            g_ha = (g @ b).mul_(ctx.scale)  # [N, r]
            g_h = g_ha @ a if ctx.needs_input_grad[1] else None
            g_a = g_ha.t() @ h if ctx.needs_input_grad[2] else None
            g_b = torch.mm(g.t(), ha).mul_(ctx.scale) if ctx.needs_input_grad[3] else None
        return g, g_h, g_a, g_b, None


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            yield name, m


def _wrap(model: nn.Module, names: Sequence[str], cfg: LoRAConfig | None) -> None:
    """Make each named ``nn.Linear`` a `LoRALinear` (with a fresh trainable adapter when `cfg` is given)."""
    for name in names:
        m = model.get_submodule(name)
        if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, LoRALinear(m, cfg))


def target_names(model: GPT, cfg: LoRAConfig) -> list[str]:
    """The layers that get an adapter: the targets in the adapted blocks (`LoRAConfig.blocks`)."""
    prefixes = tuple(f"transformer.h.{i}." for i in cfg.blocks(model.config.n_layer))
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.startswith(prefixes) and name.endswith(tuple(cfg.targets))]


def apply_lora(model: GPT, cfg: LoRAConfig) -> list[nn.Parameter]:
    """Freeze `model` and add a trainable adapter to the target layers; returns its parameters."""
    names = target_names(model, cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    _wrap(model, names, cfg)
    params = [p for _, m in lora_layers(model) for p in (m.lora_A, m.lora_B) if p is not None]
    if not params:
        raise ValueError(f"no layer of the model matches the LoRA targets {cfg.targets}")
    return params


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained adapter alone: ``{layer}.lora_A`` / ``{layer}.lora_B``, detached, on the CPU."""
    out = {}
    for name, m in lora_layers(model):
        if m.lora_A is not None:
            out[f"{name}.lora_A"] = m.lora_A.detach().to("cpu").contiguous()
            out[f"{name}.lora_B"] = m.lora_B.detach().to("cpu").contiguous()
    return out


@torch.no_grad()
def merge(model: GPT) -> GPT:
    """Fold every trained adapter into its weight (``W + scale * B A``); plain ``nn.Linear``s again."""
    for name, m in list(lora_layers(model)):
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        lin.weight, lin.bias = m.weight, m.bias
        if m.lora_A is not None:
            lin.weight.add_((m.lora_B @ m.lora_A).to(m.weight.dtype), alpha=m.scale)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, lin)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def fingerprint(model: GPT) -> str:
    """A short hash of the base weights an adapter was trained on (a few rows of each layer)."""
    h = hashlib.sha256(json.dumps(asdict(model.config), sort_keys=True).encode())
    for k, v in model.state_dict().items():
        if k.startswith("transformer.") and ".lora_" not in k:
            h.update(k.encode())
            h.update(v.detach().reshape(-1)[:64].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# --- files ----------------------------------------------------------------------------


@dataclass
class LoRAAdapter:
    """An adapter read from disk: its tensors, its LoRA options and its metadata."""

    state: dict[str, torch.Tensor]
    config: LoRAConfig
    meta: dict[str, Any]

    @property
    def base_model(self) -> str | None:
        return (self.meta.get("provenance") or {}).get("base_model")

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state.values())


def save_adapter(model: GPT, path: str | Path, cfg: LoRAConfig, *, base_model: str, **provenance: Any) -> Path:
    """Write the adapter of `model` (tensors + metadata naming its base), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = lora_state_dict(model)
    if not state:
        raise ValueError("the model has no trained LoRA adapter to save")
    prov = dict(base_model=base_model, base_fingerprint=fingerprint(model),
                created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), **provenance)
    meta = {"format": FORMAT, "lora": asdict(cfg), "config": asdict(model.config), "provenance": prov}
    meta_json = json.dumps(meta, indent=2, sort_keys=True, default=str)
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata={_META_KEY: meta_json}))
    atomic_write(sidecar_path(path), lambda tmp: tmp.write_text(meta_json + "\n", encoding="utf-8"))
    return path


def is_adapter(path: str | Path) -> bool:
    """Whether `path` is a chatcore LoRA adapter file (not a full checkpoint)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(_META_KEY)
        meta = json.loads(raw) if raw is not None else None
        # any other JSON (a list, a string) is not ours: the checkpoint loader says what is wrong with it
        return isinstance(meta, dict) and meta.get("format") == FORMAT
    except (SafetensorError, OSError, ValueError, RecursionError):
        return False


def load_adapter(path: str | Path) -> LoRAAdapter:
    """Read an adapter file; CheckpointError when it is not one or is damaged."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(_META_KEY) or "{}")
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable LoRA adapter: {e}") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a chatcore LoRA adapter (format {meta.get('format')!r})")
    try:
        cfg = LoRAConfig.from_dict(meta.get("lora"))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad LoRA options: {e}") from e
    for k, t in state.items():
        if not (k.endswith(".lora_A") or k.endswith(".lora_B")) or t.dim() != 2:
            raise CheckpointError(f"{path}: unexpected tensor {k!r}")
    meta["source"] = str(path)
    return LoRAAdapter(state, cfg, meta)


def _pairs(model: nn.Module, adapter: LoRAAdapter) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer name: (A, B)}, checked against the model's layer shapes."""
    layers = dict(model.named_modules())
    pairs = {}
    for k in adapter.state:
        if not k.endswith(".lora_A"):
            continue
        name = k[: -len(".lora_A")]
        a, b = adapter.state[k], adapter.state.get(f"{name}.lora_B")
        m = layers.get(name)
        if b is None or not isinstance(m, nn.Linear) or not name.startswith("transformer.h.") \
                or not name.endswith(tuple(adapter.config.targets)) or a.shape[1] != m.in_features \
                or b.shape[0] != m.out_features or a.shape[0] != b.shape[1]:
            raise CheckpointError(f"{adapter.meta.get('source')}: adapter layer {name!r} does not fit this model")
        pairs[name] = (a, b)
    return pairs


def check_base(model: GPT, adapter: LoRAAdapter) -> None:
    """CheckpointError unless `model` is the base the adapter was trained on."""
    want = (adapter.meta.get("provenance") or {}).get("base_fingerprint")
    if want and want != fingerprint(model):
        raise CheckpointError(f"{adapter.meta.get('source')} was trained on another base than "
                              f"{adapter.base_model!r} as loaded now (fingerprint differs)")


@torch.no_grad()
def merge_adapter(model: GPT, adapter: LoRAAdapter) -> GPT:
    """Fold a saved adapter into `model`'s weights (the base it was trained on)."""
    check_base(model, adapter)
    layers = dict(model.named_modules())
    for name, (a, b) in _pairs(model, adapter).items():
        w = layers[name].weight
        w.add_((b.to(w.device, torch.float32) @ a.to(w.device, torch.float32)).to(w.dtype), alpha=adapter.config.scale)
    return model


def attach(model: GPT, key: Any, adapter: LoRAAdapter) -> None:
    """Serve `adapter` under `key` (unmerged; rows pick it with `route`)."""
    pairs = _pairs(model, adapter)
    _wrap(model, list(pairs), None)  # only the layers the file has tensors for (`layers: N`: the top blocks)
    dev, dt = model.device, model.dtype
    layers = dict(lora_layers(model))
    for name, (a, b) in pairs.items():
        layers[name].served[key] = (a.to(dev, dt), b.to(dev, dt), adapter.config.scale)
        layers[name]._stacked = None  # a key attached again may hold other tensors


def detach(model: nn.Module, key: Any) -> None:
    for _, m in lora_layers(model):
        m.served.pop(key, None)
        m._stacked = None


@contextmanager
def route(model: nn.Module, groups: Sequence[tuple[Any, Sequence[int] | torch.Tensor]]):
    """For forwards inside the block, batch ``rows`` of each ``(key, rows)`` add that adapter's update."""
    layers = [m for _, m in lora_layers(model)]
    dev = next(model.parameters()).device
    key_of = {int(r): k for k, rows in groups if k is not None for r in torch.as_tensor(rows).tolist()}
    plans: dict[frozenset, tuple] = {}  # layers serving the same adapters share one plan
    try:
        for m in layers:
            mine = frozenset(k for k in set(key_of.values()) if k in m.served)
            if mine not in plans:
                rows = sorted(r for r, k in key_of.items() if k in mine)
                every = rows == list(range(len(rows)))  # rows 0..n-1: a slice (no gather) if the batch has n rows
                plans[mine] = (slice(0, len(rows)) if every else torch.tensor(rows, dtype=torch.long, device=dev),
                               tuple(key_of[r] for r in rows))
            m.rows, m.row_keys = plans[mine] if mine else (None, ())
        yield
    finally:
        for m in layers:
            m.rows, m.row_keys = None, ()


class AdapterPool:
    """The adapters a serving model holds: loaded lazily, kept within a memory budget (least recently used
    first out, never one in use), replaced in a slot (a scope) when a new version is promoted there.

    A key is ``(file, mtime_ns)``: a promoted file is a new key, so a prefix-cache namespace
    or a batch row never mixes versions. Used by one thread (the batch worker)."""

    def __init__(self, model: GPT, budget_bytes: int = 64 * 2**20, on_unload: Any = None) -> None:
        self.model = model
        self.budget_bytes = budget_bytes
        self.on_unload = on_unload  # called with a key whose adapter left the model (flush its prefixes)
        self.loaded: dict[Any, int] = {}  # key -> bytes, least recently used first
        self.pins: dict[Any, int] = {}
        self.slots: dict[str, Any] = {}  # slot (scope) -> its current key
        self.superseded: set[Any] = set()  # replaced in their slot while in use: unloaded when released
        self.loads = 0

    def acquire(self, path: str | Path, slot: str | None = None) -> Any:
        """Attach the adapter in `path` if needed and pin it; returns its key. CheckpointError if unusable."""
        p = Path(path)
        try:
            key = (str(p.resolve()), p.stat().st_mtime_ns)
        except OSError as e:
            raise CheckpointError(f"adapter {path} is not readable: {e}") from e
        if key in self.loaded:
            self.loaded[key] = self.loaded.pop(key)  # most recently used
        else:
            adapter = load_adapter(p)
            check_base(self.model, adapter)
            size = adapter.nbytes()
            for old in [k for k in self.loaded if not self.pins.get(k)]:
                if sum(self.loaded.values()) + size <= self.budget_bytes:
                    break
                self._unload(old)
            attach(self.model, key, adapter)
            self.loaded[key] = size
            self.loads += 1
        self.pins[key] = self.pins.get(key, 0) + 1
        if slot is not None:
            old = self.slots.get(slot)
            self.slots[slot] = key
            if old is not None and old != key:  # the scope's adapter changed: its old version and prefixes go
                if self.pins.get(old):
                    self.superseded.add(old)
                else:
                    self._unload(old)
        return key

    def release(self, key: Any) -> None:
        self.pins[key] -= 1
        if not self.pins[key]:
            del self.pins[key]
            if key in self.superseded:
                self.superseded.discard(key)
                self._unload(key)

    def _unload(self, key: Any) -> None:
        detach(self.model, key)
        self.loaded.pop(key, None)
        if self.on_unload is not None:
            self.on_unload(key)
