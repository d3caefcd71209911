"""Discrete bottlenecks for the image-like tokenizers.

- ``FSQ``: finite scalar quantization (Mentzer et al., 2023): each latent channel is bounded and
  rounded to one of ``levels[i]`` values; the code index is the mixed-radix number of the digits.
  No codebook to learn, no collapse.
- ``VectorQuantizer``: VQ with an l2-normalised codebook (cosine similarity lookup, as in
  ViT-VQGAN and 4M), EMA codebook updates and restarts of dead codes from encoder outputs.

Both take ``z`` of shape (B, D, h, w) and return a ``Quantized`` with the straight-through
quantized latents (B, D, h, w), the code indices (B, h, w) and an auxiliary loss (a scalar).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Quantized:
    z_q: torch.Tensor  # (B, D, h, w), straight-through
    indices: torch.Tensor  # (B, h, w) int64
    loss: torch.Tensor  # scalar auxiliary loss (commitment); zero for FSQ


class FSQ(nn.Module):
    """Finite scalar quantization with ``prod(levels)`` codes; latent dim = ``len(levels)``."""

    def __init__(self, levels: list[int]):
        super().__init__()
        if any(lv < 2 for lv in levels):
            raise ValueError(f"FSQ levels must be >= 2, got {levels}")
        lv = torch.tensor(levels, dtype=torch.float32)
        self.register_buffer("levels", lv, persistent=False)
        basis = torch.cumprod(torch.tensor([1] + list(levels[:-1]), dtype=torch.int64), 0)
        self.register_buffer("basis", basis, persistent=False)
        self.codebook_size = int(torch.prod(lv).item())
        self.dim = len(levels)

    def _bound(self, z: torch.Tensor) -> torch.Tensor:
        # (B, h, w, D) -> each channel in [-(L-1)/2, (L-1)/2], shifted for even L so rounding gives L values
        half_l = (self.levels - 1) * (1 + 1e-3) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half_l)
        return torch.tanh(z + shift) * half_l - offset

    def forward(self, z: torch.Tensor) -> Quantized:
        z = z.float().permute(0, 2, 3, 1)  # (B, h, w, D)
        bounded = self._bound(z)
        rounded = bounded + (torch.round(bounded) - bounded).detach()
        half_w = torch.div(self.levels, 2, rounding_mode="floor")
        digits = (torch.round(bounded) + half_w).long()  # (B, h, w, D) in [0, L-1]
        indices = (digits * self.basis).sum(-1)
        z_q = (rounded / half_w).permute(0, 3, 1, 2)
        return Quantized(z_q=z_q, indices=indices, loss=z.new_zeros(()))

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, h, w) code indices -> (B, D, h, w) quantized latents."""
        digits = torch.div(indices[..., None], self.basis, rounding_mode="floor") % self.levels.long()
        half_w = torch.div(self.levels, 2, rounding_mode="floor")
        return ((digits.float() - half_w) / half_w).permute(0, 3, 1, 2)


class VectorQuantizer(nn.Module):
    """l2-normalised VQ with EMA updates and dead-code restarts.

    Args:
        codebook_size: number of codes.
        dim: code dimension (the encoder's output channels).
        beta: commitment loss weight.
        decay: EMA decay of code counts and sums.
        dead_threshold: a code whose EMA count falls below this is restarted from a random encoder
            output of the current batch (training only).
    """

    def __init__(self, codebook_size: int, dim: int, beta: float = 0.25, decay: float = 0.99, dead_threshold: float = 0.03):
        super().__init__()
        self.codebook_size, self.dim = codebook_size, dim
        self.beta, self.decay, self.dead_threshold = beta, decay, dead_threshold
        embed = F.normalize(torch.randn(codebook_size, dim), dim=1)
        self.register_buffer("embed", embed)
        self.register_buffer("ema_count", torch.ones(codebook_size))
        self.register_buffer("ema_sum", embed.clone())
        self.restarts = 0

    def forward(self, z: torch.Tensor) -> Quantized:
        b, d, h, w = z.shape
        flat = F.normalize(z.float().permute(0, 2, 3, 1).reshape(-1, d), dim=1)  # (N, D)
        indices = (flat @ self.embed.t()).argmax(1)  # cosine similarity
        z_q = self.embed[indices]
        if self.training:
            self._ema_update(flat.detach(), indices)
        loss = self.beta * F.mse_loss(flat, z_q.detach())
        z_q = flat + (z_q - flat).detach()
        return Quantized(z_q=z_q.view(b, h, w, d).permute(0, 3, 1, 2), indices=indices.view(b, h, w), loss=loss)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, indices: torch.Tensor) -> None:
        onehot = F.one_hot(indices, self.codebook_size).type(flat.dtype)  # (N, K)
        self.ema_count.mul_(self.decay).add_(onehot.sum(0), alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(onehot.t() @ flat, alpha=1 - self.decay)
        self.embed.copy_(F.normalize(self.ema_sum, dim=1))
        dead = self.ema_count < self.dead_threshold
        n_dead = int(dead.sum())
        if n_dead:
            pick = torch.randint(0, flat.shape[0], (n_dead,), device=flat.device)
            self.embed[dead] = flat[pick]
            self.ema_sum[dead] = flat[pick]
            self.ema_count[dead] = 1.0
            self.restarts += n_dead

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, h, w) code indices -> (B, D, h, w) code vectors."""
        return self.embed[indices].permute(0, 3, 1, 2)
