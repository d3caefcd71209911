"""What both architectures' configs share: the block sizes and their checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from fourm.models.layers import BlockConfig, rope_inv_freq


def llama_mlp_hidden(dim: int, multiple_of: int = 64) -> int:
    """Llama's SwiGLU width: 2/3 of 4*dim, rounded up to a multiple."""
    hidden = int(2 * 4 * dim / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass
class TransformerConfig:
    """Fields common to ``DecoderConfig`` and ``EncDecConfig``; ``vocab_size``, ``modalities`` and
    ``modality_ranges`` come from the tokenizer set's vocabulary
    (``fourm.models.build.config_from_vocab``)."""

    ARCH: ClassVar[str] = ""
    arch: str = ""
    vocab_size: int = 0
    modalities: list[str] = field(default_factory=list)
    # modality -> list of [start, stop) id ranges its tokens may take (EOS included for sequences)
    modality_ranges: dict[str, list[list[int]]] = field(default_factory=dict)
    # id ranges whose ids are ordered values (the box coordinate bins), from the vocabulary
    ordinal_ranges: list[list[int]] = field(default_factory=list)
    # > 0: a target id in ``ordinal_ranges`` is trained towards a Gaussian over its neighbours of
    # this standard deviation in ids (``layers.ordinal_kl``) instead of the one id alone
    ordinal_sigma: float = 0.0
    dim: int = 256
    n_heads: int = 4
    n_kv_heads: int = 4
    mlp_hidden: int = 0  # 0: Llama's rule from dim
    qk_norm: str = "none"  # none | rms | layernorm (Chameleon)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    z_loss: float = 0.0
    # the residual branches' output projections (attention and cross-attention ``wo``, the MLP's
    # ``down``) start at zero, so every block starts as the identity (modded-nanogpt's init)
    zero_init_out: bool = False
    attention_backend: str = "sdpa"

    def __post_init__(self) -> None:
        if self.arch != self.ARCH:
            raise ValueError(f"{type(self).__name__}.arch must be {self.ARCH!r}, got {self.arch!r}")
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(f"dim ({self.dim}) must split into n_heads ({self.n_heads}) heads of even size")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if not self.ordinal_sigma >= 0:
            raise ValueError(f"ordinal_sigma must be >= 0, got {self.ordinal_sigma}")
        if self.mlp_hidden == 0:
            self.mlp_hidden = llama_mlp_hidden(self.dim)

    def ordinal(self) -> tuple[list[list[int]], float] | None:
        """(ordinal_ranges, ordinal_sigma) for the losses, or None when the soft targets are off."""
        return (self.ordinal_ranges, self.ordinal_sigma) if self.ordinal_sigma > 0 and self.ordinal_ranges else None

    def block_config(self) -> BlockConfig:
        return BlockConfig(self.dim, self.n_heads, self.n_kv_heads, self.mlp_hidden, self.qk_norm, self.norm_eps, self.attention_backend)

    def rope_inv_freq(self, device=None) -> torch.Tensor:
        """RoPE inverse frequencies (float32), computed per forward (a few scalar ops) rather than
        kept as a buffer, so that they stay float32 when the model is cast to bfloat16."""
        return rope_inv_freq(self.dim // self.n_heads, self.rope_theta, device)
