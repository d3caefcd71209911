"""Render the embedded dataset into raw WebDataset shards.

Scene ``i`` of a run with seed ``s`` is drawn from ``numpy.random.default_rng([s, i])``, so a
scene does not depend on the number of workers or shards: same seed, same bytes.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fourm.data.codecs import encode_json, encode_npy, encode_png
from fourm.data.shards import ShardSink, prepare_output_dir
from fourm.data.synth.caption import make_caption
from fourm.data.synth.render import FAR, render_scene, tight_boxes
from fourm.data.synth.scene import BOX_LABELS, CLASSES, COLORS, SHAPES, SIZES, sample_scene

log = logging.getLogger(__name__)

GENERATOR_VERSION = "synth-scenes/2"  # /2: the instance map (instance.png)
SYNTH_MEMBERS = ("rgb", "depth", "semseg", "boxes", "caption", "scene", "instance")
MAX_RESAMPLES = 20


def render_sample(seed: int, index: int, res: int) -> dict:
    """Render scene ``index`` of seed ``seed`` to shard members (suffix -> bytes, plus ``__key__``).

    A scene in which no object is visible at all is redrawn (from the same generator), so every
    sample shows at least one object.
    """
    rng = np.random.default_rng([seed, index])
    for _ in range(MAX_RESAMPLES):
        scene = sample_scene(rng)
        view = render_scene(scene, res)
        if any(o.visible_pixels > 0 for o in scene.objects):
            break
    boxes, instance = [], np.zeros(view.instance.shape, np.uint8)
    for k, (obj, box) in enumerate(zip(scene.objects, tight_boxes(view.instance, len(scene.objects)))):
        if box is not None:
            boxes.append({"bbox": list(box), "label": obj.label})
            instance[view.instance == k] = len(boxes)  # the len(boxes)-th box of boxes.json
    caption = make_caption(scene, rng)
    scene_json = scene.to_json()
    scene_json["resolution"] = res
    scene_json["index"] = index
    return {
        "__key__": f"{index:08d}",
        "rgb.png": encode_png(view.rgb),
        "depth.npy": encode_npy(view.depth),
        "semseg.png": encode_png(view.semseg),
        "boxes.json": encode_json(boxes),
        "caption.txt": caption.encode("utf-8"),
        "scene.json": encode_json(scene_json),
        "instance.png": encode_png(instance),
    }


def _render_star(args: tuple[int, int, int]) -> dict:
    return render_sample(*args)


def generate_dataset(
    out: str | os.PathLike,
    num: int,
    res: int = 64,
    seed: int = 0,
    shard_size: int = 1000,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Render ``num`` scenes into ``out/shard-*.tar`` and write ``out/manifest.json``.

    Returns:
        the manifest dict (also has ``scenes_per_second`` of this run, not written to disk).
    """
    out_dir = prepare_output_dir(out, overwrite)
    workers = max(1, min(workers or os.cpu_count() or 1, num))
    jobs = [(seed, i, res) for i in range(num)]
    start = time.perf_counter()
    with ShardSink(Path(out_dir), shard_size) as sink:
        bar = tqdm(total=num, desc=f"render {res}px", unit="scene", disable=not progress, leave=False)
        if workers == 1:
            results = map(_render_star, jobs)
            for sample in results:
                sink.write(sample)
                bar.update()
        else:
            ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
            with ctx.Pool(workers) as pool:
                for sample in pool.imap(_render_star, jobs, chunksize=16):
                    sink.write(sample)
                    bar.update()
        bar.close()
        manifest = sink.finish(
            {
                "generator": GENERATOR_VERSION,
                "seed": seed,
                "resolution": res,
                "modalities": list(SYNTH_MEMBERS),
                "members": {m: f"{m}.{ext}" for m, ext in zip(SYNTH_MEMBERS, ("png", "npy", "png", "json", "txt", "json", "png"))},
                "classes": list(CLASSES),
                "shapes": list(SHAPES),
                "colors": list(COLORS),
                "sizes": list(SIZES),
                "box_labels": list(BOX_LABELS),
                "depth": {"unit": "m", "kind": "metric", "axis": "z", "background": FAR},
                "boxes": {"format": "xyxy", "coordinates": "pixel edges, x1/y1 exclusive"},
            }
        )
    elapsed = time.perf_counter() - start
    manifest["scenes_per_second"] = num / elapsed if elapsed > 0 else float("inf")
    log.info("wrote %d scenes in %d shards to %s (%.1f scenes/s)", num, len(manifest["shards"]), out_dir, manifest["scenes_per_second"])
    return manifest
