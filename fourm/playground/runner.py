"""Run one checked playground request through ``generate`` and turn every input and output into
what the page shows: pictures (PNG data URLs), text, ground truth and its metrics for held-out
scenes, and the ``launch/generate.py`` command that reproduces the result."""

from __future__ import annotations

import base64
import io
import shlex
import time
from typing import Callable

import numpy as np
import torch
from PIL import Image

from fourm.data.normals import normals_to_uint8
from fourm.data.synth.scene import CLASSES
from fourm.eval.captions import object_counts, object_match, precision_recall_f1, scene_object_counts
from fourm.generation.api import generate
from fourm.metrics import depth_metrics, matched_box_iou, miou_from_confusion, segmentation_confusion
from fourm.playground.requests import PlaygroundRequest
from fourm.viz import colorize_depth, colorize_semseg, draw_boxes, overlay, palette, upscale

SCALE = 4  # pictures are sent at 4x the model's resolution (nearest neighbour)


def png_data_url(img: np.ndarray) -> str:
    """(H, W, 3) uint8 -> ``data:image/png;base64,...``."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _hwc(rgb: torch.Tensor) -> np.ndarray:
    return rgb.permute(1, 2, 0).numpy().astype(np.uint8)


def _legend(seg: np.ndarray, num_classes: int) -> list[dict]:
    names = CLASSES if num_classes == len(CLASSES) else None
    colors = palette(max(num_classes, 1))
    return [{"name": names[k] if names else f"class {k}", "color": "#%02x%02x%02x" % tuple(int(c) for c in colors[k % len(colors)])} for k in np.unique(seg).tolist()]


def boxes_text(boxes: list[dict]) -> str:
    """Boxes as the page's box field takes them: one ``x0 y0 x1 y1 label`` per line."""
    return "\n".join(" ".join(f"{v:g}" for v in b["bbox"]) + " " + b["label"] for b in boxes)


def picture(modality: str, value, base: np.ndarray | None, res: int, num_classes: int = 0, depth_range: tuple[float, float] | None = None) -> dict:
    """One modality's value (as ``TokenizerSet.decode`` gives it, or a raw input) -> {"image":
    data URL or None, "text": str or None, "legend": [...]} for the page."""
    if modality in ("caption", "count"):
        return {"image": None, "text": str(value)}
    if modality == "rgb":
        return {"image": png_data_url(upscale(_hwc(value), SCALE)), "text": None}
    if modality == "depth":
        d = value.reshape(res, res).float().numpy()
        lo, hi = depth_range or (float(np.percentile(d, 2)), float(np.percentile(d, 98)))
        return {"image": png_data_url(upscale(colorize_depth(d, max(lo, 1e-3), max(hi, 1e-3)), SCALE)), "text": f"{d.min():.2f} to {d.max():.2f} m (bright = near)"}
    if modality == "semseg":
        s = value.reshape(res, res).numpy()
        img = overlay(base, s) if base is not None else colorize_semseg(s)
        return {"image": png_data_url(upscale(img, SCALE)), "text": None, "legend": _legend(s, num_classes)}
    if modality == "boxes":
        canvas = base if base is not None else np.full((res, res, 3), 255, np.uint8)
        return {"image": png_data_url(draw_boxes(canvas, value, SCALE)), "text": boxes_text(value) or "(no boxes)"}
    if modality == "normals":
        return {"image": png_data_url(upscale(normals_to_uint8(value.permute(1, 2, 0).numpy()), SCALE)), "text": None}
    return {"image": None, "text": f"({modality}: no picture for this modality)"}


def truth_metrics(modality: str, pred, truth: dict, num_classes: int) -> dict[str, float]:
    """Per-scene figures against a held-out scene's ground truth (the evaluation suite's metrics)."""
    if modality == "depth":
        m = depth_metrics(pred.reshape(1, *truth["depth"].shape[-2:]).float(), truth["depth"].reshape(1, *truth["depth"].shape[-2:]))
        return {"AbsRel": m["abs_rel"], "δ1": m["delta1"]}
    if modality == "semseg":
        m = miou_from_confusion(segmentation_confusion(pred.reshape(truth["semseg"].shape).long(), truth["semseg"], num_classes))
        return {"mIoU": m["miou"], "pixel acc": m["pixel_acc"]}
    if modality == "boxes":
        ious = matched_box_iou(pred, truth["boxes"])  # one per true box, 0 when unmatched
        return {"predicted": len(pred), "true": len(ious), "matched (same label)": sum(v > 0 for v in ious), "mean IoU over true": float(np.mean(ious)) if ious else 0.0}
    if modality == "caption":
        tp, n_pred, n_true = object_match(object_counts(pred), scene_object_counts(truth["scene"]))
        m = precision_recall_f1(tp, n_pred, n_true)
        return {"object P": m["precision"], "object R": m["recall"], "object F1": m["f1"]}
    return {}


