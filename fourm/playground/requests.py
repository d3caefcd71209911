"""One playground request: the page's form fields checked and turned into ``generate`` inputs.

Pure functions; every problem with the input is a ``BadRequest`` whose message the page shows as
it is (one sentence that says what to change).
"""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from fourm.data.readers import centre_square_resize
from fourm.generation.api import GenerationConfig

IMAGE_SOURCES = ("none", "scene", "upload")
MODES = ("chain", "independent")


class BadRequest(ValueError):
    """Input the page must report to the person (HTTP 400 / 413): ``status`` says which."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class Limits:
    """What a request may ask for."""

    max_upload_bytes: int = 10 * 2**20
    max_pixels: int = 4096 * 4096  # decoded size; refuses decompression bombs before decoding
    max_steps: int = 64
    max_caption_chars: int = 1000
    max_boxes: int = 64


@dataclass
class PlaygroundRequest:
    """A checked request. ``inputs`` is batched raw input for ``generate`` (batch of one)."""

    inputs: dict
    targets: list[str]
    mode: str = "chain"  # chain: each finished target conditions the next; independent: inputs only
    config: GenerationConfig = field(default_factory=GenerationConfig)  # the sampling controls
    scene_index: int | None = None  # a held-out scene was the image input
    notes: list[str] = field(default_factory=list)  # what was done to the input (resizing, ...)


def decode_upload(data: bytes, res: int, limits: Limits) -> tuple[torch.Tensor, str | None]:
    """Uploaded file bytes -> ((1, 3, res, res) uint8, a note when it was cropped or resized)."""
    if not data:
        raise BadRequest("the uploaded file is empty: choose a PNG or JPEG image")
    if len(data) > limits.max_upload_bytes:
        raise BadRequest(f"the file is {len(data) / 2**20:.1f} MB; the limit is {limits.max_upload_bytes / 2**20:.0f} MB", status=413)
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > limits.max_pixels:
                raise BadRequest(f"the image is {w}x{h} pixels; the limit is {limits.max_pixels / 1e6:.1f} megapixels", status=413)
            arr = np.asarray(im.convert("RGB"))
    except BadRequest:
        raise
    except Image.DecompressionBombError:
        raise BadRequest(f"the image is too large to decode safely (limit {limits.max_pixels / 1e6:.1f} megapixels)", status=413) from None
    except Image.UnidentifiedImageError:
        raise BadRequest("the file is not an image (PNG, JPEG, WebP, BMP or GIF)") from None
    except (OSError, ValueError, SyntaxError) as exn:
        raise BadRequest(f"the image could not be decoded (damaged or truncated?): {exn}") from None
    note = None
    if arr.shape[:2] != (res, res):
        note = f"rgb: {w}x{h} centre-cropped to a square and resized to {res}x{res}"
        arr = centre_square_resize(arr, res, Image.BICUBIC)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)[None], note


_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)"
_BOX_LINE = re.compile(rf"^\s*({_NUMBER})[\s,]+({_NUMBER})[\s,]+({_NUMBER})[\s,]+({_NUMBER})[\s,:]+(\S.*?)\s*$")


def parse_boxes(text: str, res: int, limits: Limits) -> list[dict]:
    """Boxes typed in the page: one ``x0 y0 x1 y1 label`` per line (pixels of the res x res input),
    or a ``boxes.json`` list of ``{"bbox": [x0, y0, x1, y1], "label": str}``."""
    text = text.strip()
    if text.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exn:
            raise BadRequest(f"boxes: not valid JSON ({exn.msg} at line {exn.lineno})") from None
        if not isinstance(items, list) or not all(isinstance(b, dict) and isinstance(b.get("bbox"), list) and len(b["bbox"]) == 4 and isinstance(b.get("label"), str) for b in items):
            raise BadRequest('boxes: JSON must be a list of {"bbox": [x0, y0, x1, y1], "label": "..."}')
        rows = [(b["bbox"], b["label"], i + 1) for i, b in enumerate(items)]
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            m = _BOX_LINE.match(line)
            if not m:
                raise BadRequest(f"boxes line {n}: expected 'x0 y0 x1 y1 label', got {line.strip()[:60]!r}")
            rows.append(([float(v) for v in m.groups()[:4]], m.group(5), n))
    if len(rows) > limits.max_boxes:
        raise BadRequest(f"boxes: {len(rows)} given; the limit is {limits.max_boxes}")
    boxes = []
    for bbox, label, n in rows:
        try:
            x0, y0, x1, y1 = (float(v) for v in bbox)
        except (TypeError, ValueError):
            raise BadRequest(f"boxes line {n}: coordinates must be numbers") from None
        if not all(math.isfinite(v) and 0 <= v <= res for v in (x0, y0, x1, y1)) or x1 <= x0 or y1 <= y0:
            raise BadRequest(f"boxes line {n}: need 0 <= x0 < x1 <= {res} and 0 <= y0 < y1 <= {res} (pixels of the {res}x{res} input)")
        if not label.strip():
            raise BadRequest(f"boxes line {n}: the label is empty")
        boxes.append({"bbox": [x0, y0, x1, y1], "label": label.strip()})
    return boxes


def _number(fields: dict, name: str, default, kind, lo, hi, what: str):
    raw = str(fields.get(name, "")).strip()
    if raw == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise BadRequest(f"{what} must be {'a whole number' if kind is int else 'a number'}, got {raw[:20]!r}") from None
    if not (lo <= value <= hi) or (kind is float and not math.isfinite(value)):
        raise BadRequest(f"{what} must be between {lo} and {hi}, got {raw[:20]}")
    return value


def parse_request(fields: dict, upload: bytes | None, *, known: list[str], res: int, limits: Limits, scene_rgb=None, num_scenes: int = 0) -> PlaygroundRequest:
    """The page's form fields (strings) and uploaded bytes -> a checked ``PlaygroundRequest``.

    ``known``: the modalities of the model's tokenizer set; ``scene_rgb(i)``: (1, 3, res, res) uint8
    of held-out scene ``i``.
    """
    notes: list[str] = []
    inputs: dict = {}
    source = str(fields.get("image_source", "none"))
    if source not in IMAGE_SOURCES:
        raise BadRequest(f"image_source must be one of {', '.join(IMAGE_SOURCES)}")
    scene_index = None
    if source == "upload":
        if upload is None:
            raise BadRequest("no file chosen: choose an image to upload, or pick a held-out scene")
        inputs["rgb"], note = decode_upload(upload, res, limits)
        notes += [note] if note else []
    elif source == "scene":
        scene_index = _number(fields, "scene", None, int, 0, max(num_scenes - 1, 0), "the scene number")
        if scene_index is None or scene_rgb is None or num_scenes == 0:
            raise BadRequest("no held-out scene chosen")
        inputs["rgb"] = scene_rgb(scene_index)
    if str(fields.get("use_caption", "")).lower() in ("1", "true", "on", "yes"):
        caption = str(fields.get("caption", "")).strip()
        if not caption:
            raise BadRequest("the caption is empty: type one, or untick 'caption as input'")
        if len(caption) > limits.max_caption_chars:
            raise BadRequest(f"the caption has {len(caption)} characters; the limit is {limits.max_caption_chars}")
        if "caption" not in known:
            raise BadRequest("this model has no caption modality")
        inputs["caption"] = [caption]
    if str(fields.get("boxes", "")).strip():
        if "boxes" not in known:
            raise BadRequest("this model has no boxes modality")
        inputs["boxes"] = [parse_boxes(str(fields["boxes"]), res, limits)]
    if not inputs:
        raise BadRequest("no input: pick a scene, upload an image, or give a caption or boxes")
    targets = [t.strip() for t in str(fields.get("targets", "")).split(",") if t.strip()]
    if not targets:
        raise BadRequest("no output chosen: tick at least one target")
    for t in targets:
        if t not in known:
            raise BadRequest(f"unknown target {t!r}; this model knows: {', '.join(known)}")
    if len(set(targets)) != len(targets):
        raise BadRequest("a target is listed twice")
    both = [t for t in targets if t in inputs]
    if both:
        raise BadRequest(f"{', '.join(both)} is both an input and a target: untick it or remove that input")
    mode = str(fields.get("mode", "chain"))
    if mode not in MODES:
        raise BadRequest(f"mode must be one of {', '.join(MODES)}")
    d = GenerationConfig()
    config = GenerationConfig(
        steps=_number(fields, "steps", d.steps, int, 1, limits.max_steps, "steps"),
        temperature=_number(fields, "temperature", d.temperature, float, 0.0, 5.0, "temperature"),
        cfg_scale=_number(fields, "cfg", d.cfg_scale, float, 0.0, 1000.0, "guidance (CFG)"),
        seed=_number(fields, "seed", d.seed, int, 0, 2**31 - 1, "seed"),
        top_k=_number(fields, "top_k", d.top_k, int, 0, 100000, "top-k"),
        top_p=_number(fields, "top_p", d.top_p, float, 0.01, 1.0, "top-p"),
    )
    return PlaygroundRequest(inputs=inputs, targets=targets, mode=mode, config=config, scene_index=scene_index, notes=notes)
