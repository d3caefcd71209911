"""Pseudo-label a folder of photos (or existing raw shards) into a multimodal dataset of the
embedded dataset's format, with the models of ``fourm.data.labellers``.

Output shard ``i`` holds input chunk ``i`` (``shard_size`` images of the sorted folder, or input
shard ``i``), so the work splits across machines by shard index (``i % num_shards ==
shard_index``) and a re-run skips the shards already done. Each shard is written under a temporary
name and renamed when whole; its record (counts, skipped files, image sizes) goes to
``OUT/.pseudo-label/shard-NNNNNN.json`` after it, and marks it done. ``OUT/manifest.json`` is
written by whichever run finds every shard done, so a directory with a manifest is complete.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from fourm.cli import UsageError
from fourm.data.add_modalities import _raw_samples
from fourm.data.codecs import CorruptMember, decode_member, encode_png
from fourm.data.folder_import import RGB_EXTS, _by_stem, _common_square_side, _key, sample_keys
from fourm.data.labellers import BoxesLabeller, CaptionLabeller, DepthLabeller, SemsegLabeller
from fourm.data.readers import centre_square_resize, read_rgb
from fourm.data.shards import MANIFEST, SHARD_PATTERN, open_tar_writer, read_manifest, write_json_atomic, write_manifest
from fourm.modalities import MODALITIES

log = logging.getLogger(__name__)

LABELLER_VERSION = "pseudo-label/1"
STATE_DIR = ".pseudo-label"
LABELLED = ("depth", "semseg", "boxes", "caption")


@dataclass
class PseudoLabelConfig:
    """What to label and how. Model fields are local model directories (None: not labelled)."""

    depth: str | None = None
    semseg: str | None = None
    boxes: str | None = None
    caption: str | None = None
    depth_kind: str | None = None  # "metric" | "relative": override the model config's
    score_threshold: float = 0.5
    max_caption_tokens: int = 30
    batch_size: int = 8
    device: str = "cpu"
    shard_size: int = 1000
    res: int | None = None  # centre-crop and resize folder images to res x res


def _inputs(src: Path, shard_size: int) -> tuple[str, list[list]]:
    """("shards", [[url], ...]) for a raw shard directory, or ("images", [[paths of one output
    shard], ...]) for a folder of images (``SRC/rgb/`` when there is one)."""
    if not src.is_dir():
        raise UsageError(f"--src {src} is not a directory")
    urls = sorted(str(p) for p in src.glob("shard-*.tar"))
    if urls or (src / MANIFEST).is_file():
        if read_manifest(src).get("kind") == "tokens":
            raise UsageError(f"--src {src} holds token shards; pseudo-label raw shards or images")
        if not urls:
            raise UsageError(f"--src {src}: no shards found")
        return "shards", [[u] for u in urls]
    folder = src / "rgb" if (src / "rgb").is_dir() else src
    files = _by_stem(folder, RGB_EXTS)
    if not files:
        raise UsageError(f"--src {src}: no images in {folder} (expected *.png, *.jpg or *.jpeg) and no shards")
    sample_keys(files)
    paths = list(files.values())
    return "images", [paths[i : i + shard_size] for i in range(0, len(paths), shard_size)]


def _samples(kind: str, items: list, res: int | None, skipped: list[dict]):
    """(key, rgb array, members to keep) for one output shard's inputs; unreadable ones are skipped."""
    if kind == "images":
        for path in items:
            try:
                rgb = read_rgb(path)
            except Exception as exn:
                skipped.append({"path": str(path), "why": f"{type(exn).__name__}: {exn}"})
                log.warning("skipping unreadable image %s: %s", path, exn)
                continue
            yield _key(path.stem), (centre_square_resize(rgb, res, Image.BICUBIC) if res else rgb), {}
        return
    for sample in _raw_samples(items):
        where = f"{sample['__key__']} in {os.path.basename(items[0])}"
        try:
            rgb = decode_member("rgb", sample["rgb.png"]).permute(1, 2, 0).numpy()
        except (KeyError, CorruptMember) as exn:
            skipped.append({"path": where, "why": "no rgb.png" if isinstance(exn, KeyError) else str(exn)})
            log.warning("skipping %s: no readable rgb.png", where)
            continue
        yield sample["__key__"], rgb, {k: v for k, v in sample.items() if not k.startswith("__")}


