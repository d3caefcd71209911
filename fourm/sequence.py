"""The sequence layout both the objectives and the models read: the ignored label, the (row, col)
positions of tokens, and modalities laid out as one decoder-only sequence
``[BOS] <m1> ids </m1> <m2> ids </m2> ...``.

Positions: a 1D token at sequence step p has (row, col) = (p, p), i.e. ordinary RoPE. An image of
g x g tokens starting at step p0 puts token (r, c) at (p0 + r, p0 + c), and the sequence resumes
at p0 + g after it: the image spans g steps along both axes. The encoder-decoder's tokens keep
their own grid position (``grid_positions``) or step (``line_positions``), from 0 per modality.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fourm.vocab import SharedVocab

IGNORE_INDEX = -100  # a label that no loss counts (PyTorch's cross-entropy default)


def grid_positions(idx: np.ndarray, grid: int) -> np.ndarray:
    """(N,) row-major indices into a ``grid`` x ``grid`` token grid -> (N, 2) (row, col)."""
    return np.stack([idx // grid, idx % grid], -1)


def line_positions(n: int) -> np.ndarray:
    """(n, 2) positions (p, p) of a 1D sequence of ``n`` tokens."""
    p = np.arange(n)
    return np.stack([p, p], -1)


@dataclass
class PackedSequence:
    """One sample laid out for ``DecoderLM``.

    Attributes:
        ids: (T,) shared-vocabulary ids.
        positions: (T, 2) (row, col) RoPE positions.
        modality: (T,) index into the vocabulary's modality list (-1 for [BOS] and tags).
        spans: modality -> (start, stop) of its content tokens in ``ids`` (tags excluded).
    """

    ids: torch.Tensor
    positions: torch.Tensor
    modality: torch.Tensor
    spans: dict[str, tuple[int, int]]


def pack_sequence(segments: list[tuple[str, torch.Tensor]], vocab: SharedVocab, grids: dict[str, int] | None = None, bos: bool = True) -> PackedSequence:
    """Lay out ``[(modality, ids (L,)), ...]`` in order with begin/end tags.

    ``grids`` gives the side of each image-like modality's token grid (ids then have g*g entries,
    row-major); other modalities are 1D.
    """
    grids = grids or {}
    names = list(vocab.modalities)
    ids: list[torch.Tensor] = []
    pos: list[torch.Tensor] = []
    mod: list[torch.Tensor] = []
    spans: dict[str, tuple[int, int]] = {}
    step, length = 0, 0

    def put_1d(tokens: torch.Tensor, m: int) -> None:
        nonlocal step, length
        n = len(tokens)
        p = torch.arange(step, step + n)
        ids.append(tokens)
        pos.append(torch.stack([p, p], -1))
        mod.append(torch.full((n,), m))
        step += n
        length += n

    if bos:
        put_1d(torch.tensor([vocab.bos_id]), -1)
    for name, tokens in segments:
        tokens = torch.as_tensor(tokens, dtype=torch.long).flatten()
        put_1d(torch.tensor([vocab.begin_id(name)]), -1)
        start = length
        if name in grids:
            g = grids[name]
            if len(tokens) != g * g:
                raise ValueError(f"{name} needs {g * g} ids for a {g}x{g} grid, got {len(tokens)}")
            r, c = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
            ids.append(tokens)
            pos.append(torch.stack([step + r.flatten(), step + c.flatten()], -1))
            mod.append(torch.full((g * g,), names.index(name)))
            step += g
            length += g * g
        else:
            put_1d(tokens, names.index(name))
        spans[name] = (start, length)
        put_1d(torch.tensor([vocab.end_id(name)]), -1)
    return PackedSequence(ids=torch.cat(ids), positions=torch.cat(pos), modality=torch.cat(mod), spans=spans)
