"""Transformer building blocks shared by both architectures (single-device code).

- ``RMSNorm``; RoPE for 1D and 2D positions as pure functions; ``Attention`` with grouped-query
  heads, fused QKV, optional QK-norm (RMSNorm, or LayerNorm with per-head affine as Chameleon uses),
  a KV cache, and ``CrossAttention``; ``SwiGLU``; pre-norm ``Block``.
- Every attention goes through ``attention()``: PyTorch SDPA by default, xformers on CUDA when
  asked for by name, a plain reference for tests.

RoPE with 2D positions: positions are (row, col) pairs. Rotary pair i (dims i and i + D/2, Llama's
layout) turns by ``pos[i % 2] * inv_freq[i]``: even pairs follow the row, odd pairs the column.
A 1D token has row == col == its position, which makes this exactly Llama's RoPE, so text-only
sequences match Hugging Face Llama/Chameleon numerically.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from fourm.sequence import IGNORE_INDEX

ATTENTION_BACKENDS = ("sdpa", "reference", "xformers")


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 (as Llama)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class HeadLayerNorm(nn.Module):
    """LayerNorm over the head dimension with a per-head weight and bias, shape (n_heads, head_dim)
    (Chameleon's QK-norm)."""

    def __init__(self, n_heads: int, head_dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_heads, head_dim))
        self.bias = nn.Parameter(torch.zeros(n_heads, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, H, D)
        return F.layer_norm(x, x.shape[-1:], None, None, self.eps) * self.weight + self.bias


# -- rotary position embedding -------------------------------------------------------------------
def rope_inv_freq(head_dim: int, theta: float = 10000.0, device=None) -> torch.Tensor:
    """(head_dim // 2,) float32 inverse frequencies, Llama's."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables for 1D or 2D positions.

    Args:
        positions: (B, T) 1D positions, or (B, T, 2) (row, col) positions.
        inv_freq: (D/2,) from ``rope_inv_freq``.
    Returns:
        cos, sin: (B, T, D) float32.
    """
    if positions.dim() == 2:
        positions = positions[..., None].expand(*positions.shape, 2)
    pos = positions.float()  # (B, T, 2)
    axis = torch.arange(inv_freq.shape[0], device=pos.device) % 2  # pair i follows row (0) or col (1)
    angles = pos[..., axis] * inv_freq.to(pos.device)  # (B, T, D/2)
    angles = torch.cat([angles, angles], -1)  # (B, T, D)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D) rotated by tables (B, T, D)."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    return x * cos + rotate_half(x) * sin


# -- attention -----------------------------------------------------------------------------------
CAUSAL = "causal"  # a mask value: lower-triangular over T == S keys, no padding (no tensor built)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | str | None, backend: str = "sdpa") -> torch.Tensor:
    """Scaled dot-product attention with grouped-query heads.

    Args:
        q: (B, H, T, D); k, v: (B, Hkv, S, D) with H a multiple of Hkv.
        mask: (B, 1 or H, T, S) bool, True where attention is allowed; None for full attention;
            ``CAUSAL`` for a causal mask without padding (SDPA's ``is_causal``: no dense tensor).
        backend: ``sdpa`` (PyTorch), ``reference`` (plain matmul/softmax, for tests) or
            ``xformers`` (CUDA only; falls back to an error elsewhere).
    Returns:
        (B, H, T, D).
    """
    h, hkv = q.shape[1], k.shape[1]
    causal = isinstance(mask, str)
    if causal:
        if mask != CAUSAL or q.shape[2] != k.shape[2]:
            raise ValueError(f"mask {mask!r}: only {CAUSAL!r} over as many keys as queries")
        mask = None if backend == "sdpa" else torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()[None, None]
    if h != hkv:
        k = k.repeat_interleave(h // hkv, dim=1)
        v = v.repeat_interleave(h // hkv, dim=1)
    if backend == "sdpa" and q.shape[2] == 1 and q.device.type == "cpu" and q.dtype == torch.bfloat16:
        # one query (a decoding step): PyTorch's CPU flash kernel is ~4x slower in bfloat16 than in
        # float32 at this shape (215 vs 56 us for batch 8, 90 keys), so attend in float32
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask).to(q.dtype)
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    if backend == "reference":
        scores = (q.float() @ k.float().transpose(-1, -2)) / q.shape[-1] ** 0.5
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return (scores.softmax(-1).nan_to_num(0.0) @ v.float()).to(q.dtype)
    if backend == "xformers":
        if not q.is_cuda:
            raise RuntimeError("the xformers attention backend needs CUDA tensors")
        import xformers.ops as xops  # optional GPU extra

        bias = None
        if mask is not None:
            bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf")).expand(q.shape[0], h, q.shape[2], k.shape[2])
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias)
        return out.transpose(1, 2)
    raise ValueError(f"unknown attention backend {backend!r}; known: {', '.join(ATTENTION_BACKENDS)}")


# Training forwards skip padding (``Unpadded``); the benchmark turns this off for its reference.
SKIP_PADDING = True


@dataclass
class Unpadded:
    """Where the real tokens of a padded (B, T) batch sit, for training forwards that skip padding:
    the linear layers, norms and MLPs run on the N real tokens only, as (1, N, C); ``Attention``
    puts them back at their (B, T) places around SDPA (``pad`` / ``unpad``). Same values at the
    real tokens as the padded forward; padding is often a sixth of a batch's slots.

    Attributes:
        index: (N,) the real tokens' places in the flattened (B * T) batch, in order.
        batch, length: B and T.
    """

    index: torch.Tensor
    batch: int
    length: int

    @classmethod
    @torch.compiler.disable  # data-dependent (a host sync and nonzero): run eagerly, without dynamo's graph-break warning
    def of(cls, valid: torch.Tensor, needed: torch.Tensor | None = None) -> "Unpadded | None":
        """From a (B, T) mask, nonzero at real tokens; None when there is no padding to skip,
        ``SKIP_PADDING`` is off, or a place in ``needed`` ((K,) places in the flattened batch
        whose states the caller reads, e.g. the labelled positions) is padding: the caller then
        runs padded, which serves any input."""
        if not SKIP_PADDING or bool(valid.all()):
            return None
        flat = valid.reshape(-1)
        if needed is not None and not bool(flat[needed].all()):
            return None
        return cls(flat.nonzero()[:, 0], valid.shape[0], valid.shape[1])

    def rows(self, flat: torch.Tensor) -> torch.Tensor:
        """(K,) places of real tokens in the flattened (B * T) batch -> their rows of (1, N, C)
        (a place of padding would map to the next real token's row: see ``of``'s ``needed``)."""
        return torch.searchsorted(self.index, flat)

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (1, N, C)."""
        return x.reshape(self.batch * self.length, -1).index_select(0, self.index)[None]

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(1, N, C) -> (B, T, C), zeros at padding."""
        return x.new_zeros(self.batch * self.length, x.shape[-1]).index_copy(0, self.index, x[0]).view(self.batch, self.length, -1)


class KVCache:
    """Keys and values seen so far by one attention layer, in a pre-allocated buffer.

    Dynamic (default): ``append`` writes the new (B, Hkv, T, D) keys/values after the cached ones
    and returns views (B, Hkv, S, D) of everything cached (no concatenation per decoded token); the
    buffer doubles when full. Static (``static=True``, for compiled decoding): ``append(k, v,
    position)`` writes at the given slots (T,) and returns the whole (B, Hkv, capacity, D) buffer,
    so every step has the same shapes; the caller's mask hides slots not written yet.
    """

    def __init__(self, capacity: int = 256, static: bool = False):
        self.capacity, self.static = capacity, static
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.length = 0

    def _reserve(self, like: torch.Tensor, n: int) -> None:
        if self.k is not None and n <= self.k.shape[2]:
            return
        size = max(n, self.capacity, 2 * (self.k.shape[2] if self.k is not None else 0))
        shape = (*like.shape[:2], size, like.shape[3])
        k, v = like.new_empty(shape), like.new_empty(shape)
        if self.k is not None:
            k[:, :, : self.length], v[:, :, : self.length] = self.k[:, :, : self.length], self.v[:, :, : self.length]
        self.k, self.v = k, v

    def append(self, k: torch.Tensor, v: torch.Tensor, position: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.static:
            if position is None:
                raise ValueError("a static KV cache needs the positions (cache_position) to write")
            if self.k is None:
                shape = (*k.shape[:2], self.capacity, k.shape[3])
                self.k, self.v = k.new_zeros(shape), k.new_zeros(shape)
            self.k.index_copy_(2, position, k.to(self.k.dtype))
            self.v.index_copy_(2, position, v.to(self.v.dtype))
            return self.k, self.v
        end = self.length + k.shape[2]
        if self.k is not None and self.k.dtype != k.dtype:  # autocast switched on or off between calls
            self.k, self.v = self.k.to(k.dtype), self.v.to(k.dtype)
        self._reserve(k, end)
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


def _qk_norm(kind: str, n_heads: int, head_dim: int, eps: float) -> nn.Module | None:
    if kind == "none":
        return None
    if kind == "rms":
        return RMSNorm(head_dim, eps)
    if kind == "layernorm":
        return HeadLayerNorm(n_heads, head_dim, eps)
    raise ValueError(f"qk_norm must be 'none', 'rms' or 'layernorm', got {kind!r}")


class Attention(nn.Module):
    """Self-attention: fused QKV, GQA, optional QK-norm (applied per head before RoPE), RoPE, KV cache."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, qk_norm: str = "none", eps: float = 1e-5, backend: str = "sdpa"):
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        self.n_heads, self.n_kv_heads, self.head_dim, self.backend = n_heads, n_kv_heads, head_dim, backend
        self.wqkv = nn.Linear(dim, (n_heads + 2 * n_kv_heads) * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=False)
        self.q_norm = _qk_norm(qk_norm, n_heads, head_dim, eps)
        self.k_norm = _qk_norm(qk_norm, n_kv_heads, head_dim, eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None = None, cache_position: torch.Tensor | None = None, layout: Unpadded | None = None) -> torch.Tensor:
        """x (B, T, dim); cos/sin (B, T, D); mask (B, 1, T, S) with S = cached + T (a static
        cache: S = its capacity, ``cache_position`` (T,) the slots written) -> (B, T, dim).
        ``layout``: x is the batch's real tokens only, (1, N, dim) -> (1, N, dim)."""
        qkv = self.wqkv(x)
        if layout is not None:
            qkv = layout.pad(qkv)
        b, t, _ = qkv.shape
        q, k, v = qkv.split([self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim], dim=-1)
        q = q.view(b, t, self.n_heads, self.head_dim)  # (B, T, H, D)
        k = k.view(b, t, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)  # (B, H, T, D)
        k = apply_rope(k.transpose(1, 2), cos, sin)
        v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.append(k, v, cache_position)
        out = attention(q, k, v, mask, self.backend).transpose(1, 2).reshape(b, t, -1)  # (B, T, H * D)
        return self.wo(layout.unpad(out) if layout is not None else out)


class CrossAttention(nn.Module):
    """Attention from queries x to a context (the encoder output). With rotary tables for both
    (queries at their positions, keys at the context tokens' own), the scores depend on where a
    query sits relative to each context token, as in self-attention: a target query at (row, col)
    can find the input tokens at the same place (offset 0)."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, qk_norm: str = "none", eps: float = 1e-5, backend: str = "sdpa"):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim, self.backend = n_heads, n_kv_heads, head_dim, backend
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.wkv = nn.Linear(dim, 2 * n_kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=False)
        self.q_norm = _qk_norm(qk_norm, n_heads, head_dim, eps)
        self.k_norm = _qk_norm(qk_norm, n_kv_heads, head_dim, eps)

    def context_kv(self, context: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None, layout: Unpadded | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Context (B, S, dim) -> k, v (B, Hkv, S, D), keys rotated by ``rope`` = the context's
        (cos, sin) tables (B, S, D) when given; computed once per generation. ``layout``: the
        context is its real tokens only, (1, N, dim); k and v are zero at padding."""
        kv = self.wkv(context)
        if layout is not None:
            kv = layout.pad(kv)
        b, s, _ = kv.shape
        k, v = kv.chunk(2, dim=-1)
        k = k.view(b, s, self.n_kv_heads, self.head_dim)
        if self.k_norm is not None:
            k = self.k_norm(k)
        k = k.transpose(1, 2)
        if rope is not None:
            k = apply_rope(k, *rope)
        return k, v.view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None, rope: tuple[torch.Tensor, torch.Tensor] | None = None, layout: Unpadded | None = None) -> torch.Tensor:
        """x (B, T, dim); kv from ``context_kv``; mask (B, 1, 1 or T, S); ``rope`` the queries'
        (cos, sin) tables (B, T, D) when the keys were rotated too -> (B, T, dim). ``layout``:
        x is the real queries only, (1, N, dim) -> (1, N, dim)."""
        q = self.wq(x)
        if layout is not None:
            q = layout.pad(q)
        b, t, _ = q.shape
        q = q.view(b, t, self.n_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
        q = q.transpose(1, 2)
        if rope is not None:
            q = apply_rope(q, *rope)
        out = attention(q, kv[0], kv[1], mask, self.backend).transpose(1, 2).reshape(b, t, -1)
        return self.wo(layout.unpad(out) if layout is not None else out)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


@dataclass
class BlockConfig:
    """Sizes shared by every block of a model."""

    dim: int
    n_heads: int
    n_kv_heads: int
    mlp_hidden: int
    qk_norm: str = "none"
    norm_eps: float = 1e-5
    attention_backend: str = "sdpa"

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


class Block(nn.Module):
    """Pre-norm residual block: self-attention, optional cross-attention, SwiGLU."""

    def __init__(self, cfg: BlockConfig, cross: bool = False):
        super().__init__()
        hd = cfg.head_dim
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg.dim, cfg.n_heads, cfg.n_kv_heads, hd, cfg.qk_norm, cfg.norm_eps, cfg.attention_backend)
        self.cross_norm = RMSNorm(cfg.dim, cfg.norm_eps) if cross else None
        self.cross = CrossAttention(cfg.dim, cfg.n_heads, cfg.n_kv_heads, hd, cfg.qk_norm, cfg.norm_eps, cfg.attention_backend) if cross else None
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.dim, cfg.mlp_hidden)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None, context_kv=None, context_mask=None, cache_position=None, cross_rope: bool = False, layout: Unpadded | None = None) -> torch.Tensor:
        """x (B, T, dim) -> (B, T, dim); ``cross_rope``: rotate the cross-attention queries by
        (cos, sin) too (their keys were, by ``CrossAttention.context_kv``); ``layout``: x holds
        the real tokens only, (1, N, dim) -> (1, N, dim)."""
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, cache_position, layout)
        if self.cross is not None:
            x = x + self.cross(self.cross_norm(x), context_kv, context_mask, (cos, sin) if cross_rope else None, layout)
        return x + self.mlp(self.mlp_norm(x))


