"""Which weights serve, read top-down: the one place that decides.

1. the promoted fine-tune (`chatcore.registry`), when there is a sound one;
   a damaged one is reported and skipped, never fatal;
2. ``model.checkpoint``: a native .safetensors, a seed/nanoGPT .pt, or a Hugging Face directory;
3. ``model.base`` in the Hugging Face cache;
4. ``model.base`` downloaded (when ``model.download``, not ``HF_HUB_OFFLINE``, and the hub's name resolves);
5. the offline starter model (`chatcore.training.starter`, when ``model.starter``);
6. otherwise `ModelNotFound`, saying what is missing and how to fix it.

A running bot follows the registry (`RegistryWatch`): a promotion or rollback
made by another process (``chatcore model rollback``, ``chatcore finetune``)
serves within seconds, loaded fully before it is swapped in.

Steps 2-6 are "the base": what serves when nothing is promoted, and what a
fine-tune starts from (`base_checkpoint` names it without loading it).

``model:`` keys used here::

    checkpoint: null   # a native .safetensors, a seed/nanoGPT .pt, or a Hugging Face directory
    base: gpt2         # hub name used when no checkpoint is configured
    download: true     # may fetch `base` from the Hugging Face hub when it is not cached
    cache_dir: null    # Hugging Face cache directory (null: huggingface_hub's default)
    device: auto       # auto (cuda -> mps -> cpu), cpu, cuda, cuda:1, mps
    dtype: auto        # auto (float32 on cpu, bfloat16/float16 on accelerators), float32, bfloat16, float16
    threads: null      # torch CPU threads (null: torch's default)
    quantize: auto     # auto (int8 on a CPU, none elsewhere), int8, none
    cpu_layout: auto   # float32 on a CPU: auto/packed (oneDNN-packed matrices, chatcore.cpu_linear), plain
    speculative: {draft: null, k: 4}  # draft: prompt_lookup or a small model's checkpoint (chatcore.speculative)
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import cpu_linear, hf, lora
from .checkpoint import CheckpointError, ColumnMajor, Transform, release_free_heap
from .engine import Engine, decode_column_major, pick_device, pick_dtype
from .model import GPT
from .registry import Registry, RegistryError, serving_checkpoint
from .speculative import make_speculator
from .threads import release_thread_pool
from .tokenizer import Tokenizer

log = logging.getLogger("chatcore")

Starter = Callable[[], "str | Path | None"]


class ModelNotFound(RuntimeError):
    """No weights to serve could be found; the message says what to do."""


def models_dir(config: Any) -> Path:
    """Where fine-tuned checkpoints, the registry and the starter model live."""
    return Path(config.data_dir) / "models"


def load_engine(config: Any, tokenizer: Tokenizer | None = None) -> Engine:
    """The serving engine: the promoted fine-tune if there is a sound one, else the base (see the module docstring)."""
    promoted = serving_checkpoint(models_dir(config))
    if promoted is not None:
        try:
            return engine_for(config, promoted, tokenizer)
        except CheckpointError as exc:  # a damaged fine-tune never stops the bot from serving
            log.warning("promoted checkpoint %s is unusable (%s); serving the base model", promoted, exc)
    return build_engine(model_section(config), starter_for(config), tokenizer)


def model_section(config: Any) -> dict:
    """The ``model:`` section as serving applies it: ``quantize: auto`` stays fp32 when scopes
    train their own adapters, whose per-row updates ride on the fp32 ``nn.Linear`` layers
    (chatcore.lora); an explicit ``int8`` is the operator's call."""
    cfg = dict(config["model"])
    if cfg.get("quantize", "auto") == "auto" and any(
            isinstance(s, dict) and s.get("finetune", True) for s in (config.get("scopes") or [])):
        cfg["quantize"] = "none"
    return cfg


def engine_for(config: Any, checkpoint: str | Path, tokenizer: Tokenizer | None = None) -> Engine:
    """An engine for one checkpoint, built with the configured device, dtype and options."""
    return build_engine({**model_section(config), "checkpoint": str(checkpoint)}, None, tokenizer)


