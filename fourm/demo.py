"""The main job, ``make demo``: stages run in order, each reused when its output is complete.

Stages so far: render the embedded dataset (train and held-out splits), read the held-out split
back through the shard loader, and report dataset statistics and an overview picture.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from fourm.config import to_dict
from fourm.data.loader import LoaderConfig, build_loader
from fourm.data.shards import MANIFEST
from fourm.data.synth.generate import GENERATOR_VERSION, generate_dataset
from fourm.viz import caption_strip, colorize_depth, draw_boxes, grid, overlay, upscale

log = logging.getLogger(__name__)


@dataclass
class DemoDataConfig:
    train_scenes: int = 20000
    val_scenes: int = 500
    res: int = 64
    train_seed: int = 0
    val_seed: int = 1
    shard_size: int = 1000

    def __post_init__(self) -> None:
        for name in ("train_scenes", "val_scenes", "shard_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if not 16 <= self.res <= 1024:
            raise ValueError(f"data.res must be between 16 and 1024, got {self.res}")


@dataclass
class DemoConfig:
    data: DemoDataConfig = field(default_factory=DemoDataConfig)
    overview_scenes: int = 8

    def __post_init__(self) -> None:
        if self.overview_scenes < 0:
            raise ValueError(f"overview_scenes must be >= 0, got {self.overview_scenes}")


def scale_to_budget(config: DemoConfig, minutes: float) -> DemoConfig:
    """Shrink the stages for a budget below the 30 minutes the defaults are sized for."""
    factor = min(1.0, max(minutes, 0.5) / 30.0)
    if factor < 1.0:
        config.data.train_scenes = max(min(100, config.data.train_scenes), int(config.data.train_scenes * factor))
        config.data.val_scenes = max(min(16, config.data.val_scenes), int(config.data.val_scenes * min(1.0, factor * 2)))
    return config


def _dataset_complete(directory: Path, num: int, res: int, seed: int) -> bool:
    path = directory / MANIFEST
    if not path.is_file():
        return False
    try:
        m = json.loads(path.read_text())
    except ValueError:
        return False
    return (m.get("num_samples"), m.get("resolution"), m.get("seed"), m.get("generator")) == (num, res, seed, GENERATOR_VERSION)


def stage_data(config: DemoConfig, out: Path) -> dict:
    """Render data/train and data/val unless already there with the same size, resolution and seed."""
    report = {}
    for split, num, seed in (("train", config.data.train_scenes, config.data.train_seed), ("val", config.data.val_scenes, config.data.val_seed)):
        directory = out / "data" / split
        if _dataset_complete(directory, num, config.data.res, seed):
            log.info("data/%s: reusing %d scenes", split, num)
            report[split] = {"num_samples": num, "reused": True}
            continue
        manifest = generate_dataset(directory, num, res=config.data.res, seed=seed, shard_size=config.data.shard_size, overwrite=True)
        report[split] = {"num_samples": num, "reused": False, "scenes_per_second": round(manifest["scenes_per_second"], 1)}
    return report


def stage_inspect(config: DemoConfig, out: Path) -> dict:
    """Read the held-out split through the loader; statistics and an overview grid."""
    loader, skipped = build_loader(out / "data" / "val", LoaderConfig(modalities=("rgb", "depth", "semseg", "boxes", "caption"), batch_size=32, shuffle=0, num_workers=0))
    manifest = json.loads((out / "data" / "val" / MANIFEST).read_text())
    classes = manifest["classes"]
    n, objects, words = 0, Counter(), []
    pixel_counts = np.zeros(len(classes), np.int64)
    depth_min, depth_max = np.inf, 0.0
    panels = []
    start = time.perf_counter()
    for batch in loader:
        for i in range(len(batch["caption"])):
            n += 1
            objects[len(batch["boxes"][i])] += 1
            words.append(len(batch["caption"][i].split()))
            if len(panels) < config.overview_scenes:
                rgb = batch["rgb"][i].permute(1, 2, 0).numpy()
                sem = batch["semseg"][i].numpy()
                dep = batch["depth"][i, 0].numpy()
                s = max(1, 128 // rgb.shape[0])
                row = [upscale(rgb, s), upscale(colorize_depth(dep), s), upscale(overlay(rgb, sem), s), draw_boxes(rgb, batch["boxes"][i], s)]
                row.append(caption_strip(batch["caption"][i], 2 * row[0].shape[1]))
                panels.append(row)
        pixel_counts += np.bincount(batch["semseg"].flatten().numpy(), minlength=len(classes))[: len(classes)]
        depth_min = min(depth_min, float(batch["depth"].min()))
        depth_max = max(depth_max, float(batch["depth"].max()))
    read_s = time.perf_counter() - start
    samples = out / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    if panels:
        Image.fromarray(grid(panels)).save(samples / "data_overview.png")
    return {
        "val_samples_read": n,
        "skipped": skipped.as_dict(),
        "boxes_per_scene": dict(sorted(objects.items())),
        "caption_words_mean": round(float(np.mean(words)), 2),
        "class_pixel_fraction": {c: round(float(v) / max(1, int(pixel_counts.sum())), 4) for c, v in zip(classes, pixel_counts)},
        "depth_range_m": [round(depth_min, 3), round(depth_max, 3)],
        "read_samples_per_second": round(n / read_s, 1) if read_s > 0 else None,
        "overview": str(samples / "data_overview.png"),
    }


def write_report(out: Path, config: DemoConfig, stages: dict, seconds: float) -> None:
    """``report.json`` (everything) and ``report.md`` (a readable summary)."""
    report = {"config": to_dict(config), "stages": stages, "seconds": round(seconds, 1)}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    ins = stages["inspect"]
    lines = [
        "# fourm demo report",
        "",
        f"Total time: {seconds:.0f} s. Config: `{out / 'config.json'}`.",
        "",
        "## Data",
        "",
        "| split | scenes | reused | scenes/s |",
        "| --- | ---: | :---: | ---: |",
    ]
    for split, rec in stages["data"].items():
        lines.append(f"| {split} | {rec['num_samples']} | {'yes' if rec['reused'] else 'no'} | {rec.get('scenes_per_second', '-')} |")
    lines += [
        "",
        "## Held-out split read back through the shard loader",
        "",
        f"- samples read: {ins['val_samples_read']} (skipped: {ins['skipped']['total']}), {ins['read_samples_per_second']} samples/s",
        f"- boxes per scene: {ins['boxes_per_scene']}",
        f"- caption length: {ins['caption_words_mean']} words on average",
        f"- depth range: {ins['depth_range_m'][0]} to {ins['depth_range_m'][1]} m",
        f"- pixel share per class: {ins['class_pixel_fraction']}",
        "",
        "![overview](samples/data_overview.png)",
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))


def run_demo(config: DemoConfig, out: Path) -> dict:
    """Run every stage into ``out``; returns the report dict."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(to_dict(config), indent=2) + "\n")
    start = time.perf_counter()
    stages = {"data": stage_data(config, out)}
    stages["inspect"] = stage_inspect(config, out)
    write_report(out, config, stages, time.perf_counter() - start)
    return json.loads((out / "report.json").read_text())
