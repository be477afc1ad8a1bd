"""Save and load model weights without ever running code from a file.

Native format: ``NAME.safetensors`` (the weights, nanoGPT's state-dict keys,
``lm_head.weight`` left out because it is ``transformer.wte.weight``) plus the
sidecar ``NAME.json``::

    {"format": "chatcore-checkpoint/1",
     "config": {GPTConfig fields},
     "provenance": {"base_model", "iteration", "train_loss", "val_loss",
                    "data_hash", "created_at", ...}}

The same JSON is stored in the safetensors header (``__metadata__["chatcore"]``),
so the weights file alone is complete and consistent even if the sidecar is
stale or lost; the sidecar is for people and tools. Each file is written to a
temporary name in the same directory and moved into place with ``os.replace``:
a reader sees the old file or the new one, never half of one.

Also read, safely:

- the seed's plain state dict (``models/gpt2_nano.pt``): config inferred from the
  tensor shapes, heads of 64 dimensions unless told otherwise;
- the seed's fine-tune dict ``{'model_state_dict', 'config', 'iter',
  'train_loss', 'val_loss'}`` whose ``config`` is a pickled ``model.GPTConfig``;
- nanoGPT's ``ckpt.pt`` (``{'model', 'model_args', 'iter_num', ...}``).

``.pt`` files go through ``torch.load(weights_only=True)``. The only class it is
allowed to build beyond tensors and containers is the name ``model.GPTConfig``,
mapped to an inert stand-in whose field values are then type-checked: a file
asking for anything else (``os.system``, ...) is refused with CheckpointError.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import math
import mmap
import os
import pickle
import threading
import uuid
from dataclasses import asdict, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .model import GPT, GPTConfig
from .tokenizer import N_VOCAB  # the ids a serving model must cover, end-of-text included

FORMAT = "chatcore-checkpoint/1"
_META_KEY = "chatcore"

ColumnMajor = Callable[[str], bool]  # which weights (by name) to hold column-major in memory
Transform = Callable[[str, torch.Tensor], torch.Tensor]  # (name, tensor just read) -> what to keep (int8 loading)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, unsafe or does not fit the model."""


# --- writing ------------------------------------------------------------------------


def sidecar_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def save(
    model: GPT,
    path: str | Path,
    *,
    base_model: str | None = None,
    iteration: int | None = None,
    train_loss: float | None = None,
    val_loss: float | None = None,
    data_hash: str | None = None,
    **extra: Any,
) -> Path:
    """Write ``model`` to ``path`` (``.safetensors`` is appended if missing) and its sidecar.

    Extra keyword arguments land in the provenance (JSON-serialisable values only).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    provenance = dict(
        base_model=base_model,
        iteration=iteration,
        train_loss=None if train_loss is None else float(train_loss),
        val_loss=None if val_loss is None else float(val_loss),
        data_hash=data_hash,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **extra,
    )
    meta = {"format": FORMAT, "config": asdict(model.config), "provenance": provenance}
    meta_json = json.dumps(meta, indent=2, sort_keys=True)
    # the head is the embedding (tied): store it once, contiguous, on the CPU
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    # sidecar first: a weights file that exists always has its complete sidecar beside it
    atomic_write(sidecar_path(path), lambda tmp: tmp.write_text(meta_json + "\n", encoding="utf-8"))
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata={_META_KEY: meta_json}))
    return path


def temp_name(path: Path) -> Path:
    """The hidden temporary name `atomic_write` writes ``path`` under (``.NAME.<hex>.tmp``)."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then move it into place."""
    tmp = temp_name(path)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --- reading ------------------------------------------------------------------------


