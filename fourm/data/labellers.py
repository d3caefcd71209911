"""Pseudo labellers: Hugging Face ``transformers`` models, loaded from local directories, that turn
a batch of RGB images into shard members of the embedded dataset's format (``fourm.data.codecs``).

    depth    AutoModelForDepthEstimation (DPT, Depth Anything, ZoeDepth, ...)  -> depth.npy
    semseg   AutoModelForSemanticSegmentation (SegFormer, BEiT, DPT, UperNet) or
             AutoModelForUniversalSegmentation (Mask2Former, MaskFormer)        -> semseg.png
    boxes    AutoModelForObjectDetection (DETR, Conditional/Deformable DETR, ...) -> boxes.json
    caption  AutoModelForImageTextToText (BLIP, VisionEncoderDecoder, ...)     -> caption.txt

Every output is at the stored image's size. Class names are the model's own ``config.id2label``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fourm.cli import UsageError
from fourm.data.codecs import encode_json, encode_npy, encode_png
from fourm.data.loader import clip_boxes

log = logging.getLogger(__name__)

# model types whose depth is metric when the config does not say (``depth_estimation_type``)
METRIC_DEPTH_TYPES = ("zoedepth", "glpn", "depth_pro")


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_model(flag: str, directory: str, auto_names: tuple[str, ...], what: str, device: str, processor: str = "AutoImageProcessor"):
    """(model in eval mode on ``device``, processor) from a local directory; UsageError naming
    ``flag`` when the directory is missing, holds no model, or a model of another kind."""
    path = Path(directory)
    if not path.is_dir():
        raise UsageError(f"{flag} {directory}: no such directory")
    if not (path / "config.json").is_file():
        raise UsageError(f"{flag} {directory}: not a transformers model directory (no config.json)")
    import transformers

    _quiet_transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exn:
        raise UsageError(f"{flag} {directory}: cannot read config.json: {exn}") from None
    model = None
    for name in auto_names:
        auto = getattr(transformers, name)
        if type(config) in auto._model_mapping:
            try:
                model = auto.from_pretrained(path, local_files_only=True)
            except (OSError, ValueError) as exn:
                raise UsageError(f"{flag} {directory}: cannot load the model: {exn}") from None
            break
    if model is None:
        raise UsageError(f"{flag} {directory}: a {config.model_type!r} model is not {what}")
    try:
        proc = getattr(transformers, processor).from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exn:
        raise UsageError(f"{flag} {directory}: no usable preprocessor saved with the model: {exn}") from None
    return model.to(device).eval(), proc


def _info(model, directory: str) -> dict:
    return {"dir": str(Path(directory).resolve()), "model_type": model.config.model_type, "architecture": type(model).__name__}


class DepthLabeller:
    member = "depth.npy"

    def __init__(self, directory: str, device: str, kind: str | None = None):
        self.model, self.processor = load_model("--depth", directory, ("AutoModelForDepthEstimation",), "a depth estimator", device)
        self.device = device
        declared = getattr(self.model.config, "depth_estimation_type", None)
        if kind is not None:
            self.kind, how = kind, "--depth-kind"
        elif declared in ("metric", "relative"):
            self.kind, how = declared, "config depth_estimation_type"
        else:
            self.kind = "metric" if self.model.config.model_type in METRIC_DEPTH_TYPES else "relative"
            how = f"default for model type {self.model.config.model_type!r}"
        self.info = {**_info(self.model, directory), "kind": self.kind, "kind_from": how}

    def manifest(self) -> dict:
        if self.kind == "metric":
            return {"unit": "m", "kind": "metric", "axis": "z", "from": "pseudo-label"}
        return {"unit": None, "kind": "relative", "axis": "z", "from": "pseudo-label",
                "note": "the model's raw output, affine-invariant (unknown scale and shift); for MiDaS/DPT/Depth Anything relative models it is inverse depth: larger is nearer"}

    def __call__(self, images: list[Image.Image]) -> list[bytes]:
        outputs = self.model(**self.processor(images=images, return_tensors="pt").to(self.device))
        sizes = [(im.height, im.width) for im in images]
        if hasattr(self.processor, "post_process_depth_estimation"):
            maps = [r["predicted_depth"] for r in self.processor.post_process_depth_estimation(outputs, target_sizes=sizes)]
        else:
            maps = [torch.nn.functional.interpolate(d[None, None], size=s, mode="bicubic", align_corners=False)[0, 0] for d, s in zip(outputs.predicted_depth, sizes)]
        return [encode_npy(m.float().cpu().numpy().astype(np.float32)) for m in maps]


class SemsegLabeller:
    member = "semseg.png"

    def __init__(self, directory: str, device: str):
        autos = ("AutoModelForSemanticSegmentation", "AutoModelForUniversalSegmentation")
        self.model, self.processor = load_model("--semseg", directory, autos, "a semantic or panoptic segmenter", device)
        if self.model.config.model_type == "oneformer":
            raise UsageError(f"--semseg {directory}: OneFormer (task-conditioned) is not supported; use SegFormer or Mask2Former")
        self.device = device
        id2label = self.model.config.id2label
        if len(id2label) > 256:
            raise UsageError(f"--semseg {directory}: {len(id2label)} classes do not fit semseg.png's 8-bit ids")
        self.classes = [str(id2label[i]) for i in range(len(id2label))]
        self.info = {**_info(self.model, directory), "classes": len(self.classes)}

    def __call__(self, images: list[Image.Image]) -> list[bytes]:
        outputs = self.model(**self.processor(images=images, return_tensors="pt").to(self.device))
        sizes = [(im.height, im.width) for im in images]
        maps = self.processor.post_process_semantic_segmentation(outputs, target_sizes=sizes)
        return [encode_png(m.cpu().numpy().astype(np.uint8)) for m in maps]


class BoxesLabeller:
    member = "boxes.json"

    def __init__(self, directory: str, device: str, score_threshold: float):
        self.model, self.processor = load_model("--boxes", directory, ("AutoModelForObjectDetection",), "an object detector", device)
        self.device = device
        self.threshold = score_threshold
        self.labels = {int(k): str(v) for k, v in self.model.config.id2label.items()}
        self.info = {**_info(self.model, directory), "score_threshold": score_threshold}

    def __call__(self, images: list[Image.Image]) -> list[bytes]:
        outputs = self.model(**self.processor(images=images, return_tensors="pt").to(self.device))
        sizes = [(im.height, im.width) for im in images]
        results = self.processor.post_process_object_detection(outputs, threshold=self.threshold, target_sizes=sizes)
        out = []
        for r, (h, w) in zip(results, sizes):
            boxes = [{"bbox": [round(float(v), 3) for v in box], "label": self.labels.get(int(lab), str(int(lab))), "score": round(float(s), 4)}
                     for box, lab, s in zip(r["boxes"].tolist(), r["labels"].tolist(), r["scores"].tolist())]
            out.append(encode_json(clip_boxes(boxes, h, w)))
        return out


class CaptionLabeller:
    member = "caption.txt"

    def __init__(self, directory: str, device: str, max_new_tokens: int):
        self.model, self.processor = load_model("--caption", directory, ("AutoModelForImageTextToText",), "an image-to-text model", device, "AutoProcessor")
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.info = {**_info(self.model, directory), "max_new_tokens": max_new_tokens}

    def __call__(self, images: list[Image.Image]) -> list[bytes | None]:
        inputs = self.processor(images=images, return_tensors="pt").to(self.device)
        ids = self.model.generate(pixel_values=inputs["pixel_values"], max_new_tokens=self.max_new_tokens)
        texts = [t.strip() for t in self.processor.batch_decode(ids, skip_special_tokens=True)]
        return [t.encode("utf-8") if t else None for t in texts]  # an empty caption is no caption (the loader's rule)
