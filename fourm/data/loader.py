"""Reading raw multimodal shards: a WebDataset pipeline that shuffles, decodes, selects
modalities and batches, and that survives bad data.

Counts are events: a truncated or unreadable shard counts once (the samples it still held are
unknown), every other reason once per dropped sample. A truncated shard, an unreadable shard, a member that does not decode, a sample without a
requested modality or with inconsistent sizes is skipped with a warning and counted by reason.
The counts live in shared memory, so they include what DataLoader worker processes skipped:
``SkipCounter.as_dict()`` in the main process gives the totals.

The rules, per sample (``decode_sample``):
- a member that does not decode (bad PNG, garbage .npy, pickled array, malformed JSON, non-UTF-8
  text): skipped, ``corrupt_member``;
- a requested modality absent, or an empty caption (an empty caption counts as no caption):
  skipped, ``missing_modality``; an optional one: None (an empty optional caption is counted as the
  repair ``empty_modality_dropped``);
- image-like modalities of different sizes, or depth with NaN/inf: skipped, ``inconsistent_sample``;
- boxes reaching outside the image: repaired, not skipped: clipped to the image, and a box with no
  area left (or a non-finite coordinate) is dropped; counted once per sample as ``boxes_clipped``.
"""

from __future__ import annotations

import functools
import logging
import math
import multiprocessing as mp
import os
import re
import tarfile
from dataclasses import dataclass, field

import torch
import webdataset as wds

from fourm.data.codecs import CorruptMember, decode_member
from fourm.data.shards import expand_shards
from fourm.modalities import IMAGE_MODALITIES, MODALITIES, parse_modalities

log = logging.getLogger(__name__)

SKIP_REASONS = ("unreadable_shard", "truncated_shard", "corrupt_member", "missing_modality", "inconsistent_sample", "other")
REPAIR_REASONS = ("boxes_clipped", "empty_modality_dropped")  # samples kept after a repair
# tarfile's words for a stream that ends early (other ReadErrors mean "not a tar file")
_TRUNCATION_MESSAGES = ("unexpected end of data", "empty header", "truncated header")
_WARN_FIRST = 20  # per process: warn for the first skips, then every 1000th


class SkippedSample(ValueError):
    """Raised inside the pipeline to drop one sample; ``reason`` is one of ``SKIP_REASONS``."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def classify_error(exn: BaseException) -> str:
    """Map an exception raised while reading shards to a skip reason."""
    if isinstance(exn, SkippedSample):
        return exn.reason
    if isinstance(exn, CorruptMember):
        return "corrupt_member"
    text = str(exn)
    if isinstance(exn, EOFError) or any(m in text for m in _TRUNCATION_MESSAGES):
        return "truncated_shard"
    if isinstance(exn, (tarfile.TarError, OSError)):
        return "unreadable_shard"
    if isinstance(exn, ValueError) and "duplicate file name" in str(exn):
        return "corrupt_member"
    return "other"


def _shard_named_in(exn: BaseException) -> str | None:
    match = re.search(r"([^\s'\"<>]+\.tar)\b", " ".join(str(a) for a in exn.args))
    return match.group(1) if match else None


class SkipCounter:
    """Counts of skipped samples (or shard remainders) per reason, shared across processes."""

    def __init__(self) -> None:
        self._counts = torch.zeros(len(SKIP_REASONS) + len(REPAIR_REASONS), dtype=torch.int64).share_memory_()
        self._lock = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else None).Lock()
        self._seen = 0  # per process, for rate-limiting warnings
        self._last_broken_shard: str | None = None

    def record(self, exn: BaseException) -> bool:
        """Count ``exn`` by reason and log it; returns True (continue) for use as a wds handler."""
        reason = classify_error(exn)
        if reason in ("truncated_shard", "unreadable_shard"):
            # webdataset reports a broken shard once from the member loop and once from the shard
            # loop: count each shard once
            shard = _shard_named_in(exn)
            if shard is not None and shard == self._last_broken_shard:
                return True
            self._last_broken_shard = shard
        with self._lock:
            self._counts[SKIP_REASONS.index(reason)] += 1
        self._seen += 1
        if self._seen <= _WARN_FIRST or self._seen % 1000 == 0:
            log.warning("skipped (%s): %s", reason, " ".join(str(a) for a in exn.args if a is not None)[:300])
        return True

    def repaired(self, reason: str) -> None:
        """Count a sample kept after a repair (``reason`` in ``REPAIR_REASONS``)."""
        with self._lock:
            self._counts[len(SKIP_REASONS) + REPAIR_REASONS.index(reason)] += 1

    def as_dict(self) -> dict[str, int]:
        """``{reason: count}`` for every skip reason (zeros included), plus ``total``."""
        counts = {r: int(c) for r, c in zip(SKIP_REASONS, self._counts.tolist())}
        counts["total"] = sum(counts.values())
        return counts

    def repairs(self) -> dict[str, int]:
        """``{reason: count}`` of samples kept after a repair (zeros included)."""
        return {r: int(c) for r, c in zip(REPAIR_REASONS, self._counts.tolist()[len(SKIP_REASONS) :])}

    def report(self) -> str:
        """One line for the log: the non-zero skip and repair counts."""
        parts = [f"{r} {n}" for r, n in self.as_dict().items() if n and r != "total"]
        parts += [f"{r} {n} (repaired)" for r, n in self.repairs().items() if n]
        return ", ".join(parts) if parts else "none"


def tar_looks_truncated(path: str) -> bool:
    """True when a local tar file starts like a tar but lacks its end: the size is not a whole
    number of 512-byte blocks, or the two zero blocks that close every tar archive are missing.

    tarfile's stream reader takes a cut at a member boundary for a normal end, so this is what
    catches those cuts. Files that do not start with a ustar header are left to the reader.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(512)
            if len(head) < 512 or head[257:262] != b"ustar":
                return False
            if size % 512:
                return True
            f.seek(size - 1024)
            return f.read(1024) != bytes(1024)
    except OSError:
        return False


