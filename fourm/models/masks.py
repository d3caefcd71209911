"""Attention masks as small pure functions. Every mask is a bool tensor of shape (B, 1, T, S),
True where query t may attend to key s, ready for ``layers.attention``.

A query row that would allow nothing (a padding query) is allowed to attend to itself, so no row
is empty and softmax never produces NaN; the outputs at padding positions are ignored anyway.
"""

from __future__ import annotations

import torch


def _no_empty_rows(mask: torch.Tensor) -> torch.Tensor:
    """Allow the diagonal in rows that allow nothing. mask (B, 1, T, S), T <= S."""
    empty = ~mask.any(-1, keepdim=True)  # (B, 1, T, 1)
    if not empty.any():
        return mask
    t, s = mask.shape[-2:]
    eye = torch.eye(t, s, dtype=torch.bool, device=mask.device)[None, None]
    return mask | (empty & eye)


def causal_mask(t: int, s: int | None = None, device=None) -> torch.Tensor:
    """(1, 1, T, S): query t sees keys 0 .. t + (S - T) (S > T when keys are cached)."""
    s = t if s is None else s
    return torch.ones(t, s, dtype=torch.bool, device=device).tril(diagonal=s - t)[None, None]


def padding_mask(valid: torch.Tensor) -> torch.Tensor:
    """(B, 1, 1, S) from key validity (B, S): padding keys are hidden."""
    return valid[:, None, None, :].bool()


def bidirectional_mask(valid: torch.Tensor) -> torch.Tensor:
    """(B, 1, S, S): every valid token sees every valid token. valid (B, S) bool."""
    valid = valid.bool()
    return _no_empty_rows(valid[:, None, :, None] & valid[:, None, None, :])


def prefix_lm_mask(prefix_len: torch.Tensor, t: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 1, T, T) PrefixLM: bidirectional within the first ``prefix_len[b]`` tokens, causal after.

    Args:
        prefix_len: (B,) int, per-sample prefix lengths (0 gives a causal mask).
        valid: optional (B, T) bool key validity.
    """
    i = torch.arange(t, device=prefix_len.device)
    causal = i[None, :, None] >= i[None, None, :]  # (1, T, T)
    in_prefix = i[None, None, :] < prefix_len[:, None, None]  # (B, 1, T) key in prefix
    mask = (causal | in_prefix)[:, None]  # (B, 1, T, T)
    if valid is not None:
        mask = mask & valid.bool()[:, None, None, :]
    return _no_empty_rows(mask)


def modality_decoder_mask(modality: torch.Tensor, causal: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) 4M's decoder self-attention mask.

    A target token attends only to targets of its own modality; tokens of sequence modalities
    (``causal`` True) only to those at or before them; image-like targets bidirectionally.

    Args:
        modality: (B, T) int modality index of each target token.
        causal: (B, T) bool, True for tokens of sequence modalities.
        valid: (B, T) bool, False at padding.
    """
    t = modality.shape[1]
    i = torch.arange(t, device=modality.device)
    same = modality[:, :, None] == modality[:, None, :]  # (B, T, T)
    before = i[None, :, None] >= i[None, None, :]
    mask = same & (before | ~causal.bool()[:, :, None]) & valid.bool()[:, None, :]
    return _no_empty_rows(mask[:, None])
