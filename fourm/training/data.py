"""The training data stream: token shards -> objective examples -> batches, deterministic and
resumable.

Shards are ordered per epoch by a seeded permutation, split across ranks and then across
DataLoader workers (``order[rank::world][worker::workers]``), so no sample is seen twice in an
epoch. Each sample's objective draw uses ``default_rng([seed, epoch, crc32(key)])``, a seeded
shuffle buffer reorders samples, and each worker batches its own samples; the DataLoader
interleaves workers round-robin. The whole stream is therefore a function of the seed, and a
resumed run skips the batches it already consumed (``skip``) to continue exactly where it stopped.

Bad data never stops training; each sample is skipped or repaired by one rule (``decode_tokens``),
counted per reason in ``TokenStream.skipped`` (shared with the DataLoader workers):
- truncated shard (``truncated_shard``, the samples before the cut are used), unreadable shard or
  not a tar (``unreadable_shard``);
- a token member that is not a pickle-free .npy, not 1-D integers, or holds ids outside its
  modality's vocabulary spaces: sample skipped, ``corrupt_member``;
- an image modality whose token count is not its grid's: sample skipped, ``inconsistent_sample``;
- an empty token array: that modality dropped from the sample (repair ``empty_modality_dropped``);
  members of modalities the vocabulary lacks are ignored;
- no usable modality left: sample skipped, ``missing_modality``;
- anything else that fails while building the example: sample skipped, ``other``.
A resumed run replays the stream up to its position, so the counts cover the whole run.
"""

from __future__ import annotations

import logging
import os
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from fourm.data.codecs import CorruptMember, decode_npy
from fourm.data.loader import SkipCounter, SkippedSample, flag_truncated_shards
from fourm.data.object_labels import object_extents
from fourm.data.shards import expand_shards
from fourm.objectives.builders import collate_decoder, collate_encdec
from fourm.objectives.mixture import ObjectiveConfig, make_example
from fourm.tokenizers.pretokenize import LABELS_SUFFIX, PIXEL_MODALITIES, PIXELS_SUFFIX, TOKENS_SUFFIX
from fourm.training.data_position import LIVE, SAMPLE_IDS, Origin
from fourm.vocab import SharedVocab

log = logging.getLogger(__name__)


def manifest_context(manifest: dict) -> tuple[SharedVocab, dict[str, int], dict[str, str]]:
    """From a token-shard manifest: the vocabulary, the image grids and each modality's kind, as
    ``TokenStream`` takes them."""
    from fourm.modalities import MODALITIES

    vocab = SharedVocab(**{k: manifest["vocab"][k] for k in ("specials", "spaces", "modalities")})
    grids = {m: int(g) for m, g in manifest.get("grids", {}).items()}
    return vocab, grids, {m: MODALITIES[m].kind for m in vocab.modalities}


def pixel_sizes(manifest: dict) -> dict[str, int]:
    """From a token-shard manifest: {modality: R} of the (3, R, R) pixel images its shards keep
    (``pretokenize``); empty for shards made before they kept any."""
    sizes = manifest.get("pixels")
    return {m: int(r) for m, r in sizes.items()} if isinstance(sizes, dict) else {}


def label_sizes(manifest: dict) -> dict[str, int]:
    """From a token-shard manifest: {modality: R} of the (R, R) class maps its shards keep
    (``pretokenize``); empty for shards made before they kept any."""
    sizes = manifest.get("labels")
    return {m: int(r) for m, r in sizes.items()} if isinstance(sizes, dict) else {}


@dataclass
class DataSource:
    """Token shards (a directory, brace pattern, glob, or webdataset URL such as ``pipe:...``) and
    a mixture weight."""

    path: str = ""
    weight: float = 1.0


@dataclass
class StreamConfig:
    sources: list[DataSource] = field(default_factory=list)
    batch_size: int = 16
    shuffle_buffer: int = 256
    num_workers: int = 1
    seed: int = 0
    modalities: list[str] = field(default_factory=list)  # empty: every modality the shards have