def flag_truncated_shards(counter: SkipCounter):
    """Pipeline stage over shard dicts: count truncated local shards, then read them anyway (the
    samples before the cut are good)."""

    def stage(src):
        for shard in src:
            url = shard.get("url", "")
            if isinstance(url, str) and os.path.isfile(url) and tar_looks_truncated(url):
                counter.record(SkippedSample("truncated_shard", f"{url}: ends without the end-of-archive blocks"))
            yield shard

    return stage


def clip_boxes(boxes: list[dict], height: int, width: int) -> list[dict]:
    """Boxes clipped to a ``height`` x ``width`` image; those with no area left, or with a
    non-finite coordinate, are dropped."""
    out = []
    for b in boxes:
        x0, y0, x1, y1 = b["bbox"]
        if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
            continue
        x0, x1 = min(max(x0, 0.0), width), min(max(x1, 0.0), width)
        y0, y1 = min(max(y0, 0.0), height), min(max(y1, 0.0), height)
        if x1 > x0 and y1 > y0:
            out.append({**b, "bbox": [x0, y0, x1, y1]})
    return out


def decode_sample(sample: dict, modalities: tuple[str, ...], optional: tuple[str, ...] = (), counter: SkipCounter | None = None) -> dict:
    """Raw wds sample (member suffix -> bytes) -> ``{"__key__", modality: decoded, ...}``.

    ``optional`` modalities are decoded when present and None when absent. The rules for bad data
    are the module docstring's; ``counter`` counts the repairs.

    Image-like modalities must agree on height and width; depth must be finite.
    Raises:
        SkippedSample: a requested modality is missing or the sample is inconsistent.
        CorruptMember: a member does not decode.
    """
    key = sample.get("__key__", "?")
    where = f"{key} in {os.path.basename(str(sample.get('__url__', '?')))}"
    out: dict = {"__key__": key}
    for name in (*modalities, *optional):
        member = MODALITIES[name].member
        if member not in sample:
            if name in modalities:
                raise SkippedSample("missing_modality", f"{where}: no {member}")
            out[name] = None
            continue
        try:
            out[name] = decode_member(name, sample[member])
        except CorruptMember as exn:
            raise CorruptMember(exn.member, f"{where}: {exn}") from None
        if name == "caption" and not out[name]:
            if name in modalities:
                raise SkippedSample("missing_modality", f"{where}: empty {member}")
            out[name] = None
            if counter is not None:
                counter.repaired("empty_modality_dropped")
    sizes = {name: tuple(out[name].shape[-2:]) for name in (*modalities, *optional) if name in IMAGE_MODALITIES and out[name] is not None}
    if len(set(sizes.values())) > 1:
        raise SkippedSample("inconsistent_sample", f"{where}: image sizes differ {sizes}")
    if out.get("depth") is not None and not torch.isfinite(out["depth"]).all():
        raise SkippedSample("inconsistent_sample", f"{where}: non-finite depth")
    if out.get("boxes") and sizes:
        height, width = next(iter(sizes.values()))
        clipped = clip_boxes(out["boxes"], height, width)
        if clipped != out["boxes"]:
            out["boxes"] = clipped
            if counter is not None:
                counter.repaired("boxes_clipped")
    return out