def build_engine(model_cfg: dict | None = None, starter: Starter | None = None,
                 tokenizer: Tokenizer | None = None) -> Engine:
    """The engine for a ``model:`` section: the base model (steps 2-6), no registry involved."""
    cfg = dict(model_cfg or {})
    device = pick_device(cfg.get("device", "auto"))
    dtype = pick_dtype(cfg.get("dtype", "auto"), device)
    int8 = quantize_int8_here(cfg.get("quantize", "auto"), device, dtype)
    loader = None
    if int8:
        from .quant import Int8Loader

        loader = Int8Loader()  # quantizes each weight as it is read: no fp32 copy of the model
    # int8 matrices need no column-major layout (the embedding stays row-major for its lookups)
    column_major = decode_column_major if device.type == "cpu" and loader is None else None
    model, meta, model_id = resolve_model(cfg, starter, column_major, loader)
    if loader is not None:
        loader.finish(model, meta.get("source") or model_id)
        model_id += " int8"  # stored with every exchange: which weights answered
    engine = Engine(model, tokenizer, model_id=model_id, device=device, dtype=dtype,
                    threads=cfg.get("threads"), meta=meta)
    if cpu_linear.packed_here(cfg.get("cpu_layout", "auto"), device, dtype, quantized=loader is not None):
        cpu_linear.pack_linears(engine.model)  # after the checks and the layout: the served weights, repacked

    def load_draft(path: str) -> tuple[GPT, int]:
        """The draft model loads like the served one (device, dtype, quantization), with no drafter of its own."""
        draft = build_engine({**cfg, "checkpoint": path, "speculative": None}, None, engine.tokenizer)
        return draft.model, draft.tokenizer.n_vocab

    engine.speculator = make_speculator(cfg.get("speculative"), load_draft)
    release_thread_pool()  # this thread's OpenMP workers would slow the decoding thread's (chatcore.threads)
    release_free_heap()  # what loading freed goes back to the OS, not kept for nothing
    return engine


def quantize_int8_here(quantize: str | None, device, dtype) -> bool:
    """Whether to serve int8 weights: ``auto`` means on a CPU in float32 (its quality is checked
    in `chatcore.quant.quality`); ``int8`` insists, ``none`` (or null) never."""
    if quantize in (None, "none"):
        return False
    if quantize not in ("auto", "int8"):
        raise ValueError(f"model.quantize must be auto, int8 or none; got {quantize!r}")
    on_cpu = device.type == "cpu" and dtype == torch.float32
    if quantize == "int8" and not on_cpu:
        raise ValueError(f"model.quantize: int8 serves on the CPU in float32, not on {device} in {dtype}")
    if on_cpu and not torch.backends.quantized.supported_engines:
        return False
    return on_cpu


