"""Training examples from token dicts: what the models' forwards take.

- ``encdec_example``: a 4M masking plan -> encoder inputs (visible tokens, modality, 2D/1D
  positions) and decoder targets ([MASK] queries for image-like targets, teacher-forced sequences).
- ``decoder_example``: modalities in a random order as one sequence; next-token (everything is a
  target) or PrefixLM (the first k modalities are the condition: bidirectional, no loss).
- ``collate_encdec`` / ``collate_decoder`` pad a list of examples into batch tensors.
- ``image_patches``: an image's pixel patches in token order (for ``EncDecConfig.rgb_pixels``).

Conditioning dropout (for classifier-free guidance): the encoder sees only a [BOS] "null
condition" token, or the decoder-only sequence has no condition segments.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fourm.objectives.masking import ModalityPlan
from fourm.sequence import IGNORE_INDEX, grid_positions, line_positions, pack_sequence
from fourm.vocab import SharedVocab


@dataclass
class EncDecExample:
    """One sample for ``EncoderDecoder``: enc_* (S,), dec_* and labels (T,), positions (., 2)."""

    enc_ids: np.ndarray
    enc_modality: np.ndarray
    enc_positions: np.ndarray
    dec_ids: np.ndarray
    dec_modality: np.ndarray
    dec_positions: np.ndarray
    dec_causal: np.ndarray
    labels: np.ndarray
    enc_pixels: np.ndarray | None = None  # (S, C) uint8 pixel patch of each encoder token (zeros where none)
    enc_pixel_mask: np.ndarray | None = None  # (S,) bool: the token has its pixel patch
    # (S, p * p) class ids of each rgb input token's patch of a label map (-100 elsewhere), for the
    # encoder's dense auxiliary loss (``EncDecConfig.aux_labels``)
    enc_dense_labels: np.ndarray | None = None


DENSE_LABEL_INPUTS = "rgb"  # the input tokens whose patches of a label map the dense auxiliary loss predicts


def image_patches(image: np.ndarray, grid: int) -> np.ndarray:
    """An image (C, R, R) -> its (grid * grid, C * p * p) patches, p = R / grid, row-major like the
    tokens of a ``grid`` x ``grid`` image tokenizer (row i is token i's patch, channel-major)."""
    c, r, _ = image.shape
    p = r // grid
    if r != image.shape[2] or p * grid != r:
        raise ValueError(f"a {image.shape[1]}x{image.shape[2]} image does not split into a {grid}x{grid} grid of square patches")
    return image.reshape(c, grid, p, grid, p).transpose(1, 3, 0, 2, 4).reshape(grid * grid, c * p * p)


def encdec_example(tokens: dict[str, np.ndarray], plans: list[ModalityPlan], vocab: SharedVocab, grids: dict[str, int], drop_condition: bool = False, pixels: dict[str, np.ndarray] | None = None, dense_labels: np.ndarray | None = None) -> EncDecExample:
    """Apply a masking plan (``plan_masking``) to one sample's tokens.

    Sequence targets are teacher-forced: decoder input ``[BOS] t0 .. t(L-1)``, labels
    ``t0 .. t(L-1) [EOS]``, causal within the modality. ``pixels``: {image modality: (C, R, R)
    uint8} (the images the tokens were made from): the example then carries each visible token's
    pixel patch (``enc_pixels``, ``enc_pixel_mask``; see ``EncDecConfig.rgb_pixels``); ``{}``
    gives the fields without any patch. ``dense_labels``: an (R, R) class map on the rgb grid (R a
    multiple of it), or (K, R, R) maps (the class map, then ``object_extents``' four): the example
    then carries ``enc_dense_labels``, each rgb input token's patch of them, (S, K * p * p)
    channel-major (None: no field; batched beside examples that have it, all -100).
    """
    names = list(vocab.modalities)
    enc = {"ids": [], "mod": [], "pos": []}
    patches = {m: image_patches(img, grids[m]) for m, img in pixels.items() if m in tokens} if pixels is not None else None
    pix: list[tuple[int, np.ndarray]] = []  # (offset of the modality's inputs in the encoder row, their patches)
    dense: list[tuple[int, np.ndarray]] = []  # the same for the rgb inputs' label patches
    label_patches = image_patches(dense_labels if dense_labels.ndim == 3 else dense_labels[None], grids[DENSE_LABEL_INPUTS]) if dense_labels is not None else None
    dec = {"ids": [], "mod": [], "pos": [], "causal": [], "labels": []}
    for plan in plans:
        m, mi = plan.name, names.index(plan.name)
        if plan.input_idx is not None:  # image-like
            g = grids[m]
            if len(plan.input_idx) and not drop_condition:
                if patches is not None and m in patches:
                    pix.append((sum(len(a) for a in enc["ids"]), patches[m][plan.input_idx]))
                if label_patches is not None and m == DENSE_LABEL_INPUTS:
                    dense.append((sum(len(a) for a in enc["ids"]), label_patches[plan.input_idx]))
                enc["ids"].append(tokens[m][plan.input_idx])
                enc["mod"].append(np.full(len(plan.input_idx), mi))
                enc["pos"].append(grid_positions(plan.input_idx, g))
            if len(plan.target_idx):
                n = len(plan.target_idx)
                dec["ids"].append(np.full(n, vocab.mask_id))
                dec["mod"].append(np.full(n, mi))
                dec["pos"].append(grid_positions(plan.target_idx, g))
                dec["causal"].append(np.zeros(n, bool))
                dec["labels"].append(tokens[m][plan.target_idx])
            continue
        if plan.input_ids is not None and len(plan.input_ids) and not drop_condition:
            enc["ids"].append(plan.input_ids)
            enc["mod"].append(np.full(len(plan.input_ids), mi))
            enc["pos"].append(line_positions(len(plan.input_ids)))
        if plan.target_ids is not None and len(plan.target_ids):
            t = plan.target_ids
            n = len(t) + 1
            dec["ids"].append(np.concatenate([[vocab.bos_id], t]))
            dec["mod"].append(np.full(n, mi))
            dec["pos"].append(line_positions(n))
            dec["causal"].append(np.ones(n, bool))
            dec["labels"].append(np.concatenate([t, [vocab.eos_id]]))
    if not enc["ids"]:  # nothing visible (or dropped): one [BOS] as the null condition
        first = dec["mod"][0][0] if dec["mod"] else 0
        enc = {"ids": [np.array([vocab.bos_id])], "mod": [np.array([first])], "pos": [np.zeros((1, 2), np.int64)]}
    cat = lambda xs, dtype: np.concatenate(xs).astype(dtype) if xs else np.zeros(0, dtype)
    n = sum(len(a) for a in enc["ids"])
    enc_pixels = enc_pixel_mask = None
    if patches is not None:
        width = next(iter(patches.values())).shape[1] if patches else 0
        enc_pixels, enc_pixel_mask = np.zeros((n, width), np.uint8), np.zeros(n, bool)
        for start, rows in pix:
            enc_pixels[start : start + len(rows)], enc_pixel_mask[start : start + len(rows)] = rows, True
    enc_dense = None
    if label_patches is not None:
        enc_dense = np.full((n, label_patches.shape[1]), IGNORE_INDEX, np.int64)
        for start, rows in dense:
            enc_dense[start : start + len(rows)] = rows
    return EncDecExample(
        enc_ids=cat(enc["ids"], np.int64), enc_modality=cat(enc["mod"], np.int64), enc_positions=np.concatenate(enc["pos"]).astype(np.int64),
        dec_ids=cat(dec["ids"], np.int64), dec_modality=cat(dec["mod"], np.int64),
        dec_positions=np.concatenate(dec["pos"]).astype(np.int64) if dec["pos"] else np.zeros((0, 2), np.int64),
        dec_causal=cat(dec["causal"], bool), labels=cat(dec["labels"], np.int64),
        enc_pixels=enc_pixels, enc_pixel_mask=enc_pixel_mask, enc_dense_labels=enc_dense,
    )


def prefix_plans(tokens: dict[str, np.ndarray], kinds: dict[str, str], rng: np.random.Generator, n_condition: int | None = None, shuffle: bool = True) -> list[ModalityPlan]:
    """Whole modalities as condition or target for the encoder-decoder: a random order (``tokens``'
    own with ``shuffle=False``), the first ``n_condition`` (random in [0, M-1] when None) fully
    visible, the rest fully predicted."""
    names = [list(tokens)[i] for i in rng.permutation(len(tokens))] if shuffle else list(tokens)
    k = int(rng.integers(0, len(names))) if n_condition is None else n_condition
    plans = []
    for j, m in enumerate(names):
        plan = ModalityPlan(m)
        everything, nothing = np.arange(len(tokens[m])), np.zeros(0, np.int64)
        if kinds[m] == "image":
            plan.input_idx, plan.target_idx = (everything, nothing) if j < k else (nothing, everything)
        elif j < k:
            plan.role, plan.input_ids = "input", tokens[m]
        else:
            plan.role, plan.target_ids = "target", tokens[m]
        plans.append(plan)
    return plans


@dataclass
class DecoderExample:
    """One sample for ``DecoderLM``: ids, labels, modality (T,) (-1 for [BOS] and begin tags; an end
    tag counts for its modality), positions (T, 2), prefix length."""

    ids: np.ndarray
    labels: np.ndarray
    positions: np.ndarray
    modality: np.ndarray
    prefix_len: int


def decoder_example(tokens: dict[str, np.ndarray], vocab: SharedVocab, grids: dict[str, int], rng: np.random.Generator, n_condition: int = 0, drop_condition: bool = False, shuffle: bool = True) -> DecoderExample:
    """Modalities in a random order (``tokens``' own with ``shuffle=False``) as one sequence; the
    first ``n_condition`` are the PrefixLM condition (0: plain next-token). Loss on target content
    tokens and their end tags; begin tags are given at inference, so they carry no loss."""
    names = [list(tokens)[i] for i in rng.permutation(len(tokens))] if shuffle else list(tokens)
    condition, targets = names[:n_condition], names[n_condition:]
    if drop_condition:
        condition = []
    seq = pack_sequence([(m, tokens[m]) for m in condition + targets], vocab, grids)
    ids = seq.ids.numpy()
    labels = np.full_like(ids, IGNORE_INDEX)
    prefix_len = 1
    for m in condition:
        prefix_len = seq.spans[m][1] + 1  # through its end tag
    for m in targets:
        start, stop = seq.spans[m]
        labels[start : stop + 1] = ids[start : stop + 1]  # content + end tag
    packed = seq.modality.numpy()
    modality = packed.copy()
    closing = np.flatnonzero((packed[1:] < 0) & (packed[:-1] >= 0)) + 1
    modality[closing] = packed[closing - 1]  # an end tag counts for the modality it closes (the next begin tag does not)
    return DecoderExample(ids=ids, labels=labels, positions=seq.positions.numpy(), modality=modality, prefix_len=prefix_len if condition else 0)


def _pad(arrays: list[np.ndarray], value, dtype=torch.long) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad 1-D (or (L, 2)) arrays -> (B, L_max[, 2]) and a (B, L_max) validity mask."""
    n = max(1, max(len(a) for a in arrays))
    shape = (len(arrays), n) + arrays[0].shape[1:]
    out = torch.full(shape, value, dtype=dtype)
    valid = torch.zeros(len(arrays), n, dtype=torch.bool)
    for i, a in enumerate(arrays):
        out[i, : len(a)] = torch.as_tensor(a, dtype=dtype)
        valid[i, : len(a)] = True
    return out, valid


def collate_encdec(examples: list[EncDecExample], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Batch for ``EncoderDecoder.forward(**batch)`` (labels included, -100 at padding).

    ``label_modality`` (B, T) is not a forward argument: the training loop pops it to group the
    loss by modality."""
    enc_ids, enc_valid = _pad([e.enc_ids for e in examples], pad_id)
    dec_ids, dec_valid = _pad([e.dec_ids for e in examples], pad_id)
    return {
        "enc_ids": enc_ids, "enc_valid": enc_valid,
        "enc_modality": _pad([e.enc_modality for e in examples], 0)[0],
        "enc_positions": _pad([e.enc_positions for e in examples], 0)[0],
        "dec_ids": dec_ids, "dec_valid": dec_valid,
        "dec_modality": _pad([e.dec_modality for e in examples], 0)[0],
        "dec_positions": _pad([e.dec_positions for e in examples], 0)[0],
        "dec_causal": _pad([e.dec_causal for e in examples], False, torch.bool)[0],
        "labels": _pad([e.labels for e in examples], IGNORE_INDEX)[0],
        "label_modality": _pad([e.dec_modality for e in examples], -1)[0],
        **_collate_pixels(examples, enc_ids.shape[1]),
        **_collate_dense_labels(examples, enc_ids.shape[1]),
    }


def _collate_pixels(examples: list[EncDecExample], n: int) -> dict[str, torch.Tensor]:
    """``enc_pixels`` (B, S, C) uint8 and ``enc_pixel_mask`` (B, S) when the examples carry pixel
    patches (C: the widest of them; an example without any has a False mask), else nothing."""
    width = max((e.enc_pixels.shape[1] for e in examples if e.enc_pixels is not None), default=0)
    if not width:
        return {}
    pixels, mask = torch.zeros(len(examples), n, width, dtype=torch.uint8), torch.zeros(len(examples), n, dtype=torch.bool)
    for i, e in enumerate(examples):
        if e.enc_pixels is not None and e.enc_pixels.shape[1]:
            pixels[i, : len(e.enc_pixels), : e.enc_pixels.shape[1]] = torch.from_numpy(e.enc_pixels)
            mask[i, : len(e.enc_pixel_mask)] = torch.from_numpy(e.enc_pixel_mask)
    return {"enc_pixels": pixels, "enc_pixel_mask": mask}


def _collate_dense_labels(examples: list[EncDecExample], n: int) -> dict[str, torch.Tensor]:
    """``enc_dense_labels`` (B, S, p * p) int64, -100 where a token has no label patch, when the
    examples carry them, else nothing."""
    width = max((e.enc_dense_labels.shape[1] for e in examples if e.enc_dense_labels is not None), default=-1)
    if width < 0:
        return {}
    out = torch.full((len(examples), n, width), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        if e.enc_dense_labels is not None and e.enc_dense_labels.shape[1] == width:
            out[i, : len(e.enc_dense_labels)] = torch.from_numpy(e.enc_dense_labels)
    return {"enc_dense_labels": out}


def collate_decoder(examples: list[DecoderExample], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Batch for ``DecoderLM.forward(**batch)``: input_ids, labels, positions, attention_mask and
    prefix_len (None when every example is plain next-token); plus ``label_modality`` (B, T), each
    token's modality (an end tag counts for the modality it closes; -1 for [BOS], begin tags and
    padding), which a model with ``modality_softmax`` reads and the training loop uses to group
    the loss by modality."""
    ids, valid = _pad([e.ids for e in examples], pad_id)
    prefix = torch.tensor([e.prefix_len for e in examples])
    return {
        "input_ids": ids,
        "labels": _pad([e.labels for e in examples], IGNORE_INDEX)[0],
        "positions": _pad([e.positions for e in examples], 0)[0],
        "attention_mask": valid.long(),
        "prefix_len": prefix if bool((prefix > 0).any()) else None,
        "label_modality": _pad([e.modality for e in examples], -1)[0],
    }