def image_size_of(batch: dict, i: int) -> tuple[int, int] | None:
    """(H, W) of sample ``i`` of a batch from ``collate``, from any image-like modality it has."""
    for m in IMAGE_MODALITIES:
        v = batch.get(m)
        if v is not None and v[i] is not None:
            return tuple(int(s) for s in v[i].shape[-2:])
    return None


def collate(samples: list[dict]) -> dict:
    """Batch decoded samples: tensors are stacked (B, ...); everything else, and a modality that
    some samples lack (None), becomes a list."""
    batch: dict = {}
    for name in samples[0]:
        values = [s[name] for s in samples]
        if all(isinstance(v, torch.Tensor) for v in values):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                raise ValueError(f"cannot batch {name} of different shapes {sorted(shapes)}; resize the data to one resolution (import_folder.py --res)")
            batch[name] = torch.stack(values)
        else:
            batch[name] = values
    return batch


@dataclass
class LoaderConfig:
    """How to read raw shards.

    Attributes:
        modalities: modalities every sample must have (others in the shard are ignored).
        optional: modalities decoded when a sample has them (None otherwise).
        batch_size: samples per batch.
        shuffle: sample shuffle buffer size; 0 keeps shard order (evaluation).
        num_workers: DataLoader worker processes; shards are split between them (and between
            ranks under torch.distributed).
        seed: seed for shard and sample shuffling.
        repeat: cycle through the shards forever (training) instead of one pass.
        drop_last: drop a final partial batch.
    """

    modalities: tuple[str, ...] = ("rgb", "depth", "semseg", "boxes", "caption")
    optional: tuple[str, ...] = ()
    batch_size: int = 16
    shuffle: int = 1000
    num_workers: int = 2
    seed: int = 0
    repeat: bool = False
    drop_last: bool = False
    extra: dict = field(default_factory=dict)


def build_dataset(shards, config: LoaderConfig, counter: SkipCounter, transform=None) -> wds.DataPipeline:
    """The iterable dataset of batches over ``shards`` (a directory, brace pattern, glob or list).

    ``transform``, if given, maps one decoded sample dict to another before batching.
    """
    urls = expand_shards(shards)
    if not urls:
        raise FileNotFoundError(f"no shards found at {shards}")
    modalities = parse_modalities(config.modalities) if config.modalities else ()
    optional = tuple(m for m in (parse_modalities(config.optional) if config.optional else ()) if m not in modalities)
    if not modalities and not optional:
        raise ValueError("no modality requested")
    handler = counter.record
    stages: list = [
        wds.ResampledShards(urls, seed=config.seed) if config.repeat else wds.SimpleShardList(urls),
    ]
    if not config.repeat:
        if config.shuffle:
            stages.append(wds.shuffle(len(urls), seed=config.seed))
        stages += [wds.split_by_node, wds.split_by_worker]
    stages.append(flag_truncated_shards(counter))
    stages.append(wds.tarfile_to_samples(handler=handler))
    if config.shuffle:
        stages.append(wds.shuffle(config.shuffle, initial=min(config.shuffle, 100), seed=config.seed))
    stages.append(wds.map(functools.partial(decode_sample, modalities=modalities, optional=optional, counter=counter), handler=handler))
    if transform is not None:
        stages.append(wds.map(transform, handler=handler))
    stages.append(wds.batched(config.batch_size, collation_fn=collate, partial=not config.drop_last))
    return wds.DataPipeline(*stages)


def build_loader(shards, config: LoaderConfig | None = None, transform=None) -> tuple[wds.WebLoader, SkipCounter]:
    """A DataLoader of batches (see ``collate``) and the counter of what was skipped.

    Example:
        >>> loader, skipped = build_loader("data/train", LoaderConfig(batch_size=8))
        >>> for batch in loader: batch["rgb"].shape   # (8, 3, H, W) uint8
        >>> skipped.as_dict()                          # {"truncated_shard": 0, ..., "total": 0}
    """
    config = config or LoaderConfig()
    counter = SkipCounter()
    dataset = build_dataset(shards, config, counter, transform)
    loader = wds.WebLoader(
        dataset,
        batch_size=None,
        num_workers=config.num_workers,
        persistent_workers=False,
        multiprocessing_context="fork" if config.num_workers and "fork" in mp.get_all_start_methods() else None,
    )
    return loader, counter