# Set by compiled decoding (fourm.generation.compiled) while it traces: Inductor's C++ GEMM template
# (max-autotune over frozen weights, torch 2.13) ignores the storage offset of a constant weight that
# is a row slice of another, so a span's rows starting past 0 gave wrong logits; gathered with
# index_select they are a tensor of their own, which freezing folds into one constant.
GATHER_SPAN_WEIGHT = False


def output_logits(head: nn.Module, h: torch.Tensor, span: tuple[int, int] | None = None) -> torch.Tensor:
    """The output layer on h (..., dim) -> (..., V), or only its rows lo..hi-1 of ``span`` ->
    (..., hi - lo). The full pass calls the module (so ZeRO-3 gathering and peft wrappers apply);
    a span multiplies by a view of a plain ``nn.Linear``'s weight (no copy), else slices."""
    if span is None:
        return head(h)
    if type(head) is nn.Linear and head.bias is None and not hasattr(head.weight, "ds_id"):  # ZeRO-3 weights are gathered by the module's call
        if GATHER_SPAN_WEIGHT:
            return F.linear(h, head.weight.index_select(0, torch.arange(span[0], span[1], device=h.device)))
        return F.linear(h, head.weight[span[0] : span[1]])
    return head(h)[..., span[0] : span[1]]


