"""COCO box mAP through ``pycocotools`` (the reference implementation, not a hand-written AP).

Boxes are dicts ``{"bbox": [x0, y0, x1, y1] pixels, "label": str, "score": float (optional)}``;
the category of a label is its last word when that is one of ``categories`` (``large red
sphere`` -> ``sphere``). Generated boxes carry no score unless given; they then all count 1.0.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np


def category_of(label: str, categories: tuple[str, ...]) -> str | None:
    words = label.lower().split()
    return words[-1] if words and words[-1] in categories else None


def coco_map(predictions: list[list[dict]], truths: list[list[dict]], categories: tuple[str, ...]) -> dict[str, float]:
    """mAP@[.5:.95], mAP@0.5 and mAP@0.75 over all images (-1.0 where no true box exists).

    Predictions whose label names no known category are dropped (counted in ``unlabelled``).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(predictions) != len(truths):
        raise ValueError(f"{len(predictions)} prediction lists for {len(truths)} images")
    cat_ids = {c: i + 1 for i, c in enumerate(categories)}
    images, annotations, results, unlabelled = [], [], [], 0
    for image_id, (pred, true) in enumerate(zip(predictions, truths), start=1):
        images.append({"id": image_id})
        for box in true:
            cat = category_of(box["label"], categories)
            if cat is None:
                raise ValueError(f"ground-truth label {box['label']!r} names none of {categories}")
            x0, y0, x1, y1 = (float(v) for v in box["bbox"])
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat_ids[cat], "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
        for box in pred:
            cat = category_of(box.get("label", ""), categories)
            if cat is None:
                unlabelled += 1
                continue
            x0, y0, x1, y1 = (float(v) for v in box["bbox"])
            results.append({"image_id": image_id, "category_id": cat_ids[cat], "bbox": [x0, y0, max(x1 - x0, 0.0), max(y1 - y0, 0.0)], "score": float(box.get("score", 1.0))})
    out = {"map": 0.0, "map50": 0.0, "map75": 0.0, "predicted_boxes": len(results) + unlabelled, "unlabelled": unlabelled, "true_boxes": len(annotations)}
    if not annotations:
        return {**out, "map": -1.0, "map50": -1.0, "map75": -1.0}
    if not results:
        return out
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its tables
        gt = COCO()
        gt.dataset = {"images": images, "annotations": annotations, "categories": [{"id": i, "name": c} for c, i in cat_ids.items()]}
        gt.createIndex()
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = np.asarray(ev.stats, dtype=float)
    return {**out, "map": max(float(stats[0]), 0.0), "map50": max(float(stats[1]), 0.0), "map75": max(float(stats[2]), 0.0)}
