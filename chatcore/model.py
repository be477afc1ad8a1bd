"""GPT-2 in nanoGPT's layout, with a KV cache built for batched decoding.

The module tree and state-dict keys are nanoGPT's (``transformer.wte``,
``transformer.wpe``, ``transformer.h.N.{ln_1,attn.c_attn,attn.c_proj,ln_2,
mlp.c_fc,mlp.c_proj}``, ``transformer.ln_f``, ``lm_head`` tied to ``wte``), so
nanoGPT checkpoints load unchanged. The MLP uses GELU's tanh approximation,
which is what GPT-2 was trained with and what Hugging Face calls ``gelu_new``.

Training (nanoGPT's interface)::

    logits, loss = model(idx, targets)      # idx, targets: [B, T] token ids
    logits, _ = model(idx)                   # logits for every position: [B, T, V]

Cached decoding::

    cache = model.new_cache(max_batch=8)                    # KVCache, rows 0..7 empty
    logits = model.forward_cached(idx, cache, rows=rows, pos=pos, n_new=n_new)

``forward_cached`` appends tokens to some rows of ``cache`` and returns logits:

- ``idx`` ``[B, T]``: new tokens for B rows; a row with fewer than T new tokens
  is right-padded (padding ids are never read).
- ``rows``: which cache row each of the B entries extends (list/tensor of B ints,
  default ``0..B-1``). Rows not named are left untouched, so conversations can
  join and leave a running batch.
- ``n_new`` ``[B]``: how many of the T tokens are real in each row (default T).
- ``pos`` ``[B, T]``: the position-embedding index of every token (default: the
  row's current length plus 0..T-1). Cache slots are always filled in order; the
  position only selects the learned position embedding.
- ``last_only`` (default True): logits ``[B, V]`` of each row's last real token;
  False gives ``[B, T, V]``.
- ``pack`` (default True): when rows have different ``n_new``, only their real
  tokens go through the layers (attention still sees them padded); off for
  callers that address batch rows inside the layers (per-row LoRA adapters).

Each new token attends to its row's cached tokens and to the new tokens before
it; rows never see each other. ``cache.lengths[row]`` grows by ``n_new``.

``KVCache`` holds ``k`` and ``v`` of shape
``[n_layer, max_batch, n_head, max_len, head_dim]`` plus ``lengths`` (one valid
length per row). On the CPU that shape is only reserved address space: memory
is taken page by page as tokens are written and handed back when a row is
reset (vAttention's idea: the OS page table is the block table), so the cache
costs what the conversations in flight hold, not max_batch x max_len, while the
model still reads each row as a plain strided view.

Rows are independent: ``reset`` (drop), ``truncate`` (rewind to
a shorter prefix), ``copy_row`` (reuse one row's prefix in another),
``snapshot`` (copy a row's state out), ``take`` (move it out: snapshot and
reset, never holding it twice) and ``restore`` (fill a row from a snapshot,
e.g. a conversation's cached prefix).
"""

from __future__ import annotations

import inspect
import math
import mmap
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

