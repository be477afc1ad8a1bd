"""Import Hugging Face GPT-2 checkpoints (gpt2, gpt2-medium, gpt2-large, gpt2-xl, or any
GPT-2-shaped export) into chatcore's GPT.

From a local directory (``config.json`` + ``model.safetensors`` or
``pytorch_model.bin``, the latter read with ``weights_only=True``), or by hub
name through ``huggingface_hub`` (its cache first; a download with a progress
bar only when allowed and online).

Hugging Face stores ``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc`` and
``mlp.c_proj`` weights as Conv1D ``[in, out]``: they are transposed for
``nn.Linear``. The ``attn.bias`` / ``attn.masked_bias`` mask buffers of older
exports are ignored.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .checkpoint import (ColumnMajor, CheckpointError, Transform, as_column_major, build_model, config_from_dict, load,
                         read_safetensors, torch_load)
from .model import GPT, GPTConfig

GPT2_SIZES = {  # name: (n_layer, n_head, n_embd)
    "gpt2": (12, 12, 768),
    "gpt2-medium": (24, 16, 1024),
    "gpt2-large": (36, 20, 1280),
    "gpt2-xl": (48, 25, 1600),
}
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def config_from_hf(cfg: dict, source: str = "config.json") -> GPTConfig:
    """GPTConfig from a Hugging Face GPT2Config dict; refuses variants this model does not compute."""
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{source}: a JSON {type(cfg).__name__}, not a GPT-2 config object")
    if cfg.get("model_type", "gpt2") != "gpt2":
        raise CheckpointError(f"{source}: model_type {cfg.get('model_type')!r} is not gpt2")
    act = cfg.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise CheckpointError(f"{source}: activation {act!r} is not GPT-2's tanh GELU")
    # every size is type-checked (a string or a list here is a clear error, not a TypeError later)
    gpt = config_from_dict(dict(
        block_size=cfg.get("n_positions", cfg.get("n_ctx", 1024)),
        vocab_size=cfg.get("vocab_size", 50257),
        n_layer=cfg.get("n_layer", 12),
        n_head=cfg.get("n_head", 12),
        n_embd=cfg.get("n_embd", 768),
        dropout=0.0,
        bias=True,
    ), source)
    if cfg.get("n_inner") not in (None, 4 * gpt.n_embd):
        raise CheckpointError(f"{source}: n_inner {cfg['n_inner']!r} is not 4 * n_embd")
    if cfg.get("scale_attn_by_inverse_layer_idx") or cfg.get("scale_attn_weights") is False:
        raise CheckpointError(f"{source}: non-standard attention scaling is not supported")
    eps = cfg.get("layer_norm_epsilon", 1e-5)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or abs(eps - 1e-5) > 1e-12:
        raise CheckpointError(f"{source}: layer_norm_epsilon {eps!r} is not 1e-5")
    if cfg.get("tie_word_embeddings", True) not in (True, False):
        raise CheckpointError(f"{source}: tie_word_embeddings {cfg['tie_word_embeddings']!r} is not a boolean")
    return gpt


def hf_name(k: str) -> str | None:
    """nanoGPT's name for a Hugging Face GPT-2 tensor; None for tensors that are not weights."""
    if k.endswith(".attn.bias") or k.endswith(".attn.masked_bias"):
        return None  # causal-mask buffers
    if k == "lm_head.weight":
        return None  # tied to wte
    return k if k.startswith("transformer.") else "transformer." + k  # GPT2Model exports lack the prefix


def convert_hf_state_dict(
    hf_state: dict[str, torch.Tensor], column_major: ColumnMajor | None = None
) -> dict[str, torch.Tensor]:
    """Hugging Face GPT2LMHeadModel / GPT2Model keys and layouts -> nanoGPT's.

    A Conv1D weight ``[in, out]`` transposed is a column-major ``[out, in]``: it is
    kept that way where ``column_major`` asks for it, made contiguous otherwise."""
    out = {}
    for k, v in hf_state.items():
        name = hf_name(k)
        if name is None:
            continue
        if name.endswith(_CONV1D):
            v = v.t()
        want_col = column_major is not None and v.dim() == 2 and column_major(name)
        out[name] = as_column_major(v) if want_col else v.contiguous()
    return out