def load(
    path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    config: GPTConfig | None = None,
    column_major: ColumnMajor | None = None,
    transform: Transform | None = None,
) -> tuple[GPT, dict]:
    """Load a native checkpoint or a seed/nanoGPT ``.pt`` file (a Hugging Face directory: `chatcore.hf.load_any`).

    Returns the model (eval mode) and its metadata ``{"format", "config",
    "provenance", "source"}``. ``config`` overrides what is read or inferred
    (needed only for a plain state dict whose heads are not 64-dimensional).
    2-D weights for which ``column_major(name)`` is true are stored column-major
    (``W.t().contiguous().t()``: same values and shape, transposed memory), read
    straight into that layout from safetensors files; the engine decodes faster
    that way (see `chatcore.engine.decode_column_major`). ``transform`` sees each
    tensor of a safetensors file as it is read (see `read_safetensors`).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory: load a Hugging Face export with chatcore.hf.load_any")
    if path.suffix == ".safetensors":
        cfg, state, meta = _read_native(path, column_major, transform)
    else:
        cfg, state, meta = _read_torch(path)
        if column_major is not None:
            state = {k: as_column_major(v) if v.dim() == 2 and column_major(k) else v for k, v in state.items()}
    cfg = config or cfg
    model = build_model(cfg, state, source=str(path))
    model.to(device)
    if dtype is not None:
        model.to(dtype)
    meta["config"] = asdict(cfg)
    meta["source"] = str(path)
    return model.eval(), meta


def read_meta(path: str | Path) -> dict:
    """A native checkpoint's metadata, without reading its weights."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    if _META_KEY in header:
        try:
            return _meta_mapping(json.loads(header[_META_KEY]), f"{path}: metadata")
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: metadata is not valid JSON: {e}") from e
    side = sidecar_path(path)
    if side.is_file():
        try:
            return _meta_mapping(json.loads(side.read_text(encoding="utf-8")), f"{side}: sidecar")
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
            raise CheckpointError(f"{side}: unreadable sidecar: {e}") from e
    raise CheckpointError(f"{path} has no chatcore metadata and no sidecar {side.name}: its config is unknown")


def _meta_mapping(meta: Any, what: str) -> dict:
    if not isinstance(meta, dict):
        raise CheckpointError(f"{what} is a JSON {type(meta).__name__}, not an object")
    if not isinstance(meta.get("provenance", {}), dict):
        raise CheckpointError(f"{what}: provenance is not an object")
    return meta


def as_column_major(t: torch.Tensor) -> torch.Tensor:
    """``t`` (2-D) with column-major memory: a copy unless it already is."""
    return t if t.stride() == (1, t.size(0)) else t.t().contiguous().t()


def _read_native(
    path: Path, column_major: ColumnMajor | None = None, transform: Transform | None = None
) -> tuple[GPTConfig, dict, dict]:
    meta = read_meta(path)
    cfg = config_from_dict(meta.get("config"), str(path))
    state = read_safetensors(path, column_major=column_major, transform=transform)
    meta.setdefault("provenance", {})
    return cfg, state, meta


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def read_safetensors(
    path: Path,
    rename: Callable[[str], str | None] | None = None,
    column_major: ColumnMajor | None = None,
    transform: Transform | None = None,
) -> dict[str, torch.Tensor]:
    """Read a safetensors file through a memory map, tensor by tensor.

    ``rename(name)`` gives the key to store a tensor under (None drops it);
    ``column_major(name)`` (on the file's names) picks 2-D tensors to lay out
    column-major: one transposing copy straight from the mapped file.
    ``transform(name, tensor)`` (on the stored names) replaces each tensor as soon
    as it is read, before the next one is: int8 loading quantizes from the mapped
    pages and keeps no fp32 copy this way.

    A tensor kept as it is in the file (int8's embedding, a Hugging Face Conv1D
    weight, which is column-major once transposed, LayerNorms, biases) stays a
    view of the mapping (POSIX): nothing is read into anonymous memory, its pages
    are the page cache's, shared by every process serving the same file, and it
    costs no copy at start-up. The pages of the tensors that were copied or
    quantized are handed back once used (MADV_DONTNEED), so the file does not sit
    in the resident set twice. The mapping is private: writing into a weight (a
    merged LoRA adapter) copies that page and never touches the file. chatcore
    replaces checkpoints by renaming a new file over the old one, which leaves a
    mapping of the old one valid; a file truncated in place while it is served
    would make its pages unreadable (SIGBUS), as with any mapped file.

    The header and every tensor's bounds are checked against the file's size
    before anything is mapped: a truncated or corrupt file is refused with
    CheckpointError and nothing is built.
    """
    state: dict[str, torch.Tensor] = {}
    try:
        with open(path, "rb") as f:
            index, data_start = _safetensors_index(f, path)
            mapping, data = _map_file(f)
    except OSError as e:
        raise CheckpointError(f"{path} is not readable: {e}") from e
    for name, (dtype, shape, begin, end) in index.items():
        key = name if rename is None else rename(name)
        if key is None:
            continue
        first, last = data_start + begin, data_start + end
        tensor = _typed(data[first:last], dtype, shape)
        if len(shape) == 2 and column_major is not None and column_major(name):
            tensor = as_column_major(tensor)  # one transposing copy (t().contiguous() is ~2x copy_ into a transposed view)
        if transform is not None:
            _reading.mapping = mapping, data  # for release_read_pages, while the transform runs
            try:
                tensor = transform(name, tensor)
            finally:
                _reading.mapping = None
        mapped = _shares_memory(tensor, data)
        if mapped and KEEP_MAPPED:
            state[key] = tensor
            continue
        state[key] = tensor.clone() if mapped else tensor
        _release_pages(mapping, first, last)  # copied or quantized: its file pages leave the resident set now
    return state