class PseudoLabeller:
    """The configured labellers; ``label_shard`` writes one output shard."""

    def __init__(self, cfg: PseudoLabelConfig):
        if cfg.device.startswith("cuda") and not torch.cuda.is_available():
            raise UsageError(f"--device {cfg.device}: CUDA is not available here")
        if not any(getattr(cfg, m) for m in LABELLED):
            raise UsageError("give at least one model: --depth, --semseg, --boxes or --caption")
        self.cfg = cfg
        self.labellers = {}
        if cfg.depth:
            self.labellers["depth"] = DepthLabeller(cfg.depth, cfg.device, cfg.depth_kind)
        if cfg.semseg:
            self.labellers["semseg"] = SemsegLabeller(cfg.semseg, cfg.device)
        if cfg.boxes:
            self.labellers["boxes"] = BoxesLabeller(cfg.boxes, cfg.device, cfg.score_threshold)
        if cfg.caption:
            self.labellers["caption"] = CaptionLabeller(cfg.caption, cfg.device, cfg.max_caption_tokens)

    @torch.no_grad()
    def _label_batch(self, batch: list[tuple]) -> list[dict]:
        images = [Image.fromarray(rgb) for _, rgb, _ in batch]
        labels = {name: lab(images) for name, lab in self.labellers.items()}
        out = []
        for i, (key, rgb, kept) in enumerate(batch):
            members = {**kept, "rgb.png": kept.get("rgb.png") or encode_png(rgb)}
            for name, lab in self.labellers.items():
                members.pop(lab.member, None)
                if labels[name][i] is not None:
                    members[lab.member] = labels[name][i]
            out.append({"__key__": key, **members})
        return out

    def label_shard(self, kind: str, items: list, path: Path, bar) -> dict:
        """Label one input chunk into ``path`` (temp name, then rename); returns its record."""
        skipped: list[dict] = []
        counts = {m: 0 for m in MODALITIES}
        sizes: set[tuple[int, int]] = set()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        writer = open_tar_writer(tmp)
        try:
            batch: list[tuple] = []
            samples = _samples(kind, items, self.cfg.res, skipped)
            for sample in itertools.chain(samples, [None]):  # None: flush the last batch
                if sample is not None:
                    batch.append(sample)
                    sizes.add(sample[1].shape[:2])
                if batch and (sample is None or len(batch) == self.cfg.batch_size):
                    for members in self._label_batch(batch):
                        writer.write(members)
                        for name, m in MODALITIES.items():
                            counts[name] += m.member in members
                    bar.update(len(batch))
                    batch = []
            writer.close()
            os.replace(tmp, path)
        except BaseException:
            writer.close()
            tmp.unlink(missing_ok=True)
            raise
        return {"num_samples": counts["rgb"], "modality_counts": counts, "sizes": sorted(sizes), "skipped_files": skipped}

    def settings(self, src: Path, kind: str, num_inputs: int) -> dict:
        """What makes a run's shards what they are (a re-run must match it to resume)."""
        cfg = {k: v for k, v in asdict(self.cfg).items() if k not in ("batch_size", "device")}
        models = {name: lab.info for name, lab in self.labellers.items()}
        return {"src": str(src.resolve()), "src_kind": kind, "num_inputs": num_inputs, "config": cfg, "models": models}


def _check_run(out: Path, settings: dict) -> Path:
    """Create ``out``'s state folder, or check that a previous run there used the same settings."""
    state = out / STATE_DIR
    run_file = state / "run.json"
    if run_file.is_file():
        old = json.loads(run_file.read_text())
        if old != settings:
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise UsageError(f"--out {out} holds a pseudo-labelling run with other settings ({', '.join(diff)} differ); use a new --out")
    elif list(out.glob("shard-*.tar")) or (out / MANIFEST).exists():
        raise UsageError(f"--out {out} already holds a dataset that is not a pseudo-labelling run")
    state.mkdir(parents=True, exist_ok=True)
    if not run_file.is_file():
        write_json_atomic(run_file, settings)
    return state


