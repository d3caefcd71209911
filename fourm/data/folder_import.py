"""Import a folder dataset into raw shards of the same format as the embedded dataset.

Layout of ``SRC`` (samples are matched by file stem; every modality but rgb is optional per sample)::

    SRC/rgb/<stem>.{png,jpg,jpeg}
    SRC/depth/<stem>.{npy,png}       float metres (.npy) or 16-bit PNG in millimetres (0 = no data)
    SRC/semseg/<stem>.png            8-bit class ids
    SRC/boxes/<stem>.json            [{"bbox": [x0, y0, x1, y1], "label": str}, ...] pixels
    SRC/instances.json or SRC/annotations/instances*.json or --coco FILE   COCO instances file
    SRC/captions.jsonl               {"id": "<stem>", "text": "..."} per line
    SRC/classes.json | classes.txt   optional semseg class names in id order

A file that cannot be read is reported by name and skipped (an unreadable rgb image skips its
sample); depth or semseg whose size differs from the rgb image is an error naming the file, and
then nothing is written.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from fourm.cli import UsageError
from fourm.data.codecs import encode_json, encode_npy, encode_png
from fourm.data.readers import centre_square, centre_square_resize, read_boxes, read_depth, read_rgb, read_semseg
from fourm.data.shards import ShardSink, prepare_output_dir

log = logging.getLogger(__name__)

RGB_EXTS = (".png", ".jpg", ".jpeg")
IMPORTER_VERSION = "import-folder/1"


@dataclass
class _Sample:
    stem: str
    rgb: np.ndarray
    depth: np.ndarray | None = None
    semseg: np.ndarray | None = None
    boxes: list[dict] | None = None
    caption: str | None = None


@dataclass
class ImportReport:
    """What an import did: the manifest written and the files that were skipped (path, why)."""

    manifest: dict
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _by_stem(folder: Path, exts: tuple[str, ...]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    if not folder.is_dir():
        return found
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in exts and path.is_file():
            if path.stem in found:
                raise UsageError(f"two files for sample {path.stem!r}: {found[path.stem]} and {path}")
            found[path.stem] = path
    return found


def find_coco_file(src: Path) -> Path | None:
    """The COCO instances file in ``src``, if any: ``instances.json`` or ``annotations/instances*.json``."""
    candidates = [src / "instances.json"] + sorted((src / "annotations").glob("instances*.json"))
    found = [c for c in candidates if c.is_file()]
    if len(found) > 1:
        raise UsageError(f"several COCO files in {src}: {', '.join(map(str, found))}; pick one with --coco")
    return found[0] if found else None


def load_coco_boxes(path: Path) -> dict[str, list[dict]]:
    """COCO instances JSON -> {image file stem: [{"bbox": xyxy pixels, "label": category name}]}.

    Crowd annotations are kept (their box is a box too); COCO's [x, y, w, h] becomes [x0, y0, x1, y1].
    """
    try:
        coco = json.loads(path.read_text())
        categories = {int(c["id"]): str(c["name"]) for c in coco["categories"]}
        images = {int(im["id"]): Path(im["file_name"]).stem for im in coco["images"]}
        out: dict[str, list[dict]] = {stem: [] for stem in images.values()}
        for ann in coco["annotations"]:
            x, y, w, h = (float(v) for v in ann["bbox"])
            out[images[int(ann["image_id"])]].append(
                {"bbox": [x, y, x + w, y + h], "label": categories[int(ann["category_id"])]}
            )
    except (OSError, ValueError, KeyError, TypeError) as exn:
        raise UsageError(f"cannot read COCO file {path}: {type(exn).__name__}: {exn}") from None
    return out


def load_captions(path: Path, skipped: list[tuple[str, str]]) -> dict[str, str]:
    """captions.jsonl -> {id: text}; a malformed line is reported (file:line) and skipped."""
    captions: dict[str, str] = {}
    if not path.is_file():
        return captions
    for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            captions[str(rec["id"])] = str(rec["text"]).strip()
        except (ValueError, KeyError, TypeError) as exn:
            skipped.append((f"{path}:{lineno}", f"malformed caption line ({type(exn).__name__})"))
            log.warning("skipping %s:%d: malformed caption line (%s)", path, lineno, type(exn).__name__)
    return captions


def load_classes(src: Path) -> list[str] | None:
    """Semseg class names from ``classes.json`` (a list) or ``classes.txt`` (one per line)."""
    if (src / "classes.json").is_file():
        try:
            names = json.loads((src / "classes.json").read_text())
        except ValueError as exn:
            raise UsageError(f"cannot read {src / 'classes.json'}: {exn}") from None
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise UsageError(f"{src / 'classes.json'} must be a JSON list of names")
        return names
    if (src / "classes.txt").is_file():
        return [ln.strip() for ln in (src / "classes.txt").read_text().splitlines() if ln.strip()]
    return None


def _crop_resize(sample: _Sample, res: int) -> _Sample:
    """Centre-crop to a square and resize to ``res``: bicubic for rgb, nearest for depth and semseg;
    boxes are mapped and clipped, and dropped when nothing of them remains."""
    top, left, side = centre_square(*sample.rgb.shape[:2])
    scale = res / side
    sample.rgb = centre_square_resize(sample.rgb, res, Image.BICUBIC)
    if sample.depth is not None:
        sample.depth = centre_square_resize(sample.depth, res, Image.NEAREST).astype(np.float32)
    if sample.semseg is not None:
        sample.semseg = centre_square_resize(sample.semseg, res, Image.NEAREST)
    if sample.boxes is not None:
        mapped = []
        for b in sample.boxes:
            x0, y0, x1, y1 = b["bbox"]
            x0, x1 = [min(max((v - left) * scale, 0.0), res) for v in (x0, x1)]
            y0, y1 = [min(max((v - top) * scale, 0.0), res) for v in (y0, y1)]
            if x1 > x0 and y1 > y0:
                mapped.append({"bbox": [round(v, 3) for v in (x0, y0, x1, y1)], "label": b["label"]})
        sample.boxes = mapped
    return sample


def _common_square_side(sizes: set[tuple[int, int]]) -> int | None:
    """The side length when every image is the same square size, else None."""
    if len(sizes) == 1:
        h, w = next(iter(sizes))
        if h == w:
            return h
    return None


def _key(stem: str) -> str:
    # WebDataset splits member names at the first dot
    return stem.replace(".", "_")


def sample_keys(stems) -> dict[str, str]:
    """{shard key: file stem}; UsageError when two stems map to the same key."""
    keys: dict[str, str] = {}
    for stem in stems:
        if _key(stem) in keys:
            raise UsageError(f"samples {keys[_key(stem)]!r} and {stem!r} map to the same key {_key(stem)!r}")
        keys[_key(stem)] = stem
    return keys


def import_folder(
    src: str | os.PathLike,
    out: str | os.PathLike,
    res: int | None = None,
    shard_size: int = 1000,
    coco: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ImportReport:
    """Convert the folder dataset at ``src`` into ``out/shard-*.tar`` + ``out/manifest.json``.

    Args:
        res: if given, centre-crop and resize every sample to ``res`` x ``res``.
    Raises:
        UsageError: no images, a size mismatch, an unreadable COCO file, an existing dataset at ``out``.
    """
    src = Path(src)
    if not src.is_dir():
        raise UsageError(f"--src {src} is not a directory")
    rgb_files = _by_stem(src / "rgb", RGB_EXTS)
    if not rgb_files:
        raise UsageError(f"no images in {src / 'rgb'} (expected *.png, *.jpg or *.jpeg)")
    sample_keys(rgb_files)
    depth_files = _by_stem(src / "depth", (".npy", ".png"))
    semseg_files = _by_stem(src / "semseg", (".png",))
    box_files = _by_stem(src / "boxes", (".json",))
    coco_path = Path(coco) if coco is not None else find_coco_file(src)
    if coco_path is not None and not coco_path.is_file():
        raise UsageError(f"--coco {coco_path} does not exist")
    coco_boxes = load_coco_boxes(coco_path) if coco_path is not None else {}
    skipped: list[tuple[str, str]] = []
    captions = load_captions(src / "captions.jsonl", skipped)
    classes = load_classes(src)

    out_dir = prepare_output_dir(out, overwrite)
    counts = {m: 0 for m in ("rgb", "depth", "semseg", "boxes", "caption")}
    sizes: set[tuple[int, int]] = set()

    def read_optional(path: Path | None, reader):
        if path is None:
            return None
        try:
            return reader(path)
        except Exception as exn:
            skipped.append((str(path), f"{type(exn).__name__}: {exn}"))
            log.warning("skipping unreadable file %s: %s", path, exn)
            return None

    with ShardSink(out_dir, shard_size) as sink:
        for stem, rgb_path in tqdm(rgb_files.items(), desc="import", unit="img", disable=not progress, leave=False):
            rgb = read_optional(rgb_path, read_rgb)
            if rgb is None:
                continue
            sample = _Sample(stem, rgb)
            sample.depth = read_optional(depth_files.get(stem), read_depth)
            sample.semseg = read_optional(semseg_files.get(stem), read_semseg)
            for name, path in (("depth", depth_files.get(stem)), ("semseg", semseg_files.get(stem))):
                arr = getattr(sample, name)
                if arr is not None and arr.shape[:2] != rgb.shape[:2]:
                    raise UsageError(f"{path} is {arr.shape[1]}x{arr.shape[0]} but {rgb_path} is {rgb.shape[1]}x{rgb.shape[0]}")
            if stem in box_files:
                sample.boxes = read_optional(box_files[stem], read_boxes)
            elif stem in coco_boxes:
                sample.boxes = coco_boxes[stem]
            sample.caption = captions.get(stem)
            if res is not None:
                sample = _crop_resize(sample, res)
            members: dict = {"__key__": _key(stem), "rgb.png": encode_png(sample.rgb)}
            if sample.depth is not None:
                members["depth.npy"] = encode_npy(sample.depth)
            if sample.semseg is not None:
                members["semseg.png"] = encode_png(sample.semseg)
            if sample.boxes is not None:
                members["boxes.json"] = encode_json(sample.boxes)
            if sample.caption is not None:
                members["caption.txt"] = sample.caption.encode("utf-8")
            for name, suffix in (("rgb", "rgb.png"), ("depth", "depth.npy"), ("semseg", "semseg.png"), ("boxes", "boxes.json"), ("caption", "caption.txt")):
                counts[name] += suffix in members
            sizes.add(sample.rgb.shape[:2])
            sink.write(members)
        if sink.num_samples == 0:
            raise UsageError(f"no readable image in {src / 'rgb'}")
        manifest = sink.finish(
            {
                "generator": IMPORTER_VERSION,
                "source": str(src.resolve()),
                "coco": str(coco_path) if coco_path else None,
                "resolution": res if res is not None else _common_square_side(sizes),
                "modalities": [m for m, c in counts.items() if c],
                "modality_counts": counts,
                "classes": classes,
                "depth": {"unit": "m", "kind": "metric", "axis": "z", "invalid": 0.0},
                "boxes": {"format": "xyxy", "coordinates": "pixel edges, x1/y1 exclusive"},
                "skipped_files": [{"path": p, "why": w} for p, w in skipped],
            }
        )
    if skipped:
        log.warning("skipped %d unreadable files or lines (listed in the manifest's skipped_files)", len(skipped))
    log.info("imported %d samples into %s (%s)", manifest["num_samples"], out_dir, ", ".join(f"{k} {v}" for k, v in counts.items()))
    return ImportReport(manifest, skipped)