KEEP_MAPPED = os.name == "posix"  # Windows cannot replace a file that is mapped: copy what is kept there
_reading = threading.local()  # the (mapping, data) a transform of read_safetensors reads from, on this thread


def release_read_pages(t: torch.Tensor) -> None:
    """Hand back the resident file pages wholly inside ``t``, a contiguous view of the file that
    `read_safetensors` is reading on this thread (for its ``transform``; anything else is left alone).

    A transform that reads a large tensor block by block (int8 loading's token embedding)
    calls it after each block, so the whole fp32 tensor is never resident at once. The
    mapping is private and those pages were only read: touching them again re-reads the file.
    """
    mapping, data = getattr(_reading, "mapping", None) or (None, None)
    if mapping is None or not t.is_contiguous() or not _shares_memory(t, data):
        return
    first = t.data_ptr() - data.data_ptr()
    _release_pages(mapping, first, first + t.numel() * t.element_size())


def release_free_heap() -> None:
    """Hand the C heap's free pages back to the OS after loading (glibc's ``malloc_trim``; elsewhere nothing).

    Loading frees many temporaries of a few MB each (int8 loading: each matrix's int8 values
    once fbgemm has packed them; oneDNN packing, `chatcore.cpu_linear`: each dense matrix).
    glibc's mmap threshold rises to the size of the largest one freed, so later ones come
    from the heap and, once freed, stay resident there:
    ~40-50 MB of a GPT-2 int8 engine's resident set that nothing will use again.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; musl and other C libraries have none
    except (OSError, AttributeError, TypeError):  # TypeError: Windows has no CDLL(None)
        return None


def _map_file(f) -> tuple[mmap.mmap | None, torch.Tensor]:
    """The whole file as a uint8 tensor over a private, copy-on-write memory map (and the map)."""
    size = os.fstat(f.fileno()).st_size
    if size == 0:
        return None, torch.empty(0, dtype=torch.uint8)
    m = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
    return m, torch.frombuffer(m, dtype=torch.uint8)  # the tensors keep the mapping open while a view of it lives


def _typed(raw: torch.Tensor, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    """A byte range of the file as a tensor of ``dtype``, without a copy when it is aligned for it."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    if raw.data_ptr() % itemsize:  # safetensors writers align tensors; a file that does not is copied
        raw = raw.clone()
    return raw.view(dtype).reshape(shape)


