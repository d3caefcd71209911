"""Where the data stream stands, in a form that does not depend on the world size.

A sample is named by four integers, ``(source, epoch, shard, ordinal)``: its data source, the epoch
that read it, the index of its shard in the source's sorted shard list and its place in that tar.
Every batch the stream yields carries the names of its samples (``SAMPLE_IDS``, (B, 4) int64) and
the oldest epoch its worker still holds in its shuffle buffer or reads (``LIVE``: worker id, epoch).
The loop records what it trained on in a ``DataPosition``; a checkpoint keeps, for every epoch
not yet finished by every worker, one bit per sample: trained on or not (``Consumed``).

A run resumed with the stream laid out as before (world size, batch size, workers, shuffle buffer)
replays the stream from its origin and skips the batches already trained (bit-identical to a run
never stopped). A run resumed on another layout starts a new origin: from the oldest unfinished
epoch, each new rank reads its shards of the epoch (``order[rank::world]``) and passes over the
samples the checkpoint marks as trained (``Excluded``), so no sample of an epoch is trained twice
and none is left out; later epochs are read as usual.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

SAMPLE_IDS = "sample_ids"  # batch key: (B, 4) int64 (source, epoch, shard, ordinal)
LIVE = "live_epoch"  # batch key: (2,) int64 (worker id, oldest epoch the worker still holds)
CONSUMED_FILE = "data_position.safetensors"  # what was trained on, epochs not finished
ORIGIN_FILE = "data_origin.safetensors"  # what the stream passes over since its origin (a resize)
SAMPLE_LOG_ENV = "FOURM_SAMPLE_LOG"  # a test hook: append "step source epoch shard ordinal" lines to $FOURM_SAMPLE_LOG.rankR


class Consumed:
    """One bit per sample for each ``(source, epoch, shard)``: set when the sample was trained on."""

    def __init__(self, bits: dict[tuple[int, int, int], np.ndarray] | None = None):
        self.bits: dict[tuple[int, int, int], np.ndarray] = dict(bits or {})

    def add(self, ids: np.ndarray) -> int:
        """Mark ``ids`` (N, 4) trained on; returns how many were marked already (seen twice)."""
        repeats = 0
        for src, epoch, shard, ordinal in np.asarray(ids, dtype=np.int64).reshape(-1, 4).tolist():
            row = self._row((src, epoch, shard), ordinal + 1)
            repeats += bool(row[ordinal])
            row[ordinal] = True
        return repeats

    def _row(self, key: tuple[int, int, int], size: int) -> np.ndarray:
        row = self.bits.get(key)
        if row is None or row.size < size:
            grown = np.zeros(max(size, 2 * (0 if row is None else row.size)), bool)
            if row is not None:
                grown[: row.size] = row
            self.bits[key] = row = grown
        return row

    def union(self, other: Consumed) -> int:
        """Add ``other``'s bits to these; returns how many were set in both (seen twice)."""
        repeats = 0
        for key, row in other.bits.items():
            mine = self._row(key, row.size)
            repeats += int((mine[: row.size] & row).sum())
            mine[: row.size] |= row
        return repeats

    def drop_before(self, epoch: int) -> None:
        """Forget the epochs every worker has finished."""
        self.bits = {k: v for k, v in self.bits.items() if k[1] >= epoch}

    def count(self, epoch: int | None = None) -> int:
        return int(sum(int(v.sum()) for k, v in self.bits.items() if epoch is None or k[1] == epoch))

    def skip_set(self, source: int, epoch: int, shard: int) -> np.ndarray | None:
        """The bits of one shard in one epoch (None: nothing of it was trained on)."""
        return self.bits.get((source, epoch, shard))

    def epochs(self) -> set[int]:
        return {k[1] for k, v in self.bits.items() if v.any()}

    def save(self, path: Path) -> None:
        """As safetensors: ``s{source}.e{epoch}.k{shard}`` -> the bits packed (uint8)."""
        tensors = {f"s{s}.e{e}.k{k}": torch.from_numpy(np.packbits(v)) for (s, e, k), v in sorted(self.bits.items()) if v.any()}
        save_file(tensors, str(path), metadata={"sizes": json.dumps({f"s{s}.e{e}.k{k}": int(v.size) for (s, e, k), v in self.bits.items() if v.any()})})

    @classmethod
    def load(cls, path: Path) -> Consumed:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            sizes = json.loads((f.metadata() or {}).get("sizes", "{}"))
        bits = {}
        for name, packed in load_file(str(path)).items():
            s, e, k = (int(part[1:]) for part in name.split("."))
            bits[(s, e, k)] = np.unpackbits(packed.numpy())[: sizes[name]].astype(bool)
        return cls(bits)


