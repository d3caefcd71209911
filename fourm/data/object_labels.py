"""The object label map: which object class every pixel shows, for a dense auxiliary loss.

A semseg map says *what kind* of thing a pixel shows (sky, ground, sphere); captions and boxes
also ask *which* object (a small red sphere, not a large blue one). Where a dataset has an
instance map (``instance.png``: 0 no object, k the k-th box of ``boxes.json``) and its manifest
lists the box labels (``box_labels``), every object pixel gets its box label's class instead of
its semseg class. Class ids: the semseg classes first (manifest ``classes``), then one per box
label in ``box_labels`` order, so the map holds semseg's information and more. Pure functions.
"""

from __future__ import annotations

import numpy as np

from fourm.sequence import IGNORE_INDEX

OBJECT_LABELS = "objects"  # the map's name among the token shards' label maps (objects.labels.npy)


def object_classes(manifest: dict) -> list[str] | None:
    """The class names of a raw dataset's object label map (semseg ``classes`` then its
    ``box_labels``), or None when its manifest lacks either. Raises ValueError past 256 classes."""
    stuff, labels = manifest.get("classes"), manifest.get("box_labels")
    if not stuff or not labels:
        return None
    names = [*map(str, stuff), *map(str, labels)]
    if len(names) > 256:
        raise ValueError(f"an object label map is uint8: {len(stuff)} semseg classes + {len(labels)} box labels is more than 256 classes")
    return names


def object_label_map(semseg: np.ndarray, instance: np.ndarray, boxes: list[dict], classes: list[str], stuff: int) -> np.ndarray:
    """(R, R) semseg class ids, (R, R) instance map, the sample's boxes, the map's class names
    (``object_classes``) and how many of them are semseg classes -> the (R, R) uint8 object label
    map: ``stuff + i`` where a pixel shows a box labelled ``classes[stuff + i]``, the semseg
    class elsewhere (also on an object whose label is not in ``classes``). Raises ValueError when
    the instance map names a box the sample does not have or the maps' shapes differ."""
    if semseg.shape != instance.shape:
        raise ValueError(f"semseg {semseg.shape} and instance {instance.shape} maps differ in size")
    if instance.size and int(instance.max()) > len(boxes):
        raise ValueError(f"the instance map names box {int(instance.max())} of a sample with {len(boxes)}")
    index = {name: i for i, name in enumerate(classes)}
    # per instance value 0..K: -1 (keep semseg) or the class of the box it shows
    lut = np.array([-1] + [index.get(str(b["label"]), -1) for b in boxes], np.int64)
    lut[lut < stuff] = -1  # a label that names a semseg class is not an object class
    picked = lut[instance.astype(np.int64)]
    return np.where(picked >= 0, picked, semseg).astype(np.uint8)


def object_extents(labels: np.ndarray, first: int) -> np.ndarray:
    """(R, R) object label map, the first object class id (the number of semseg classes) ->
    (4, R, R) int16: at every pixel of an object class (>= ``first``), the box of all pixels of its
    class, ``x0 y0 x1 y1`` in pixels (ends exclusive, as ``boxes.json``); ``IGNORE_INDEX`` elsewhere. Two
    objects of one label in a scene share the box around both (the map does not tell them apart);
    an object partly hidden gets the box of what shows."""
    out = np.full((4, *labels.shape), IGNORE_INDEX, np.int16)
    for c in np.unique(labels):
        if c < first:
            continue
        where = labels == c
        rows, cols = np.nonzero(where.any(1))[0], np.nonzero(where.any(0))[0]
        out[:, where] = np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], np.int16)[:, None]
    return out