def z_loss(logits: torch.Tensor, weight: float) -> torch.Tensor:
    """weight * mean(logsumexp(logits)^2): keeps the softmax normaliser near 1 (PaLM, Chameleon)."""
    return weight * torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def modality_tables(vocab_size: int, modalities: list[str], modality_ranges: dict[str, list[list[int]]]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """The ids each modality's tokens may take, from a config's ``modality_ranges``.

    Returns (allowed (M, V) bool, spans): row i marks modality ``modalities[i]``'s ids, and
    ``spans[i]`` is the smallest id range [lo, hi) holding them (the whole vocabulary for a
    modality without ranges)."""
    allowed = torch.zeros(len(modalities), vocab_size, dtype=torch.bool)
    spans = []
    for i, m in enumerate(modalities):
        ranges = modality_ranges.get(m) or [[0, vocab_size]]
        for start, stop in ranges:
            allowed[i, start:stop] = True
        spans.append((min(r[0] for r in ranges), max(r[1] for r in ranges)))
    return allowed, spans


def ordinal_targets(y: torch.Tensor, start: int, stop: int, sigma: float) -> torch.Tensor:
    """Soft targets for ids that are ordered values (box coordinate bins): y (N,) ids in [start,
    stop) -> (N, stop - start) a Gaussian over the range centred on each id, standard deviation
    ``sigma`` ids, cut at the range's ends and normalised (one-hot as sigma -> 0)."""
    j = torch.arange(start, stop, device=y.device, dtype=torch.float32)
    return torch.softmax(-((j[None, :] - y[:, None].float()) ** 2) / (2 * sigma**2), dim=-1)


def ordinal_kl(logits: torch.Tensor, lo: int, y: torch.Tensor, ranges: list[list[int]], sigma: float, ce: torch.Tensor) -> torch.Tensor:
    """``ce`` (N,) with the rows whose target id ``y`` lies in one of ``ranges`` (ordered ids) replaced
    by KL(q || softmax(logits)), q the ``ordinal_targets`` around y: a bin next to the true one costs
    less than one far from it. logits (N, hi - lo) over ids [lo, hi); a range must lie inside it.
    The KL is 0 at the soft target, as the cross-entropy is at the one-hot one."""
    for start, stop in ranges:
        inside = (y >= start) & (y < stop)
        if not bool(inside.any()):
            continue
        if start < lo or stop > lo + logits.shape[-1]:
            raise ValueError(f"ordinal id range [{start}, {stop}) is outside the logits' ids [{lo}, {lo + logits.shape[-1]})")
        q = ordinal_targets(y[inside], start, stop, sigma)
        rows = logits[inside]
        logp = rows[:, start - lo : stop - lo] - torch.logsumexp(rows, dim=-1, keepdim=True)
        kl = (q * (q.clamp_min(1e-12).log() - logp)).sum(-1)
        ce = ce.masked_scatter(inside, kl)
    return ce


def row_cross_entropy(logits: torch.Tensor, y: torch.Tensor, ordinal: tuple[list[list[int]], float] | None = None, lo: int = 0) -> torch.Tensor:
    """Cross-entropy of each row of logits (N, V), whose columns are ids [lo, lo + V), against
    its target id y (N,); with ``ordinal`` (id ranges, sigma) the rows whose target lies in such a
    range get ``ordinal_kl`` instead. Returns (N,)."""
    ce = F.cross_entropy(logits, y - lo, reduction="none")
    return ordinal_kl(logits, lo, y, *ordinal, ce) if ordinal is not None else ce


def token_cross_entropy(logits: torch.Tensor, y: torch.Tensor, ordinal: tuple[list[list[int]], float] | None = None) -> torch.Tensor:
    """Mean ``row_cross_entropy`` of logits (N, V) over the whole vocabulary against y (N,)
    (IGNORE_INDEX rows left out)."""
    keep = y != IGNORE_INDEX
    logits, y = logits[keep].float(), y[keep]
    if not y.numel():
        return logits.sum() * 0.0
    return row_cross_entropy(logits, y, ordinal).mean()


def span_cross_entropy(head: nn.Module, h: torch.Tensor, y: torch.Tensor, groups: torch.Tensor, spans: list[tuple[int, int]], allowed: torch.Tensor, ordinal: tuple[list[list[int]], float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of each row of ``h`` with its softmax over its group's ids only: the output
    layer runs, per group, on that group's span of rows (``output_logits``), and ids in the span
    that the group does not allow are -inf.

    h (N, dim); y (N,) target ids; groups (N,) indices into ``spans`` / ``allowed`` (G, V), sorted
    (rows of one group together); ``ordinal`` (id ranges, sigma): rows whose target lies in such a
    range get ``ordinal_kl`` instead. Returns (ce (N,), lse (N,) logsumexp of each row's logits,
    for the z-loss), float32, in the rows' order."""
    # ZeRO-3 gathers the output layer at each call: call it exactly once on every rank (ranks
    # hold different groups, and a rank may have none), then slice the columns
    full = head(h) if hasattr(head.weight, "ds_id") else None
    ce, lse = [], []
    start = 0
    for g, n in zip(*torch.unique_consecutive(groups, return_counts=True)):
        lo, hi = spans[int(g)]
        rows = slice(start, start + int(n))
        start += int(n)
        logits = (full[rows, lo:hi] if full is not None else output_logits(head, h[rows], (lo, hi))).float()
        ok = allowed[int(g), lo:hi]
        if not bool(ok.all()):
            logits = logits.masked_fill(~ok, float("-inf"))
        ce.append(row_cross_entropy(logits, y[rows], ordinal, lo))
        lse.append(torch.logsumexp(logits, dim=-1))
    if not ce:  # no labelled token: zeros that keep the graph (the output layer's too: DDP, ZeRO-3's gathers) whole
        zero = h.sum() * 0.0 + (full.sum() * 0.0 if full is not None else sum(p.sum() for p in head.parameters()) * 0.0)
        return zero.reshape(1)[:0], zero.reshape(1)[:0]
    return torch.cat(ce), torch.cat(lse)