def _manifest(out: Path, state: Path, settings: dict, labeller: PseudoLabeller, num_shards: int) -> dict:
    records = [json.loads((state / f"{SHARD_PATTERN.format(i)}.json").read_text()) for i in range(num_shards)]
    src = Path(settings["src"])
    base = {k: v for k, v in read_manifest(src).items() if k not in ("shards", "num_samples")} if settings["src_kind"] == "shards" else {}
    counts = {m: sum(r["modality_counts"][m] for r in records) for m in MODALITIES}
    manifest = {**base, "generator": LABELLER_VERSION, "source": str(src)}
    manifest["modalities"] = [m for m, c in counts.items() if c]
    manifest["members"] = {m: MODALITIES[m].member for m in manifest["modalities"]}
    manifest["modality_counts"] = {m: c for m, c in counts.items() if c or m in labeller.labellers}
    sizes = {tuple(s) for r in records for s in r["sizes"]}
    manifest["resolution"] = base.get("resolution") or _common_square_side(sizes)
    if "depth" in labeller.labellers:
        manifest["depth"] = labeller.labellers["depth"].manifest()
    if "semseg" in labeller.labellers:
        manifest["classes"] = labeller.labellers["semseg"].classes
    if "boxes" in labeller.labellers:
        lab = labeller.labellers["boxes"]
        manifest["boxes"] = {"format": "xyxy", "coordinates": "pixel edges, x1/y1 exclusive", "labels": [lab.labels[k] for k in sorted(lab.labels)], "score_threshold": lab.threshold}
    manifest["pseudo_labels"] = {"models": settings["models"], "config": settings["config"]}
    manifest["skipped_files"] = [s for r in records for s in r["skipped_files"]]
    manifest["num_samples"] = sum(r["num_samples"] for r in records)
    if manifest["num_samples"] == 0:
        raise UsageError(f"--src {src}: no readable image")
    manifest["shards"] = [{"name": SHARD_PATTERN.format(i), "num_samples": r["num_samples"]} for i, r in enumerate(records)]
    write_manifest(out, manifest)
    return manifest


def pseudo_label(src: str | os.PathLike, out: str | os.PathLike, cfg: PseudoLabelConfig, shard_index: int = 0, num_shards: int = 1, progress: bool = True) -> dict:
    """Label this machine's shards (``i % num_shards == shard_index``) of ``src`` into ``out``.

    Returns ``{"done", "skipped_shards", "images", "seconds", "images_per_second", "manifest"}``;
    ``manifest`` is None until every shard of the dataset is done (by this run or others).
    """
    if not 0 <= shard_index < num_shards:
        raise UsageError(f"--shard-index must be in 0..{num_shards - 1} for --num-shards {num_shards}, got {shard_index}")
    src, out = Path(src), Path(out)
    kind, chunks = _inputs(src, cfg.shard_size)
    labeller = PseudoLabeller(cfg)
    settings = labeller.settings(src, kind, sum(len(c) for c in chunks))
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    state = _check_run(out, settings)
    mine = [i for i in range(len(chunks)) if i % num_shards == shard_index]
    todo = [i for i in mine if not ((state / f"{SHARD_PATTERN.format(i)}.json").is_file() and (out / SHARD_PATTERN.format(i)).is_file())]
    if len(todo) < len(mine):
        log.info("skipping %d of %d shards already done", len(mine) - len(todo), len(mine))
    if kind == "images":
        total = sum(len(chunks[i]) for i in todo)
    else:  # the source manifest's counts, where it has them
        known = {s.get("name"): s.get("num_samples") for s in read_manifest(src).get("shards", [])}
        total = sum(known.get(Path(chunks[i][0]).name) or 0 for i in todo) or None
    start, images = time.perf_counter(), 0
    with tqdm(total=total, desc="pseudo-label", unit="img", disable=not progress, leave=False) as bar:
        for i in todo:
            record = labeller.label_shard(kind, chunks[i], out / SHARD_PATTERN.format(i), bar)
            write_json_atomic(state / f"{SHARD_PATTERN.format(i)}.json", record)
            images += record["num_samples"]
    seconds = time.perf_counter() - start
    rate = images / seconds if seconds > 0 else 0.0
    if todo:
        log.info("labelled %d images in %d shards in %.1f s (%.2f images/s)", images, len(todo), seconds, rate)
    missing = [i for i in range(len(chunks)) if not (state / f"{SHARD_PATTERN.format(i)}.json").is_file()]
    manifest = None
    if missing:
        log.info("%d of %d shards still to do (by other --shard-index runs); the last run writes %s", len(missing), len(chunks), MANIFEST)
    else:
        manifest = _manifest(out, state, settings, labeller, len(chunks))
        log.info("dataset complete: %d samples in %d shards at %s (%s)", manifest["num_samples"], len(chunks), out, ", ".join(f"{k} {v}" for k, v in manifest["modality_counts"].items()))
    return {"done": len(todo), "skipped_shards": len(mine) - len(todo), "images": images, "seconds": seconds, "images_per_second": rate, "manifest": manifest}