@dataclass
class Origin:
    """Where this layout's stream starts: the first epoch it reads and the samples it passes over
    (trained on before the stream was resharded; empty for a stream read from the start)."""

    start_epoch: int = 0
    excluded: Consumed = field(default_factory=Consumed)
    batches: int = 0  # batches per rank done before the origin (not replayed)


class DataPosition:
    """This rank's record of the samples it trained on since the run (re)started, on top of
    ``trained`` (what the checkpoint resumed from records, every rank's); gathered over ranks into a
    checkpoint (``save``). ``floor``: the oldest epoch not finished when the run (re)started."""

    def __init__(self, origin: Origin, trained: Consumed | None = None, floor: int | None = None):
        self.origin = origin
        self.trained = trained or Consumed()
        self.floor = origin.start_epoch if floor is None else floor
        self.mine = Consumed()
        self.live: dict[int, int] = {}  # worker -> oldest epoch it still holds
        self.repeats = 0

    def record(self, batch: dict, step: int) -> None:
        """Take the position keys out of ``batch``, trained on in optimizer step ``step``."""
        ids = batch.pop(SAMPLE_IDS)
        worker, epoch = (int(v) for v in batch.pop(LIVE))
        self.live[worker] = epoch
        self.repeats += self.mine.add(ids.numpy())
        if os.environ.get(SAMPLE_LOG_ENV):  # the tests' record of every sample trained on, per rank
            with open(f"{os.environ[SAMPLE_LOG_ENV]}.rank{os.environ.get('RANK', '0')}", "a") as f:
                f.writelines(f"{step} {' '.join(map(str, row))}\n" for row in ids.tolist())

    def save(self, directory: Path, workers: int, is_main: bool) -> dict:
        """Every rank calls this: the union over ranks of the samples trained on (with the origin's)
        into ``directory`` (rank 0 writes it); returns the record for ``state.json``."""
        oldest = min([self.live.get(w, self.floor) for w in range(max(workers, 1))])
        packed = {k: (np.packbits(v), v.size) for k, v in self.mine.bits.items()}  # 1 bit a sample on the wire
        parts: list = [(packed, oldest)]
        if dist.is_initialized():
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, (packed, oldest))
        complete_below = min(p[1] for p in parts)
        self.mine.drop_before(complete_below)  # what every worker finished is not needed again
        if not is_main:
            return {}
        self.trained.drop_before(complete_below)
        union = Consumed({k: v.copy() for k, v in self.trained.bits.items()})
        repeats = sum(union.union(Consumed({k: np.unpackbits(p)[:n].astype(bool) for k, (p, n) in bits.items()})) for bits, _ in parts)
        if repeats:
            log.warning("data position: %d samples were trained on twice in one epoch", repeats)
        union.drop_before(complete_below)
        union.save(directory / CONSUMED_FILE)
        if self.origin.excluded.bits:
            self.origin.excluded.save(directory / ORIGIN_FILE)
        return {"complete_below": complete_below, "origin_epoch": self.origin.start_epoch, "origin_batches": self.origin.batches, "trained_in_open_epochs": union.count()}


def resumed_position(directory: Path, data: dict, reshard: bool, batches: int) -> DataPosition:
    """The data position of a run resumed from checkpoint ``directory`` (``data``: its
    ``state.json`` record; ``batches``: the batches per rank it counts). Its stream's origin is the
    saved one when the layout is unchanged, else a new one at the oldest unfinished epoch that
    passes over what was trained (``reshard``)."""
    trained = Consumed.load(directory / CONSUMED_FILE)
    floor = int(data["complete_below"])
    if reshard:
        return DataPosition(Origin(floor, Consumed({k: v.copy() for k, v in trained.bits.items()}), batches), trained, floor)
    path = directory / ORIGIN_FILE
    origin = Origin(int(data.get("origin_epoch", 0)), Consumed.load(path) if path.is_file() else Consumed(), int(data.get("origin_batches", 0)))
    return DataPosition(origin, trained, floor)