def _release_pages(m: mmap.mmap | None, first: int, last: int) -> None:
    """Drop the resident pages that lie wholly inside bytes ``first:last`` of the mapping.

    Tensors never overlap, so such a page holds nothing that is kept; the page
    at each end, which a neighbour may share, stays."""
    if m is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    page = mmap.PAGESIZE
    lo, hi = -(-first // page), last // page
    if hi > lo:
        m.madvise(mmap.MADV_DONTNEED, lo * page, (hi - lo) * page)


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    start, size = b.untyped_storage().data_ptr(), b.untyped_storage().nbytes()
    return size > 0 and start <= a.untyped_storage().data_ptr() < start + size


def _safetensors_index(f, path: Path) -> tuple[dict[str, tuple[torch.dtype, list[int], int, int]], int]:
    """Parse and check a safetensors header: {name: (dtype, shape, begin, end)} and where data starts."""
    size = os.fstat(f.fileno()).st_size
    raw = f.read(8)
    if len(raw) != 8:
        raise CheckpointError(f"{path} is not a safetensors file (too short)")
    n = int.from_bytes(raw, "little")
    if n > min(size - 8, 100 << 20):
        raise CheckpointError(f"{path} is corrupt or truncated (header of {n} bytes)")
    try:
        header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt (unreadable header: {e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is corrupt (header is not a mapping)")
    data_start, data_size = 8 + n, size - 8 - n
    index = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            shape = [int(d) for d in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: bad header entry for {name!r}") from e
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if any(d < 0 for d in shape) or not 0 <= begin <= end <= data_size or end - begin != nbytes:
            raise CheckpointError(f"{path} is corrupt or truncated (tensor {name!r} out of bounds)")
        index[name] = (dtype, shape, begin, end)
    return index, data_start


class _SeedGPTConfig:
    """Stands in for the seed's pickled ``model.GPTConfig``: an empty object that
    only receives the pickled field values, which are type-checked afterwards."""


def torch_load(path: Path) -> Any:
    """`torch.load` with weights only, allowing just the seed's pickled GPTConfig (never arbitrary classes)."""
    try:
        with torch.serialization.safe_globals([(_SeedGPTConfig, "model.GPTConfig")]):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refused to load {path}: it asks to run or build something other than tensors "
            f"and a GPTConfig, which could execute code ({str(e).splitlines()[-1] if str(e) else e})"
        ) from e
    except Exception as e:  # torch's parser meets untrusted bytes: IndexError, KeyError, struct.error, ...
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (corrupt or truncated?): {e}") from e


def _read_torch(path: Path) -> tuple[GPTConfig | None, dict, dict]:
    obj = torch_load(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(obj).__name__}")
    provenance: dict[str, Any] = {}
    if "model_state_dict" in obj:  # the seed's fine-tune format
        state = obj["model_state_dict"]
        raw_cfg = obj.get("config")
        provenance = dict(
            iteration=_number(obj.get("iter")),
            train_loss=_number(obj.get("train_loss")),
            val_loss=_number(obj.get("val_loss")),
        )
        fmt = "seed-finetune"
    elif "model" in obj and isinstance(obj["model"], dict):  # nanoGPT's ckpt.pt
        state = obj["model"]
        raw_cfg = obj.get("model_args")
        provenance = dict(iteration=_number(obj.get("iter_num")), val_loss=_number(obj.get("best_val_loss")))
        fmt = "nanogpt"
    else:  # a plain state dict
        state, raw_cfg, fmt = obj, None, "state-dict"
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: the weights are not a dict of tensors")
    state = normalize_state_dict(state)
    if isinstance(raw_cfg, _SeedGPTConfig):
        raw_cfg = vars(raw_cfg)
    cfg = config_from_dict(raw_cfg, str(path)) if raw_cfg is not None else infer_config(state, str(path))
    return cfg, state, {"format": fmt, "provenance": provenance}


def _number(x: Any) -> float | int | None:
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        x = x.item()
    return x if isinstance(x, (int, float)) and not isinstance(x, bool) else None


# --- state dicts and configs --------------------------------------------------------------


def normalize_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """nanoGPT keys: strip torch.compile's ``_orig_mod.``, drop the causal-mask buffers."""
    out = {}
    for k, v in state.items():
        k = k.removeprefix("_orig_mod.")
        if k.endswith(".attn.bias") or k.endswith(".attn.masked_bias"):
            continue  # nanoGPT's / HF's causal mask buffers, not weights
        out[k] = v
    return out


def config_from_dict(raw: Any, source: str) -> GPTConfig:
    """A GPTConfig from untrusted values, each type-checked."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{source}: config is missing or not a mapping")
    kinds = {"block_size": int, "vocab_size": int, "n_layer": int, "n_head": int, "n_embd": int, "dropout": float, "bias": bool}
    values = {}
    for f in fields(GPTConfig):
        if f.name not in raw:
            continue
        v = raw[f.name]
        want = kinds[f.name]
        ok = isinstance(v, bool) if want is bool else isinstance(v, (int, float) if want is float else int) and not isinstance(v, bool)
        if not ok:
            raise CheckpointError(f"{source}: config.{f.name} = {v!r} is not a {want.__name__}")
        values[f.name] = want(v)
    try:
        cfg = GPTConfig(**values)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from e
    for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
        if getattr(cfg, name) < 1:
            raise CheckpointError(f"{source}: config.{name} must be positive")
    return cfg


def infer_config(state: dict[str, torch.Tensor], source: str, head_dim: int = 64) -> GPTConfig:
    """Read the shapes of a plain state dict; heads are GPT-2's 64 dimensions."""
    try:
        vocab_size, n_embd = state["transformer.wte.weight"].shape
        block_size = state["transformer.wpe.weight"].shape[0]
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{source}: not a GPT state dict (no transformer.wte/wpe weights)") from e
    layers = {int(k.split(".")[2]) for k in state if k.startswith("transformer.h.")}
    if n_embd % head_dim:
        raise CheckpointError(f"{source}: n_embd {n_embd} is not a multiple of {head_dim}; pass the config explicitly")
    return GPTConfig(
        block_size=block_size,
        vocab_size=vocab_size,
        n_layer=len(layers),
        n_head=n_embd // head_dim,
        n_embd=n_embd,
        bias="transformer.ln_f.bias" in state,
    )


@contextlib.contextmanager
def _skip_init():
    """Make torch.nn.init's functions no-ops while a skeleton model is built on the meta device.

    Random init on meta tensors runs through Python decompositions whose first use
    imports ~800 modules (~75 MB of RSS) for values that are thrown away. The
    same trick as transformers' ``no_init_weights``; it is process-wide for its
    short duration, so it is held under a lock.
    """
    names = ("uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "zeros_", "ones_", "constant_")
    with _INIT_LOCK:
        saved = {n: getattr(torch.nn.init, n) for n in names}
        try:
            for n in names:
                setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
            yield
        finally:
            for n, f in saved.items():
                setattr(torch.nn.init, n, f)


_INIT_LOCK = threading.Lock()


def expected_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every weight a model of ``cfg`` holds (``lm_head.weight`` left out: it is ``wte``), by name.

    Read off a one-layer skeleton and repeated per layer, so a config declaring an
    absurd size costs nothing to check."""
    with torch.device("meta"), _skip_init():
        one = GPT(replace(cfg, n_layer=1)).state_dict()
    out: dict[str, tuple[int, ...]] = {}
    for k, v in one.items():
        if k == "lm_head.weight":
            continue
        if k.startswith("transformer.h.0."):
            rest = k.removeprefix("transformer.h.0.")
            out.update((f"transformer.h.{i}.{rest}", tuple(v.shape)) for i in range(cfg.n_layer))
        else:
            out[k] = tuple(v.shape)
    return out


def check_weights(cfg: GPTConfig, state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse weights that do not fit ``cfg`` (names, shapes, float dtype), before anything is built."""
    layers = {k.split(".")[2] for k in state if k.startswith("transformer.h.")}
    if len(layers) != cfg.n_layer:
        raise CheckpointError(f"{source}: the config declares n_layer={cfg.n_layer} but the file holds "
                              f"{len(layers)} layer(s) of weights")
    expected = expected_shapes(cfg)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected) - {"lm_head.weight"})
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not match the config (missing: {missing[:5]}, unexpected: {unexpected[:5]})"
        )
    for k, shape in expected.items():
        if tuple(state[k].shape) != shape:
            raise CheckpointError(f"{source}: {k} has shape {tuple(state[k].shape)}, config wants {shape}")
    for k, v in state.items():
        if not v.is_floating_point():
            raise CheckpointError(f"{source}: {k} holds {v.dtype} values; weights must be floating point")


def build_model(cfg: GPTConfig, state: dict[str, torch.Tensor], source: str = "state dict") -> GPT:
    """A GPT with exactly these weights; any missing, extra or misshapen tensor is an error."""
    check_weights(cfg, state, source)  # first: the skeleton below costs time in proportion to the config
    with torch.device("meta"), _skip_init():
        model = GPT(cfg)  # a skeleton: every tensor is replaced below
    state = dict(state)
    state.setdefault("lm_head.weight", state.get("transformer.wte.weight"))
    if state["lm_head.weight"] is not state["transformer.wte.weight"] and not torch.equal(
        state["lm_head.weight"], state["transformer.wte.weight"]
    ):
        raise CheckpointError(f"{source}: lm_head.weight differs from transformer.wte.weight (GPT-2 ties them)")
    model.load_state_dict(state, assign=True)
    model.transformer.wte.weight = model.lm_head.weight  # assign=True replaced the shared parameter
    return model


# --- fit to serve ---------------------------------------------------------------------

MIN_SERVING_BLOCK = 64  # room for a short prompt and a reply


def check_servable(model: GPT, source: str, n_vocab: int = N_VOCAB) -> None:
    """Refuse a model that cannot answer requests: every serving, promotion and swap path calls this.

    The vocabulary must cover the tokenizer's ids, the context must hold a prompt and
    a reply, and the weights must be floating point, finite and shaped as the config says.
    """
    cfg = model.config
    if cfg.vocab_size < n_vocab:
        raise CheckpointError(f"{source}: vocab_size {cfg.vocab_size} does not cover the tokenizer's "
                              f"{n_vocab} token ids (end-of-text included): it cannot serve")
    if cfg.block_size < MIN_SERVING_BLOCK:
        raise CheckpointError(f"{source}: block_size {cfg.block_size} is too short to hold a prompt and a reply "
                              f"(at least {MIN_SERVING_BLOCK}): it cannot serve")
    shapes = expected_shapes(cfg)
    for name, p in model.state_dict().items():
        want = shapes.get(name, shapes["transformer.wte.weight"] if name == "lm_head.weight" else None)
        if want is None or tuple(p.shape) != want:
            raise CheckpointError(f"{source}: {name} does not fit its config {cfg}")
        if not p.is_floating_point():
            raise CheckpointError(f"{source}: {name} holds {p.dtype} values; weights must be floating point")
        if not all_finite(p):
            raise CheckpointError(f"{source}: {name} holds NaN or infinite values: it cannot serve")


def all_finite(t: torch.Tensor) -> bool:
    """Whether every value of ``t`` is finite.

    A sum is finite only if every term is (NaN and infinities never cancel back to a
    finite number), and summing reads the tensor once without a temporary as large
    as it: ~15x faster than ``isfinite`` on a CPU (the serving check of GPT-2 124M fp32 at
    start-up: 6.7x, benchmarks/cold_start.py).
    Only a sum that overflows (huge but finite weights) or is not finite is checked
    value by value, in row blocks so no temporary is as large as the 154 MB embedding."""
    if bool(torch.isfinite(t.sum(dtype=torch.float32) if t.element_size() < 4 else t.sum())):  # half types: no fp16 overflow
        return True
    return all(bool(torch.isfinite(block).all()) for block in t.split(4096))