def resolve_model(cfg: dict, starter: Starter | None = None,
                  column_major: ColumnMajor | None = None,
                  transform: Transform | None = None) -> tuple[GPT, dict, str]:
    """(model, metadata, model_id) from the first source of steps 2-6 that has weights; ModelNotFound otherwise.

    ``column_major`` picks weights to read straight into column-major memory, ``transform``
    sees each tensor as it is read (see `chatcore.checkpoint.load`)."""
    checkpoint = cfg.get("checkpoint")
    if checkpoint:
        path = Path(os.path.expanduser(str(checkpoint)))
        if not path.exists():
            raise ModelNotFound(
                f"model.checkpoint is {str(checkpoint)!r} but no such file or directory exists. "
                "Point it at a .safetensors checkpoint, a .pt file or a Hugging Face GPT-2 directory, "
                "or remove it to use GPT-2."
            )
        if lora.is_adapter(path):
            return adapter_on_base(path, cfg, starter, column_major)
        model, meta = hf.load_any(path, column_major=column_major, transform=transform)
        return model, meta, model_id(path, meta)

    base = cfg.get("base") or "gpt2"
    cache_dir = cfg.get("cache_dir")
    tried: list[str] = []
    try:
        model, meta = hf.load_hf(base, cache_dir=cache_dir, local_files_only=True, column_major=column_major, transform=transform)
        return model, meta, base
    except CheckpointError:
        raise
    except Exception as e:  # not cached (huggingface_hub's own error types vary by version)
        tried.append(f"{base!r} is not in the Hugging Face cache ({type(e).__name__})")
    unresolved = hub_unresolvable() if cfg.get("download", True) and not hub_offline() else None
    if unresolved:
        tried.append(f"the Hugging Face hub ({unresolved}) cannot be resolved: no network?")
    elif cfg.get("download", True) and not hub_offline():
        try:
            model, meta = hf.load_hf(base, cache_dir=cache_dir, local_files_only=False, column_major=column_major, transform=transform)
            return model, meta, base
        except CheckpointError:
            raise
        except Exception as e:  # offline, proxy, no such repo...
            tried.append(f"downloading {base!r} failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
    else:
        tried.append("downloading is off (model.download: false or HF_HUB_OFFLINE=1)")
    if starter is not None:
        path = starter()
        if path:
            model, meta = hf.load_any(path, column_major=column_major, transform=transform)
            return model, meta, model_id(Path(path), meta)
        tried.append("no offline starter model has been built")
    raise ModelNotFound(
        "No model to serve: no model.checkpoint is configured, "
        + "; ".join(tried)
        + ". To fix it: connect to the internet once so GPT-2 can be downloaded (about 500 MB), "
        "or copy a Hugging Face GPT-2 directory (config.json + model.safetensors) and set model.checkpoint to it"
        + (", or build the offline starter model" if starter is not None else "")
        + "."
    )


def adapter_on_base(path: Path, cfg: dict, starter: Starter | None = None,
                    column_major: ColumnMajor | None = None) -> tuple[GPT, dict, str]:
    """A LoRA adapter file serves as its base (named in its provenance) with the adapter merged in."""
    adapter = lora.load_adapter(path)
    base = adapter.base_model
    if base and Path(os.path.expanduser(base)).exists():
        base_cfg = {**cfg, "checkpoint": base}
    else:  # a hub name (or a base that moved): the configured base steps
        base_cfg = {**cfg, "checkpoint": None, "base": base or cfg.get("base")}
    model, meta, _ = resolve_model(base_cfg, starter, column_major)
    lora.merge_adapter(model, adapter)
    meta = {**meta, "source": str(path), "provenance": adapter.meta.get("provenance"), "base_source": meta.get("source")}
    return model, meta, model_id(path, adapter.meta)


def base_checkpoint(config: Any) -> str | None:
    """Where the base model's weights are on disk (steps 2-5, never the promoted fine-tune, never a
    download or a starter build), without loading them; None when there are none yet."""
    cfg = config["model"]
    if cfg.get("checkpoint"):
        path = Path(os.path.expanduser(str(cfg["checkpoint"])))
        return str(path) if path.exists() else None
    try:
        return str(hf.fetch(cfg.get("base") or "gpt2", cache_dir=cfg.get("cache_dir"), local_files_only=True))
    except Exception:  # not cached (huggingface_hub's error types vary by version)
        pass
    if cfg.get("starter"):
        from .training.starter import starter_path

        path = starter_path(config)
        return str(path) if path.is_file() else None
    return None


class RegistryWatch:
    """Notices changes to registry.json and says which engine should serve now."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.path = models_dir(config) / "registry.json"
        self.seen = self._stamp()

    def _stamp(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def changed(self) -> bool:
        """Whether registry.json changed since the last call (or since the bot started)."""
        stamp = self._stamp()
        if stamp == self.seen:
            return False
        self.seen = stamp
        return True

    def engine_if_needed(self, current: Any) -> Engine | None:
        """A fully loaded engine for what the registry says serves now; None when that already serves
        (or the registry is unreadable: the current model keeps serving)."""
        if self.config["model"].get("remote"):
            return None  # a front end (chatcore.remote) loads no weights: its serving box follows its own registry
        try:
            promoted = Registry(models_dir(self.config)).current()
        except RegistryError as exc:
            log.error("%s; still serving %s", exc, getattr(current, "model_id", "the current model"))
            return None
        want = str(promoted) if promoted is not None and promoted.is_file() else base_checkpoint(self.config)
        serving = (getattr(current, "meta", None) or {}).get("source")
        if want is not None and serving is not None and Path(want).resolve() == Path(serving).resolve():
            return None
        engine = load_engine(self.config, getattr(current, "tokenizer", None))
        return None if engine.meta.get("source") == serving else engine


def starter_for(config: Any) -> Starter | None:
    """The offline starter model's builder, when the config allows it (see chatcore.training.starter)."""
    if not config["model"]["starter"]:
        return None
    from .training.starter import starter_model

    return lambda: starter_model(config)


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_unresolvable() -> str | None:
    """The hub's host name when this machine cannot resolve it (no network, no DNS), else None.

    huggingface_hub retries a failed name lookup five times over ~25 s before giving up, so an
    offline first start would sit silent that long before the starter model; a lookup says it at
    once. Behind a proxy the proxy resolves the hub, so nothing is decided here."""
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    host = urlsplit(constants.ENDPOINT).hostname
    if not host:
        return None
    try:
        socket.getaddrinfo(host, None)
    except socket.gaierror:
        return host
    except (OSError, UnicodeError):
        return None  # anything else: let huggingface_hub try and report
    return None


def model_id(path: Path, meta: dict) -> str:
    """The name stored with every exchange: the checkpoint's name, and the base it was tuned from."""
    base = (meta.get("provenance") or {}).get("base_model")
    name = path.stem if path.is_file() else path.name
    return f"{name} ({base})" if base and base != name else name