_HAS_SDPA = hasattr(F, "scaled_dot_product_attention")


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # True: bias in Linears and LayerNorms, like GPT-2

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.use_sdpa = _HAS_SDPA  # tests switch this off to check the manual path

    def forward(self, x: torch.Tensor, step: "_Step | None" = None, layer: int = 0) -> torch.Tensor:
        qkv = self.c_attn(x)
        if step is not None and step.packed:
            qkv = step.unpack(qkv)  # the rows' real tokens, one after another: padded [B, T, 3C] to attend
        B, T, C = qkv.size(0), qkv.size(1), self.n_embd
        q, k, v = qkv.split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if step is None:
            y = self._attend(q, k, v, mask=None, causal=True)
        else:
            k, v = step.write_read(layer, k, v)
            y = self._attend(q, k, v, mask=step.mask, causal=step.causal)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        if step is not None and step.packed:
            y = step.pack(y)
        return self.resid_dropout(self.c_proj(y))

    def _attend(self, q, k, v, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
        dropout = self.dropout if self.training else 0.0
        if self.use_sdpa:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        if causal:
            T, S = q.size(-2), k.size(-2)
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
        if mask is not None:
            att = att.masked_fill(~mask, float("-inf"))
        att = self.attn_dropout(F.softmax(att, dim=-1))
        return att @ v


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, step: "_Step | None" = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), step, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as in GPT-2
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    # Read off wpe: int8 serving (chatcore.quant) replaces both the head and the token
    # embedding (wte) with int8 modules, while the position table stays a plain tensor.
    @property
    def device(self) -> torch.device:
        return self.transformer.wpe.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.wpe.weight.dtype

    # --- full-sequence forward (training, evaluation) ----------------------------

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """Logits ``[B, T, V]`` for every position, and the mean cross-entropy when
        ``targets`` is given (``-1`` targets are ignored), like nanoGPT."""
        b, t = idx.size()
        if t > self.config.block_size:
            raise ValueError(f"sequence of length {t} is longer than block_size {self.config.block_size}")
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    # --- cached decoding -----------------------------------------------------------

    def new_cache(self, max_batch: int = 1, max_len: int | None = None, zeroed: bool = True,
                  on_demand: bool = True) -> "KVCache":
        return KVCache(self.config, max_batch, max_len, device=self.device, dtype=self.dtype, zeroed=zeroed,
                       on_demand=on_demand)

    def forward_cached(
        self,
        idx: torch.Tensor,
        cache: "KVCache",
        rows: Sequence[int] | torch.Tensor | None = None,
        pos: torch.Tensor | None = None,
        n_new: Sequence[int] | torch.Tensor | None = None,
        last_only: bool = True,
        pack: bool = True,
    ) -> torch.Tensor:
        """Append ``idx`` to cache ``rows`` and return logits (see the module docstring)."""
        step = _Step(cache, idx, rows, pos, n_new, self.config.block_size, pack)
        if step.packed:  # rows of different lengths: only their real tokens go through the blocks
            x = self.transformer.wte(idx[step.valid]) + self.transformer.wpe(step.pos[step.valid])
        else:
            x = self.transformer.wte(idx) + self.transformer.wpe(step.pos)
        for i, block in enumerate(self.transformer.h):
            x = block(x, step, i)
        if last_only:
            if step.uniform:
                x = x[:, -1, :]
            elif step.packed:
                x = x[step.last]
            else:
                x = x[torch.arange(x.size(0), device=x.device), step.n_new_dev - 1]
        elif step.packed:
            x = step.unpack(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        step.commit()
        return logits

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None):
        """nanoGPT's sampling loop (for quick samples in training scripts), on the KV cache.

        One row per sequence; the chat engine has its own loop with stop rules.
        """
        B = idx.size(0)
        idx = idx[:, -self.config.block_size :]
        cache = self.new_cache(max_batch=B, max_len=min(idx.size(1) + max_new_tokens, self.config.block_size))
        logits = self.forward_cached(idx, cache)
        out = [idx]
        for i in range(max_new_tokens):
            logits = logits / max(temperature, 1e-8)
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            nxt = torch.multinomial(F.softmax(logits.float(), dim=-1), num_samples=1)
            out.append(nxt)
            if i == max_new_tokens - 1 or cache.lengths.max().item() >= cache.max_len:
                break
            logits = self.forward_cached(nxt, cache)
        return torch.cat(out, dim=1)

    # --- nanoGPT training helpers ------------------------------------------------------

    def crop_block_size(self, block_size: int) -> None:
        """Shrink the context window (e.g. to fine-tune GPT-2 with a smaller block)."""
        if block_size > self.config.block_size:
            raise ValueError(f"cannot grow block_size from {self.config.block_size} to {block_size}")
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    def configure_optimizers(self, weight_decay: float, learning_rate: float, betas, device_type: str):
        """AdamW with decay on matrices only (nanoGPT's recipe); fused where available."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        fused_ok = "fused" in inspect.signature(torch.optim.AdamW).parameters
        extra = dict(fused=True) if fused_ok and device_type in ("cuda", "cpu") else dict()
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **extra)


class KVCache:
    """Keys and values for up to ``max_batch`` independent rows.

    ``on_demand`` (CPU only): memory is taken as tokens are written and returned on
    ``reset``; otherwise the whole shape is allocated up front (other devices)."""

    def __init__(
        self,
        config: GPTConfig,
        max_batch: int = 1,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        zeroed: bool = True,
        on_demand: bool = True,
    ):
        self.max_len = max_len or config.block_size
        self.max_batch = max_batch
        hd = config.n_embd // config.n_head
        shape = (config.n_layer, max_batch, config.n_head, self.max_len, hd)
        self._map: mmap.mmap | None = None
        if on_demand and torch.device(device or "cpu").type == "cpu" and hasattr(mmap, "MAP_PRIVATE"):  # not Windows
            self.k, self.v = self._reserve(shape, dtype)
        else:
            # Zeroed by default: ragged batches mask stale slots, and a masked NaN would
            # still poison the attention sum. A single row filled in order never reads a
            # slot before writing it, so it may skip the zeroing.
            alloc = torch.zeros if zeroed else torch.empty
            self.k = alloc(shape, device=device, dtype=dtype)
            self.v = alloc(shape, device=device, dtype=dtype)
        self.lengths = torch.zeros(max_batch, dtype=torch.long)  # on the CPU: read every step

    def _reserve(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """k and v in one anonymous mapping: zero-filled, and resident only where written.

        Each (layer, row) block is padded to whole pages, so resetting a row can hand
        its pages back (``_release``) without touching its neighbours.
        """
        L, B, H, T, D = shape
        itemsize = torch.empty((), dtype=dtype).element_size()
        per_page = mmap.PAGESIZE // itemsize
        row_items = -(-H * T * D // per_page) * per_page  # one (layer, row) block, rounded up to pages
        # private: MADV_DONTNEED on a shared mapping would keep the contents (and the memory)
        self._map = mmap.mmap(-1, 2 * L * B * row_items * itemsize, flags=mmap.MAP_PRIVATE)
        if hasattr(self._map, "madvise") and hasattr(mmap, "MADV_NOHUGEPAGE"):
            self._map.madvise(mmap.MADV_NOHUGEPAGE)  # a 2 MiB huge page would hold ~85 rows' worth of one token
        self._row_bytes = row_items * itemsize
        flat = torch.frombuffer(self._map, dtype=dtype).view(2, L, B, row_items)
        kv = flat[..., : H * T * D].unflatten(-1, (H, T, D))
        return kv[0], kv[1]

    def _release(self, rows: Sequence[int], layers: Sequence[int] | None = None) -> None:
        """Hand the pages of ``rows`` (in ``layers``, default all) back to the OS; they read as zeros until written again."""
        if self._map is None or not rows:
            return
        L, B = self.k.shape[:2]
        layers = range(L) if layers is None else layers
        if sys.platform != "linux":  # elsewhere MADV_DONTNEED may keep the old contents: zero them instead
            idx = torch.as_tensor(list(rows), dtype=torch.long)
            for layer in layers:
                self.k[layer, idx] = 0
                self.v[layer, idx] = 0
            return
        if len(rows) == B and len(layers) == L:
            self._map.madvise(mmap.MADV_DONTNEED)
            return
        for half in range(2):
            for layer in layers:
                for row in rows:
                    self._map.madvise(mmap.MADV_DONTNEED, ((half * L + layer) * B + row) * self._row_bytes, self._row_bytes)

    def length(self, row: int) -> int:
        return int(self.lengths[row])

    def reset(self, rows: Sequence[int] | int | None = None) -> None:
        """Drop rows (all by default): their lengths become 0 and their memory is returned."""
        if rows is None:
            self._release(range(self.max_batch))
            self.lengths.zero_()
        else:
            rows_t = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
            self._release(rows_t.tolist())
            self.lengths[rows_t] = 0

    def truncate(self, row: int, length: int) -> None:
        """Keep only the first ``length`` tokens of ``row`` (rewind to a shared prefix)."""
        if not 0 <= length <= self.length(row):
            raise ValueError(f"row {row} holds {self.length(row)} tokens; cannot truncate to {length}")
        self.lengths[row] = length

    def copy_row(self, src: int, dst: int, length: int | None = None) -> None:
        """Make ``dst`` hold the first ``length`` tokens of ``src`` (default: all of them)."""
        n = self.length(src) if length is None else length
        if not 0 <= n <= self.length(src):
            raise ValueError(f"row {src} holds {self.length(src)} tokens; cannot copy {n}")
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.lengths[dst] = n

    def snapshot(self, row: int, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of ``row``'s first ``length`` tokens: k, v of ``[n_layer, n_head, length, head_dim]``."""
        n = self.length(row) if length is None else length
        if not 0 <= n <= self.length(row):
            raise ValueError(f"row {row} holds {self.length(row)} tokens; cannot snapshot {n}")
        return self.k[:, row, :, :n].clone(), self.v[:, row, :, :n].clone()

    def take(self, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``snapshot(row)`` then ``reset(row)``, one layer at a time: each layer's pages are handed
        back as soon as they are copied, so moving a finished conversation into the prefix cache
        never holds its keys and values twice (a 512-token row is ~38 MB in fp32)."""
        n = self.length(row)
        L, _, H, _, D = self.k.shape
        k = torch.empty((L, H, n, D), dtype=self.k.dtype, device=self.k.device)
        v = torch.empty_like(k)
        for layer in range(L):
            k[layer] = self.k[layer, row, :, :n]
            v[layer] = self.v[layer, row, :, :n]
            self._release([row], layers=[layer])
        self.lengths[row] = 0
        return k, v

    def restore(self, row: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Fill ``row`` from a ``snapshot`` (of this cache or another with the same shapes)."""
        n = k.size(2)
        L, _, H, _, D = self.k.shape
        if k.dim() != 4 or k.shape != v.shape or (k.size(0), k.size(1), k.size(3)) != (L, H, D) or n > self.max_len:
            raise ValueError(f"snapshot of shape {tuple(k.shape)} does not fit this cache")
        self.k[:, row, :, :n] = k
        self.v[:, row, :, :n] = v
        self.lengths[row] = n

    def nbytes(self) -> int:
        """Bytes reserved for k and v (on demand: address space, resident only where written)."""
        return len(self._map) if self._map is not None else self.k.element_size() * self.k.numel() * 2


class _Step:
    """One ``forward_cached`` call's plan: where the new keys go and what each query sees.

    Built once per call so the per-layer work is just a write and a read.
    """

    def __init__(self, cache: KVCache, idx: torch.Tensor, rows, pos, n_new, block_size: int, pack: bool = True):
        B, T = idx.shape
        self.packed = False
        dev = cache.k.device
        if rows is None:
            if B > cache.max_batch:
                raise ValueError(f"batch of {B} rows but the cache has {cache.max_batch}")
            rows_t = torch.arange(B)
        else:
            rows_t = torch.as_tensor(rows, dtype=torch.long).cpu()
            if rows_t.shape != (B,):
                raise ValueError(f"rows must name one cache row per batch entry ({B}), got {tuple(rows_t.shape)}")
            if len(set(rows_t.tolist())) != B:
                raise ValueError("rows must be distinct")
        n_new_t = torch.full((B,), T, dtype=torch.long) if n_new is None else torch.as_tensor(n_new, dtype=torch.long).cpu()
        if n_new_t.shape != (B,) or bool((n_new_t < 1).any()) or bool((n_new_t > T).any()):
            raise ValueError(f"n_new must hold {B} counts in 1..{T}")
        start = cache.lengths[rows_t]
        end = start + n_new_t
        if int(end.max()) > cache.max_len:
            raise ValueError(f"cache row overflow: {int(end.max())} tokens > max_len {cache.max_len}")
        if pos is None:
            # a ragged batch pads short rows to T; their padding repeats the row's last position, so a row
            # near the end of the window (start + n_new <= block_size < start + T) stays inside it
            pos = torch.minimum(start[:, None] + torch.arange(T)[None, :], (end - 1)[:, None])
        elif pos.shape != (B, T):
            raise ValueError(f"pos must be [B, T] = [{B}, {T}], got {tuple(pos.shape)}")
        if int(pos.max()) >= block_size or int(pos.min()) < 0:
            raise ValueError(f"positions must lie in 0..{block_size - 1}")
        self.cache, self.rows, self.start, self.n_new, self.end = cache, rows_t, start, n_new_t, end
        self.pos = pos.to(dev)
        self.n_new_dev = n_new_t.to(dev)
        L = int(end.max())
        r0 = int(rows_t[0])
        contiguous = bool((rows_t == torch.arange(r0, r0 + B)).all())
        self.uniform = contiguous and bool((n_new_t == T).all()) and bool((start == start[0]).all())
        if self.uniform:
            # the common case (one conversation, or a batch in lock step): plain slices, views only
            s0 = int(start[0])
            self.rsl, self.wsl, self.L = slice(r0, r0 + B), slice(s0, s0 + T), s0 + T
            self.causal = s0 == 0 and T > 1
            self.mask = None
            if s0 > 0 and T > 1:  # new tokens see the whole cache and the new tokens before them
                j = torch.arange(self.L, device=dev)
                self.mask = j[None, :] <= (s0 + torch.arange(T, device=dev))[:, None]
            return
        # general case: ragged rows; gather them, write only real tokens
        t = torch.arange(T)
        valid = t[None, :] < n_new_t[:, None]  # [B, T]
        self.valid = valid.to(dev)
        self.w_rows = rows_t[:, None].expand(B, T)[valid].to(dev)
        self.w_slots = (start[:, None] + t[None, :])[valid].to(dev)
        self.rows_dev = rows_t.to(dev)
        # contiguous rows (a compacted decode batch) are read as a view; a gather would
        # copy every row's whole cache on every layer, costing as much as the matmuls
        self.read_rows = slice(r0, r0 + B) if contiguous else self.rows_dev
        self.L = L
        # a padded query behaves like its row's last real token, so it never reads a stale slot
        last = start[:, None] + torch.minimum(t[None, :], n_new_t[:, None] - 1)  # [B, T]
        j = torch.arange(L)
        self.mask = (j[None, None, :] <= last[:, :, None])[:, None].to(dev)  # [B, 1, T, L]
        self.causal = False
        # Rows of different lengths (prompts arriving together): the matrix products, nearly all of a
        # prompt's cost, run on the real tokens only, not on B x T (the padding was ~1/3 of them under load)
        self.packed = pack and bool((n_new_t < T).any())
        if self.packed:
            self.last = (torch.cumsum(n_new_t, 0) - 1).to(dev)  # each row's last real token, packed

    def unpack(self, t: torch.Tensor) -> torch.Tensor:
        """Packed ``[N, X]`` (the real tokens, row after row) as padded ``[B, T, X]``, zeros in the padding."""
        out = t.new_zeros(*self.valid.shape, t.size(-1))
        out[self.valid] = t
        return out

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        """Padded ``[B, T, X]`` as packed ``[N, X]``."""
        return t[self.valid]

    def write_read(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ck, cv = self.cache.k[layer], self.cache.v[layer]
        if self.uniform:
            ck[self.rsl, :, self.wsl] = k
            cv[self.rsl, :, self.wsl] = v
            return ck[self.rsl, :, : self.L], cv[self.rsl, :, : self.L]
        # ck[rows, :, slots] indexes [N, nh, hs]; k.transpose(1, 2)[valid] is [N, nh, hs]
        ck[self.w_rows, :, self.w_slots] = k.transpose(1, 2)[self.valid]
        cv[self.w_rows, :, self.w_slots] = v.transpose(1, 2)[self.valid]
        return ck[self.read_rows, :, : self.L], cv[self.read_rows, :, : self.L]

    def commit(self) -> None:
        self.cache.lengths[self.rows] = self.end