def decode_tokens(sample: dict, vocab: SharedVocab, kinds: dict[str, str], grids: dict[str, int], modalities: set[str] | None = None, counter: SkipCounter | None = None) -> dict[str, np.ndarray]:
    """One token-shard sample -> ``{modality: int64 ids}`` by the rules of the module docstring.

    Raises:
        CorruptMember: a token member that does not decode or holds ids outside its spaces.
        SkippedSample: wrong token count for an image modality, or no usable modality.
    """
    where = f"{sample.get('__key__', '?')} in {os.path.basename(str(sample.get('__url__', '?')))}"
    out = {}
    for name, value in sample.items():
        m = name[: -len(TOKENS_SUFFIX)] if name.endswith(TOKENS_SUFFIX) else None
        if m not in vocab.modalities or (modalities is not None and m not in modalities):
            continue
        try:
            ids = decode_npy(value, name) if isinstance(value, bytes) else value
        except CorruptMember as exn:
            raise CorruptMember(name, f"{where}: {exn}") from None
        if not isinstance(ids, np.ndarray) or ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise CorruptMember(name, f"{where}: expected 1-D integer token ids, got {getattr(ids, 'dtype', type(ids).__name__)} {getattr(ids, 'shape', '')}")
        if ids.size == 0:
            if counter is not None:
                counter.repaired("empty_modality_dropped")
            continue
        ids = ids.astype(np.int64)
        ranges = [vocab.spaces[s] for s in vocab.modalities[m]]
        inside = np.zeros(ids.shape, bool)
        for start, size in ranges:
            inside |= (ids >= start) & (ids < start + size)
        if not inside.all():
            raise CorruptMember(name, f"{where}: token id {int(ids[~inside][0])} is outside {m}'s vocabulary spaces")
        if kinds.get(m) == "image" and m in grids and ids.size != grids[m] ** 2:
            raise SkippedSample("inconsistent_sample", f"{where}: {ids.size} {m} tokens, the grid needs {grids[m] ** 2}")
        out[m] = ids
    if not out:
        raise SkippedSample("missing_modality", f"{where}: no usable token member")
    return out


def decode_pixels(sample: dict, tokens: dict[str, np.ndarray], grids: dict[str, int]) -> dict[str, np.ndarray]:
    """A token-shard sample's pixel images ({modality: (C, R, R) uint8}, for modalities whose
    tokens it has; none where absent).

    Raises:
        CorruptMember: a pixel member that does not decode, or not an image of square patches on
            its modality's token grid.
    """
    out = {}
    for m in PIXEL_MODALITIES:
        value = sample.get(m + PIXELS_SUFFIX)
        if value is None or m not in tokens:
            continue
        name = m + PIXELS_SUFFIX
        image = decode_npy(value, name) if isinstance(value, bytes) else value
        g = grids.get(m, 0)
        if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[1] == image.shape[2] and g and image.shape[1] % g == 0):
            raise CorruptMember(name, f"{sample.get('__key__', '?')}: expected a (C, R, R) uint8 image on the {g}x{g} token grid, got {getattr(image, 'dtype', type(image).__name__)} {getattr(image, 'shape', '')}")
        out[m] = image
    return out


def decode_labels(sample: dict, modality: str, grids: dict[str, int]) -> np.ndarray | None:
    """A token-shard sample's (R, R) uint8 class map of ``modality`` (``pretokenize``'s
    ``semseg.labels.npy``) on the rgb token grid; None where the sample has none.

    Raises:
        CorruptMember: a member that does not decode, or not a square map on the rgb grid.
    """
    value = sample.get(modality + LABELS_SUFFIX)
    if value is None:
        return None
    name = modality + LABELS_SUFFIX
    labels = decode_npy(value, name) if isinstance(value, bytes) else value
    g = grids.get("rgb", 0)
    if not (isinstance(labels, np.ndarray) and labels.dtype == np.uint8 and labels.ndim == 2 and labels.shape[0] == labels.shape[1] and g and labels.shape[0] % g == 0):
        raise CorruptMember(name, f"{sample.get('__key__', '?')}: expected an (R, R) uint8 class map on the {g}x{g} rgb grid, got {getattr(labels, 'dtype', type(labels).__name__)} {getattr(labels, 'shape', '')}")
    return labels