def load_any(
    path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    column_major: ColumnMajor | None = None,
    transform: Transform | None = None,
) -> tuple[GPT, dict]:
    """A checkpoint on disk of any kind: a Hugging Face GPT-2 directory, else `chatcore.checkpoint.load`."""
    if Path(path).is_dir():
        return load_hf_dir(path, device=device, dtype=dtype, column_major=column_major, transform=transform)
    return load(path, device=device, dtype=dtype, column_major=column_major, transform=transform)


def load_hf_dir(
    path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    column_major: ColumnMajor | None = None,
    transform: Transform | None = None,
) -> tuple[GPT, dict]:
    """Load a local Hugging Face GPT-2 directory; returns (model, metadata).

    ``column_major`` and ``transform`` (given nanoGPT's names and ``[out, in]`` layout) as in
    `chatcore.checkpoint.load`."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path} has no config.json: not a Hugging Face model directory")
    try:
        hf_cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise CheckpointError(f"{cfg_file}: {e}") from e
    cfg = config_from_hf(hf_cfg, str(cfg_file))
    weights = next((path / n for n in _WEIGHT_FILES if (path / n).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{path} has neither model.safetensors nor pytorch_model.bin")
    if weights.suffix == ".safetensors":
        # Conv1D weights are column-major once transposed; only the others need laying out
        def read_col(k: str) -> bool:
            name = hf_name(k)
            return column_major is not None and name is not None and not name.endswith(_CONV1D) and column_major(name)

        head: dict[str, torch.Tensor | bool] = {}

        def read_one(k: str, v: torch.Tensor) -> torch.Tensor:
            name = hf_name(k)
            if k == "lm_head.weight":
                head["weight"] = v
            if transform is None or name is None:
                return v
            if name == "transformer.wte.weight" and "weight" in head:
                # an explicit copy of the tied head is compared now: the transform (int8) replaces wte
                head["tied"] = head["weight"].shape == v.shape and torch.equal(head["weight"], v)
            if name.endswith(_CONV1D):  # the transform sees [out, in]; convert_hf_state_dict transposes back
                return transform(name, v.t()).t()
            return transform(name, v)

        hf_state = read_safetensors(weights, column_major=read_col, transform=read_one if transform else None)
        tied_copy = head.get("tied") is True
    else:
        hf_state = torch_load(weights)
        if not isinstance(hf_state, dict) or not all(isinstance(v, torch.Tensor) for v in hf_state.values()):
            raise CheckpointError(f"{weights}: expected a state dict of tensors")
        tied_copy = False
    state = convert_hf_state_dict(hf_state, column_major)
    wte = hf_state["lm_head.weight"] if tied_copy else state.get("transformer.wte.weight")
    check_head_tied(hf_cfg, hf_state.get("lm_head.weight"), wte, str(path))
    model = build_model(cfg, state, source=str(weights))
    model.to(device)
    if dtype is not None:
        model.to(dtype)
    name = hf_cfg.get("_name_or_path") or path.name
    meta = {
        "format": "huggingface",
        "config": cfg.__dict__.copy(),
        "provenance": {"base_model": name},
        "source": str(path),
    }
    return model.eval(), meta


def check_head_tied(hf_cfg: dict, head: torch.Tensor | None, wte: torch.Tensor | None, source: str) -> None:
    """Refuse an export whose output head is not the token embedding.

    chatcore's GPT ties them, as GPT-2 does: the native format stores one copy,
    int8 quantisation, the decode layout and fine-tuning all rely on it. Loading
    only the embedding would give silently wrong logits, so such a file is refused.
    """
    untied = hf_cfg.get("tie_word_embeddings", True) is False
    if head is not None and wte is not None and head.shape == wte.shape and torch.equal(head, wte):
        return  # an explicit copy of the tied head (older .bin exports)
    if head is not None or untied:
        raise CheckpointError(
            f"{source}: its output head (lm_head) is not tied to the token embedding "
            f"(tie_word_embeddings: {str(not untied).lower()}); chatcore's GPT-2 ties them, so it would "
            "compute different logits. Re-export it with tie_word_embeddings: true."
        )


def fetch(
    name: str = "gpt2",
    cache_dir: str | Path | None = None,
    local_files_only: bool = True,
) -> Path:
    """The local directory of hub model ``name``: from the Hugging Face cache, or downloaded
    (with huggingface_hub's progress bars) when ``local_files_only`` is False.

    Only ``config.json`` and one weights file are fetched: safetensors, else
    ``pytorch_model.bin`` when the hub has no safetensors. A downloaded file whose bytes
    do not hash to what the hub announced is removed from the cache (CheckpointError).
    Raises whatever huggingface_hub raises when the files are neither cached nor reachable.
    """
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.utils import EntryNotFoundError

    cache = str(cache_dir) if cache_dir else None

    def get(filename: str) -> Path:
        if local_files_only:  # a look in the cache folder only: no request at all (hf_hub_download makes some)
            found = try_to_load_from_cache(name, filename, cache_dir=cache)
            if not isinstance(found, str):
                raise FileNotFoundError(f"{name}/{filename} is not in the Hugging Face cache")
            return Path(found)
        path = Path(hf_hub_download(name, filename, cache_dir=cache))
        verify_download(path, f"{name}/{filename}")
        return path

    folder = get("config.json").parent
    last: Exception | None = None
    for weights in _WEIGHT_FILES:  # prefer safetensors: no pickle at all
        try:
            get(weights)  # lands beside config.json: one snapshot folder per commit
        except (EntryNotFoundError, FileNotFoundError) as e:  # not on the hub (or not cached): try the next format
            last = e
            continue
        return folder
    raise last if last is not None else FileNotFoundError(f"{name}: no weights found on the hub")


def verify_download(path: Path, what: str) -> None:
    """Check a file huggingface_hub just downloaded against its sha256 (the cache names a
    large file's blob by it); remove a mismatch, so nothing corrupt is ever loaded."""
    blob = path.resolve()
    expected = blob.name
    if len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected):
        return  # a small git-stored file: its name is a git object id, not a content hash
    h = hashlib.sha256()
    with open(blob, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != expected:
        blob.unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        raise CheckpointError(
            f"{what} downloaded from the Hugging Face hub is corrupt (sha256 {h.hexdigest()[:12]}..., "
            f"expected {expected[:12]}...); it was removed from the cache: run again to download it again"
        )


def load_hf(
    name_or_path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = True,
    column_major: ColumnMajor | None = None,
    transform: Transform | None = None,
) -> tuple[GPT, dict]:
    """Load a local Hugging Face directory, or hub model ``name_or_path`` (cache, then download)."""
    if Path(name_or_path).is_dir():
        return load_hf_dir(name_or_path, device=device, dtype=dtype, column_major=column_major, transform=transform)
    d = fetch(str(name_or_path), cache_dir=cache_dir, local_files_only=local_files_only)
    model, meta = load_hf_dir(d, device=device, dtype=dtype, column_major=column_major, transform=transform)
    meta["provenance"]["base_model"] = str(name_or_path)
    return model, meta


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """chatcore/nanoGPT weights under Hugging Face GPT2LMHeadModel's keys and Conv1D layout
    (views where possible: no copy of the weights)."""
    out = {}
    for k, v in model.state_dict().items():
        out[k] = v.t() if k.endswith(_CONV1D) else v
    return out
