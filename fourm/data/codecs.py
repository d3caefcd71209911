"""Encoding and decoding of shard members: the one place that knows the byte formats.

Raw shard members (see ``fourm.modalities``):
    rgb.png      (H, W, 3) uint8 PNG          <-> torch.uint8 (3, H, W)
    depth.npy    (H, W) float32 .npy, metres  <-> torch.float32 (1, H, W)
    semseg.png   (H, W) uint8 PNG class ids   <-> torch.int64 (H, W)
    boxes.json   [{"bbox": [x0, y0, x1, y1], "label": str}, ...] pixel-edge coordinates
    caption.txt  UTF-8 text                   <-> str
    normals.png  (H, W, 3) uint8 PNG          <-> torch.uint8 (3, H, W)  (``fourm.data.normals``)
    count.txt    UTF-8 decimal integer        <-> int >= 0
    scene.json   dict                         <-> dict
    instance.png (H, W) uint8 PNG, 0 or k     <-> torch.int64 (H, W): k the k-th box of boxes.json
"""

from __future__ import annotations

import io
import json

import numpy as np
import torch
from PIL import Image


class CorruptMember(ValueError):
    """A member's bytes do not decode to what its name promises."""

    def __init__(self, member: str, why: str):
        super().__init__(f"{member}: {why}")
        self.member = member


def encode_png(array: np.ndarray) -> bytes:
    """(H, W) or (H, W, 3) uint8 -> PNG bytes (deterministic)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def encode_npy(array: np.ndarray) -> bytes:
    """Array -> .npy bytes (no pickle)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def encode_json(obj) -> bytes:
    """JSON, compact, keys sorted so the same object gives the same bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")


def decode_image(data: bytes, member: str, mode: str) -> np.ndarray:
    """PNG/JPEG bytes -> array in PIL ``mode`` ("RGB" -> (H, W, 3), "L" -> (H, W))."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if mode == "L" and im.mode not in ("L", "P"):
                raise CorruptMember(member, f"expected a single-channel image, got mode {im.mode}")
            arr = np.asarray(im if im.mode == mode or mode == "L" else im.convert(mode))
    except CorruptMember:
        raise
    except Exception as exn:
        raise CorruptMember(member, f"cannot decode image ({type(exn).__name__})") from exn
    return arr


def decode_npy(data: bytes, member: str) -> np.ndarray:
    """.npy bytes -> array; pickled object arrays are refused."""
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exn:
        raise CorruptMember(member, f"cannot decode .npy ({type(exn).__name__})") from exn


def decode_json(data: bytes, member: str):
    try:
        return json.loads(data.decode("utf-8"))
    except Exception as exn:
        raise CorruptMember(member, f"cannot decode JSON ({type(exn).__name__})") from exn


def decode_text(data: bytes, member: str) -> str:
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError as exn:
        raise CorruptMember(member, "not UTF-8 text") from exn


def decode_boxes(data: bytes, member: str) -> list[dict]:
    """boxes.json -> list of {"bbox": [4 floats], "label": str}; a malformed entry is an error."""
    boxes = decode_json(data, member)
    if not isinstance(boxes, list):
        raise CorruptMember(member, "expected a JSON list")
    out = []
    for b in boxes:
        if not (isinstance(b, dict) and isinstance(b.get("label"), str) and isinstance(b.get("bbox"), list) and len(b["bbox"]) == 4):
            raise CorruptMember(member, f"malformed box entry {str(b)[:60]}")
        out.append({"bbox": [float(v) for v in b["bbox"]], "label": b["label"]})
    return out


def decode_member(name: str, data: bytes):
    """Decode one modality's member bytes to its in-memory form (see the module docstring)."""
    member = name
    if name in ("rgb", "normals"):
        arr = decode_image(data, f"{name}.png", "RGB")
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
    if name == "depth":
        arr = decode_npy(data, "depth.npy")
        if arr.ndim != 2 or arr.dtype.kind != "f":
            raise CorruptMember("depth.npy", f"expected a 2D float array, got {arr.dtype} {arr.shape}")
        return torch.from_numpy(arr.astype(np.float32, copy=True))[None]
    if name in ("semseg", "instance"):
        arr = decode_image(data, f"{name}.png", "L")
        return torch.from_numpy(arr.astype(np.int64))
    if name == "boxes":
        return decode_boxes(data, "boxes.json")
    if name == "caption":
        return decode_text(data, "caption.txt")
    if name == "count":
        text = decode_text(data, "count.txt")
        if not (text.isascii() and text.isdigit()):
            raise CorruptMember("count.txt", f"expected a non-negative integer, got {text[:20]!r}")
        return int(text)
    if name == "scene":
        return decode_json(data, "scene.json")
    raise KeyError(f"no decoder for modality {member!r}")