class TokenStream(IterableDataset):
    """Endless batches of objective examples from token shards (see the module docstring).
    ``pixels``: examples also carry the rgb inputs' pixel patches (``EncDecConfig.rgb_pixels``);
    ``labels``: a modality whose class maps they carry too (``EncDecConfig.aux_labels``);
    ``box_from`` > 0: with each map, its objects' extents (``object_extents``, classes from this id
    on; ``EncDecConfig.aux_box_from``)."""

    def __init__(self, cfg: StreamConfig, arch: str, vocab: SharedVocab, kinds: dict[str, str], grids: dict[str, int], objective: ObjectiveConfig, rank: int = 0, world: int = 1, skip: int = 0, pixels: bool = False, labels: str = "", origin: Origin | None = None, positions: bool = False, box_from: int = 0):
        super().__init__()
        self.cfg, self.arch, self.vocab, self.kinds, self.grids, self.objective = cfg, arch, vocab, kinds, grids, objective
        self.rank, self.world, self.skip, self.pixels, self.labels, self.box_from = rank, world, skip, pixels, labels, box_from
        self.origin = origin or Origin()  # the first epoch and the samples passed over (a resharded resume)
        self.positions = positions  # batches carry their samples' ids and the worker's oldest epoch (``data_position``)
        # local directories, globs and brace patterns; webdataset URLs (pipe:..., https://...)
        # are brace-expanded and handed to webdataset's own opener
        self.sources = [(expand_shards(s.path), s.weight) for s in cfg.sources]
        for (urls, _), src in zip(self.sources, cfg.sources):
            if not urls:
                raise FileNotFoundError(f"no token shards at {src.path}")
        self.skipped = SkipCounter()

    def _samples(self, urls: list[str], epoch: int, worker: int, workers: int, source: int = 0):
        """This worker's samples of one epoch of one source: (key, tokens, pixels, labels, its id
        (source, epoch, shard, ordinal)); those the origin marks as trained on are passed over."""
        order = np.random.default_rng([self.cfg.seed, epoch]).permutation(len(urls))
        mine = [urls[i] for i in order][self.rank :: self.world][worker::workers]
        index = {u: i for i, u in enumerate(urls)}
        ordinals: dict[str, int] = {}
        stream = wds.tarfile_to_samples(handler=self.skipped.record)
        shards = flag_truncated_shards(self.skipped)(iter({"url": u} for u in mine))
        modalities = set(self.cfg.modalities) if self.cfg.modalities else None
        for sample in stream(shards):
            url = sample.get("__url__", "")
            ordinal = ordinals[url] = ordinals.get(url, -1) + 1  # its place in the tar, whatever is skipped
            shard = index.get(url, -1)
            done = self.origin.excluded.skip_set(source, epoch, shard)
            if done is not None and ordinal < done.size and done[ordinal]:
                continue
            try:
                tokens = decode_tokens(sample, self.vocab, self.kinds, self.grids, modalities, self.skipped)
                pixels = decode_pixels(sample, tokens, self.grids) if self.pixels else None
                # a sample without a map (or without rgb) still trains, without the auxiliary loss
                labels = decode_labels(sample, self.labels, self.grids) if self.labels and "rgb" in tokens else None
                if labels is not None and self.box_from:
                    labels = np.concatenate([labels[None].astype(np.int16), object_extents(labels, self.box_from)])
            except (CorruptMember, SkippedSample) as exn:
                self.skipped.record(exn)
                continue
            yield sample["__key__"], tokens, pixels, labels, (source, epoch, shard, ordinal)

    def _examples(self, worker: int, workers: int):
        epoch = self.origin.start_epoch
        while True:
            iters = [self._samples(urls, epoch, worker, workers, i) for i, (urls, _) in enumerate(self.sources)]
            weights = np.array([w for _, w in self.sources], dtype=float)
            pick = np.random.default_rng([self.cfg.seed, epoch, 1_000_003 + worker])
            alive = [True] * len(iters)
            produced = 0
            while any(alive):
                p = weights * np.array(alive)
                i = int(pick.choice(len(iters), p=p / p.sum()))
                try:
                    key, tokens, pixels, labels, sample_id = next(iters[i])
                except StopIteration:
                    alive[i] = False
                    continue
                rng = np.random.default_rng([self.cfg.seed, epoch, zlib.crc32(key.encode())])
                try:
                    example, objective = make_example(self.arch, tokens, self.kinds, self.vocab, self.grids, self.objective, rng, pixels, labels)
                except Exception as exn:  # the last line of defence: data never stops training
                    self.skipped.record(SkippedSample("other", f"{key}: building the example failed: {type(exn).__name__}: {exn}"))
                    continue
                produced += 1
                yield example, sample_id
            if produced == 0 and epoch not in self.origin.excluded.epochs():  # a resharded epoch may leave a worker nothing
                log.warning("rank %d worker %d has no shards (fewer shards than ranks x workers)", self.rank, worker)
                return
            epoch += 1

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        collate = collate_encdec if self.arch == "encdec" else collate_decoder
        buf: list = []
        shuffle = np.random.default_rng([self.cfg.seed, 7919, self.rank, worker])
        batch: list = []
        n_batches = 0
        # this worker's share of the batches to skip (the DataLoader takes batches round-robin)
        skip = self.skip // workers + (1 if worker < self.skip % workers else 0)
        for item in self._examples(worker, workers):
            buf.append(item)
            if len(buf) < self.cfg.shuffle_buffer:
                continue
            batch.append(buf.pop(int(shuffle.integers(len(buf)))))
            if len(batch) == self.cfg.batch_size:
                n_batches += 1
                if n_batches > skip:
                    out = collate([example for example, _ in batch], self.vocab.pad_id)
                    if self.positions:
                        self._mark(out, batch, buf, worker, item[1][1])
                    yield out
                batch = []

    @staticmethod
    def _mark(out: dict, batch: list, buf: list, worker: int, reading: int) -> None:
        """Add the batch's sample ids and the oldest epoch its worker still holds (the one it reads,
        or one in its shuffle buffer): every sample of an older epoch has left the worker."""
        out[SAMPLE_IDS] = torch.tensor([sample_id for _, sample_id in batch], dtype=torch.int64)
        out[LIVE] = torch.tensor([worker, min([reading] + [sample_id[1] for _, sample_id in buf])], dtype=torch.int64)


def make_loader(stream: TokenStream) -> torch.utils.data.DataLoader:
    """A DataLoader over the stream (batches are made in the workers)."""
    return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=stream.cfg.num_workers, persistent_workers=False)