def command(model_dir: str, req: PlaygroundRequest, targets: list[str], scene_file: str | None) -> str:
    """The ``launch/generate.py`` command that gives the same result (same seed, same inputs)."""
    parts = ["python", "launch/generate.py", "--model", model_dir]
    if "rgb" in req.inputs:
        parts += ["--from", f"rgb={scene_file or 'YOUR_IMAGE.png'}"]
    if "caption" in req.inputs:
        parts += ["--from", f"caption={req.inputs['caption'][0]}"]
    if "boxes" in req.inputs:
        parts += ["--from", "boxes=boxes.json"]
    c = req.config
    parts += ["--to", ",".join(targets), "--out", "out", "--steps", str(c.steps), "--temperature", f"{c.temperature:g}", "--cfg", f"{c.cfg_scale:g}", "--seed", str(c.seed)]
    if c.top_k:
        parts += ["--top-k", str(c.top_k)]
    if c.top_p < 1:
        parts += ["--top-p", f"{c.top_p:g}"]
    return " ".join(shlex.quote(p) for p in parts)


def run_request(model, tokenizers, req: PlaygroundRequest, *, model_dir: str = "MODEL", truth: dict | None = None, progress: Callable[[str], None] | None = None) -> dict:
    """Generate ``req.targets`` and describe inputs and outputs for the page.

    chain: one ``generate`` call, targets in order, each conditioning the next; independent: one
    call per target from the inputs alone. ``truth``: the held-out scene (``SceneStore.get``) whose
    image was the input, for ground truth and metrics.
    """
    res = tokenizers.resolution
    num_classes = tokenizers.images["semseg"].config.num_classes if "semseg" in tokenizers.images else 0
    starts: dict[str, float] = {}  # target -> when it started; each ends when the next starts

    def on_target(i: int, name: str, offset: int = 0) -> None:
        starts[name] = time.perf_counter()
        if progress:
            progress(f"generating {name} ({offset + i + 1} of {len(req.targets)})")

    scene_file = f"scene-{req.scene_index:05d}.png" if truth else None
    if req.mode == "chain":
        result = generate(model, tokenizers, req.inputs, req.targets, req.config, progress=on_target)
        outputs = {m: v[0] for m, v in result.outputs.items()}
        commands = [command(model_dir, req, req.targets, scene_file)]
    else:
        outputs, commands = {}, []
        for j, target in enumerate(req.targets):
            result = generate(model, tokenizers, req.inputs, [target], req.config, progress=lambda i, name, j=j: on_target(i, name, j))
            outputs[target] = result.outputs[target][0]
            commands.append(command(model_dir, req, [target], scene_file))
    end = time.perf_counter()
    ends = [starts[t] for t in req.targets[1:]] + [end]
    seconds = {t: e - starts[t] for t, e in zip(req.targets, ends)}

    base = _hwc(req.inputs["rgb"][0]) if "rgb" in req.inputs else (_hwc(outputs["rgb"]) if "rgb" in outputs else None)
    depth_range = None
    if truth is not None:
        d = truth["depth"].numpy()
        depth_range = (float(np.percentile(d, 2)), float(np.percentile(d, 98)))
    shown_inputs = []
    for name, value in req.inputs.items():
        shown_inputs.append({"modality": name, **picture(name, value[0], base, res, num_classes)})
    shown_outputs = []
    for name in req.targets:
        card = {"modality": name, "seconds": round(seconds[name], 2), **picture(name, outputs[name], base, res, num_classes, depth_range)}
        if truth is not None and name in ("depth", "semseg", "boxes", "caption"):
            gt = truth[name]
            card["truth"] = picture(name, gt, base, res, num_classes, depth_range)
            card["metrics"] = {k: round(float(v), 3) for k, v in truth_metrics(name, outputs[name], truth, num_classes).items()}
        shown_outputs.append(card)
    return {"inputs": shown_inputs, "outputs": shown_outputs, "notes": req.notes, "commands": commands, "mode": req.mode, "seconds": round(end - starts[req.targets[0]], 2)}
