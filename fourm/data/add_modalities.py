"""Add derived modalities to existing raw shards: a new dataset with every member of the old one
plus the new members (what ``data_pipelines/add_modalities.py`` does).

    normals  normals.png from depth.npy (``fourm.data.normals``); the camera's vertical field of
             view from scene.json (camera.fov_deg), else the ``fov_deg`` given
    count    count.txt from scene.json: the number of visible objects (``visible_pixels > 0``, the
             objects that captions name and boxes frame)

The output is staged and moved into place when whole (``ShardSink``), so an interrupted run leaves
nothing half-written. A sample whose source member is missing or does not decode keeps its other
members, goes without the new one, and is listed in the manifest (``added.skipped``).
"""

from __future__ import annotations

import logging
import os
import tarfile
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from fourm.cli import UsageError
from fourm.data.codecs import CorruptMember, decode_member
from fourm.data.normals import encode_normals_png, normals_from_depth
from fourm.data.shards import ShardSink, prepare_output_dir, read_manifest, require_shards
from fourm.data.synth.scene import visible_objects
from fourm.modalities import MODALITIES

log = logging.getLogger(__name__)

ADDER_VERSION = "add-modalities/1"
SOURCES = {"normals": "depth", "count": "scene"}  # derived modality -> the modality it is made from


def _raw_samples(urls: list[str]):
    """Every sample of the shards in order, as wds gives them (member suffix -> bytes); a shard
    that cannot be read is a UsageError naming it."""
    for url in urls:
        try:
            yield from wds.tarfile_to_samples()(iter([{"url": url}]))
        except (tarfile.TarError, OSError, ValueError) as exn:
            raise UsageError(f"cannot read shard {url}: {type(exn).__name__}: {exn}") from None


def _derive(name: str, sample: dict, fov_deg: float | None) -> bytes:
    """The new member's bytes; KeyError when the source member is missing, CorruptMember when it
    does not decode."""
    if name == "count":
        scene = decode_member("scene", sample[MODALITIES["scene"].member])
        return str(len(visible_objects(scene))).encode("utf-8")
    depth = decode_member("depth", sample[MODALITIES["depth"].member])[0].numpy()
    if MODALITIES["scene"].member in sample:
        fov_deg = float(decode_member("scene", sample[MODALITIES["scene"].member])["camera"]["fov_deg"])
    if fov_deg is None:
        raise KeyError("scene.json for the field of view (or --fov)")
    return encode_normals_png(normals_from_depth(depth, fov_deg))


def add_modalities(src: str | os.PathLike, out: str | os.PathLike, add: tuple[str, ...], fov_deg: float | None = None, shard_size: int | None = None, overwrite: bool = False, progress: bool = True) -> dict:
    """Copy the raw dataset at ``src`` to ``out`` with the modalities ``add`` (``normals``,
    ``count``) added to every sample that has their source; returns the manifest written.

    Args:
        fov_deg: vertical field of view (degrees) for samples without scene.json.
        shard_size: samples per output shard (default: the source's largest shard).
    Raises:
        UsageError: no dataset at ``src``, a modality that cannot be added, a source the dataset
            lacks (count needs scene.json, normals depth.npy), no field of view for normals.
    """
    src = Path(src)
    manifest = read_manifest(src)
    urls = require_shards(src, "--src")
    if manifest.get("kind") == "tokens":
        raise UsageError(f"--src {src} holds token shards; add modalities to raw shards, then pretokenize")
    for name in add:
        if name not in SOURCES:
            raise UsageError(f"cannot add {name!r}; addable: {', '.join(SOURCES)}")
    has = list(manifest.get("modalities", []))
    for name in add:
        if SOURCES[name] not in has:
            raise UsageError(f"--add {name} needs {MODALITIES[SOURCES[name]].member}, and {src} has none (it has: {', '.join(has) or 'nothing listed'})")
    if "normals" in add and "scene" not in has and fov_deg is None:
        raise UsageError(f"--add normals needs the camera's vertical field of view: {src} has no scene.json; pass --fov DEG")
    if fov_deg is not None and not 0 < fov_deg < 180:
        raise UsageError(f"--fov must be between 0 and 180 degrees, got {fov_deg}")
    shard_size = shard_size or max([s.get("num_samples", 0) for s in manifest.get("shards", [])] + [1])
    out_dir = prepare_output_dir(out, overwrite)
    counts = {name: 0 for name in add}
    skipped: list[dict] = []
    with ShardSink(out_dir, shard_size) as sink:
        bar = tqdm(total=manifest.get("num_samples"), desc="add " + ",".join(add), unit="sample", disable=not progress, leave=False)
        for sample in _raw_samples(urls):
            members = {k: v for k, v in sample.items() if not k.startswith("__")}
            for name in add:
                try:
                    members[MODALITIES[name].member] = _derive(name, sample, fov_deg)
                    counts[name] += 1
                except (KeyError, CorruptMember) as exn:
                    why = f"no {exn.args[0]}" if isinstance(exn, KeyError) else str(exn)
                    skipped.append({"key": sample["__key__"], "modality": name, "why": why})
                    log.warning("%s: no %s (%s)", sample["__key__"], name, why)
            sink.write({"__key__": sample["__key__"], **members})
            bar.update()
        bar.close()
        if sink.num_samples == 0:
            raise UsageError(f"--src {src}: no samples in its shards")
        new = {k: v for k, v in manifest.items() if k not in ("shards", "num_samples")}
        new["modalities"] = has + [m for m in add if m not in has and counts[m]]
        if isinstance(manifest.get("members"), dict):
            new["members"] = {**manifest["members"], **{m: MODALITIES[m].member for m in add}}
        new["modality_counts"] = {**manifest.get("modality_counts", {}), **counts}
        notes = {
            "normals": {"from": "depth.npy", "fov_deg": "scene.json camera.fov_deg" if "scene" in has else fov_deg, "frame": "camera: x right, y down, z forward; towards the camera", "encoding": "round((n + 1) * 127.5)"},
            "count": {"from": "scene.json", "rule": "objects with visible_pixels > 0"},
        }
        new["added"] = {"generator": ADDER_VERSION, "source": str(src.resolve()), "modalities": list(add), **{m: notes[m] for m in add}, "skipped": skipped}
        result = sink.finish(new)
    log.info("wrote %d samples to %s (%s)", result["num_samples"], out_dir, ", ".join(f"{k} {v}" for k, v in counts.items()))
    return result
