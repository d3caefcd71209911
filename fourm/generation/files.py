"""Files in and out of ``launch/generate.py``: reading ``--from`` inputs, writing every target as
pictures and raw data, and an overview grid."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fourm.cli import UsageError
from fourm.data.normals import normals_to_uint8
from fourm.data.readers import centre_square_resize, read_boxes, read_depth, read_rgb, read_semseg
from fourm.viz import caption_strip, colorize_depth, colorize_semseg, draw_boxes, grid, overlay, upscale

log = logging.getLogger(__name__)


def parse_from(items: list[str], known: list[str]) -> dict[str, str]:
    """``["rgb=a.png", "caption=a red cube"]`` -> {modality: value}; unknown modality is a UsageError."""
    out = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"--from expects modality=value, got {item!r}")
        name, value = item.split("=", 1)
        name = name.strip()
        if name not in known:
            raise UsageError(f"unknown modality {name!r} in --from; known: {', '.join(known)}")
        if name in out:
            raise UsageError(f"--from {name} given twice")
        if not value.strip():
            raise UsageError(f"--from {name} is empty")
        out[name] = value
    return out


def _fit(arr: np.ndarray, res: int, name: str, resample) -> np.ndarray:
    if arr.shape[:2] != (res, res):
        log.info("%s: resizing %dx%d to %dx%d (centre crop to a square first)", name, arr.shape[1], arr.shape[0], res, res)
        arr = centre_square_resize(arr, res, resample)
    return arr


def load_inputs(spec: dict[str, str], res: int) -> dict:
    """Read ``--from`` values into batched raw inputs (batch of one) for ``generate``."""
    inputs: dict = {}
    for name, value in spec.items():
        if name in ("caption", "count"):
            inputs[name] = [value]
            continue
        path = Path(value)
        if not path.is_file():
            raise UsageError(f"--from {name}: no file at {path}")
        try:
            if name == "boxes":
                inputs[name] = [read_boxes(path)]
            elif name in ("rgb", "normals"):  # normals: the PNG encoding round((n + 1) * 127.5)
                inputs[name] = torch.from_numpy(_fit(read_rgb(path), res, name, Image.BICUBIC if name == "rgb" else Image.NEAREST).copy()).permute(2, 0, 1)[None]
            elif name == "depth":
                inputs[name] = torch.from_numpy(_fit(read_depth(path), res, name, Image.NEAREST).copy())[None, None]
            elif name == "semseg":
                inputs[name] = torch.from_numpy(_fit(read_semseg(path), res, name, Image.NEAREST).astype(np.int64))[None]
        except Exception as exn:
            raise UsageError(f"--from {name}: cannot read {path}: {exn}") from None
    return inputs


def save_outputs(out: Path, inputs: dict, outputs: dict, scale: int = 4) -> list[Path]:
    """Write every generated modality of sample 0 plus ``overview.png``; returns the files written.

    Files are made in a staging folder and moved into ``out`` only when all are written, so a
    failure leaves nothing half-done behind."""
    final = out
    out = final / f".staging-{os.getpid()}"
    out.mkdir(parents=True, exist_ok=True)
    try:
        written = _write_all(out, inputs, outputs, scale)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    moved = []
    for path in written:
        os.replace(path, final / path.name)
        moved.append(final / path.name)
    shutil.rmtree(out, ignore_errors=True)
    return moved


def _write_all(out: Path, inputs: dict, outputs: dict, scale: int) -> list[Path]:
    written: list[Path] = []

    def save_png(name: str, arr: np.ndarray) -> None:
        Image.fromarray(arr).save(out / name)
        written.append(out / name)

    base = None
    if "rgb" in inputs:
        base = inputs["rgb"][0].permute(1, 2, 0).numpy()
    elif "rgb" in outputs:
        base = outputs["rgb"][0].permute(1, 2, 0).numpy()
    panels: list[np.ndarray] = []
    for name, value in inputs.items():  # inputs first, for the overview
        if name == "rgb":
            panels.append(upscale(base, scale))
        elif name == "depth":
            panels.append(upscale(colorize_depth(value[0, 0].numpy()), scale))
        elif name == "semseg":
            panels.append(upscale(colorize_semseg(value[0].numpy()), scale))
        elif name == "normals":
            panels.append(upscale(value[0].permute(1, 2, 0).numpy(), scale))
        elif name in ("caption", "count"):
            panels.append(caption_strip(f"{name}: " + value[0], 64 * scale))
    for name, values in outputs.items():
        v = values[0]
        if name == "rgb":
            img = v.permute(1, 2, 0).numpy()
            save_png("rgb.png", img)
            panels.append(upscale(img, scale))
        elif name == "depth":
            d = v[0].numpy()
            np.save(out / "depth.npy", d)
            written.append(out / "depth.npy")
            save_png("depth.png", colorize_depth(d))
            panels.append(upscale(colorize_depth(d), scale))
        elif name == "semseg":
            s = v.numpy()
            save_png("semseg.png", colorize_semseg(s))
            if base is not None:
                save_png("semseg_overlay.png", overlay(base, s))
            panels.append(upscale(overlay(base, s) if base is not None else colorize_semseg(s), scale))
        elif name == "boxes":
            (out / "boxes.json").write_text(json.dumps(v, indent=1) + "\n")
            written.append(out / "boxes.json")
            canvas = base if base is not None else np.full((64, 64, 3), 255, np.uint8)
            drawn = draw_boxes(canvas, v, scale)
            save_png("boxes.png", drawn)
            panels.append(drawn)
        elif name == "normals":
            img = normals_to_uint8(v.permute(1, 2, 0).numpy())
            save_png("normals.png", img)
            panels.append(upscale(img, scale))
        elif name in ("caption", "count"):
            (out / f"{name}.txt").write_text(v + "\n")
            written.append(out / f"{name}.txt")
            panels.append(caption_strip(f"out {name}: " + v, 64 * scale))
    save_png("overview.png", grid([panels]))
    return written


def tokenizer_dir(model_dir: str | Path, explicit: str | Path | None = None) -> Path:
    """The tokenizer set: ``explicit``, else the one the training run recorded next to the model."""
    if explicit:
        return Path(explicit)
    record = Path(model_dir) / "tokenizers.json"
    if record.is_file():
        path = json.loads(record.read_text()).get("tokenizers")
        if path:
            return Path(path)
    raise ValueError(f"no tokenizer set known for {model_dir}: pass --tokenizers DIR")


def open_model(model_dir: str | Path, tokenizers: str | Path | None = None, dtype: str = "float32", adapter: str | Path | None = None):
    """(model in eval mode cast to ``dtype``, its TokenizerSet); a missing file is a ValueError
    naming the path. ``adapter``: a LoRA adapter directory (``fourm.models.lora``) merged into
    the base once here, so decoding runs at the base model's speed; its tokenizer set (grown with
    the adapter's new modalities) is the default one."""
    from fourm.models.build import load_model
    from fourm.models.lora import load_adapters
    from fourm.tokenizers.tokenizer_set import TokenizerSet
    from fourm.vocab import VOCAB_FILE

    for name in ("config.json", "model.safetensors"):
        if not (Path(model_dir) / name).is_file():
            raise ValueError(f"--model {model_dir}: missing {Path(model_dir) / name}")
    tok_dir = tokenizer_dir(adapter if adapter and not tokenizers else model_dir, tokenizers)
    if not (tok_dir / VOCAB_FILE).is_file():
        raise ValueError(f"no tokenizer set at {tok_dir} (missing {tok_dir / VOCAB_FILE})")
    if adapter:
        model = load_adapters(model_dir, [adapter])[0].merge_and_unload()
    else:
        model = load_model(model_dir)
    tset = TokenizerSet.from_pretrained(tok_dir)
    if tset.vocab.size != model.config.vocab_size:
        raise ValueError(f"the tokenizer set {tok_dir} has {tset.vocab.size} ids, the model {model.config.vocab_size}")
    return model.to(getattr(torch, dtype)).eval(), tset
