"""Reading modality files from disk (folder import, generation inputs) and fitting them to a
square resolution."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def read_rgb(path: Path) -> np.ndarray:
    """Any image file -> (H, W, 3) uint8."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def read_depth(path: Path) -> np.ndarray:
    """.npy metres, or a 16-bit PNG in millimetres -> (H, W) float32 metres."""
    if path.suffix.lower() == ".npy":
        arr = np.load(path, allow_pickle=False)
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim != 2 or arr.dtype.kind not in "fiu":
            raise ValueError(f"expected a 2D numeric array, got {arr.dtype} {arr.shape}")
        return arr.astype(np.float32)
    with Image.open(path) as im:
        if im.mode not in ("I;16", "I;16B", "I", "L"):
            raise ValueError(f"expected a 16-bit depth PNG in millimetres, got mode {im.mode}")
        return np.asarray(im).astype(np.float32) / 1000.0


def read_semseg(path: Path) -> np.ndarray:
    """An 8-bit class-id PNG -> (H, W) uint8."""
    with Image.open(path) as im:
        if im.mode not in ("L", "P"):
            raise ValueError(f"expected an 8-bit class-id PNG, got mode {im.mode}")
        return np.asarray(im).astype(np.uint8)


def read_boxes(path: Path) -> list[dict]:
    """A JSON list of {bbox: [x0, y0, x1, y1], label} -> the same with float coordinates, str labels."""
    boxes = json.loads(path.read_text())
    if not isinstance(boxes, list):
        raise ValueError("expected a JSON list of boxes")
    out = []
    for b in boxes:
        bbox = [float(v) for v in b["bbox"]]
        if len(bbox) != 4:
            raise ValueError(f"bbox needs 4 numbers, got {b['bbox']}")
        out.append({"bbox": bbox, "label": str(b["label"])})
    return out


def centre_square(h: int, w: int) -> tuple[int, int, int]:
    """(top, left, side) of the largest centred square in an h x w image."""
    side = min(h, w)
    return (h - side) // 2, (w - side) // 2, side


def centre_square_resize(arr: np.ndarray, res: int, resample) -> np.ndarray:
    """Crop (H, W[, C]) to its centred square and resize to res x res (float32 via PIL mode F)."""
    top, left, side = centre_square(*arr.shape[:2])
    crop = arr[top : top + side, left : left + side]
    mode = "F" if crop.dtype == np.float32 else None
    return np.asarray(Image.fromarray(crop, mode=mode).resize((res, res), resample))
