"""The training data stream: token shards -> objective examples -> batches, deterministic and
resumable.

Shards are ordered per epoch by a seeded permutation, split across ranks and then across
DataLoader workers (``order[rank::world][worker::workers]``), so no sample is seen twice in an
epoch. Each sample's objective draw uses ``default_rng([seed, epoch, crc32(key)])``, a seeded
shuffle buffer reorders samples, and each worker batches its own samples; the DataLoader
interleaves workers round-robin. The whole stream is therefore a function of the seed, and a
resumed run skips the batches it already consumed (``skip``) to continue exactly where it stopped.
"""

from __future__ import annotations

import io
import logging
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from fourm.data.loader import SkipCounter
from fourm.data.pretokenize import TOKENS_SUFFIX
from fourm.data.shards import expand_shards
from fourm.objectives.builders import collate_decoder, collate_encdec
from fourm.objectives.mixture import ObjectiveConfig, make_example
from fourm.vocab import SharedVocab

log = logging.getLogger(__name__)


def manifest_context(manifest: dict) -> tuple[SharedVocab, dict[str, int], dict[str, str]]:
    """From a token-shard manifest: the vocabulary, the image grids and each modality's kind, as
    ``TokenStream`` takes them."""
    from fourm.modalities import MODALITIES

    vocab = SharedVocab(**{k: manifest["vocab"][k] for k in ("specials", "spaces", "modalities")})
    grids = {m: int(g) for m, g in manifest.get("grids", {}).items()}
    return vocab, grids, {m: MODALITIES[m].kind for m in vocab.modalities}


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


def _decode_tokens(sample: dict, modalities: set[str] | None) -> dict[str, np.ndarray]:
    out = {}
    for name, value in sample.items():
        if name.endswith(TOKENS_SUFFIX):
            m = name[: -len(TOKENS_SUFFIX)]
            if modalities is None or m in modalities:
                out[m] = np.load(io.BytesIO(value), allow_pickle=False).astype(np.int64)
    return out


class TokenStream(IterableDataset):
    """Endless batches of objective examples from token shards (see the module docstring)."""

    def __init__(self, cfg: StreamConfig, arch: str, vocab: SharedVocab, kinds: dict[str, str], grids: dict[str, int], objective: ObjectiveConfig, rank: int = 0, world: int = 1, skip: int = 0):
        super().__init__()
        self.cfg, self.arch, self.vocab, self.kinds, self.grids, self.objective = cfg, arch, vocab, kinds, grids, objective
        self.rank, self.world, self.skip = rank, world, skip
        # local directories, globs and brace patterns; webdataset URLs (pipe:..., https://...)
        # are brace-expanded and handed to webdataset's own opener
        self.sources = [(expand_shards(s.path), s.weight) for s in cfg.sources]
        for (urls, _), src in zip(self.sources, cfg.sources):
            if not urls:
                raise FileNotFoundError(f"no token shards at {src.path}")
        self.skipped = SkipCounter()

    def _samples(self, urls: list[str], epoch: int, worker: int, workers: int):
        order = np.random.default_rng([self.cfg.seed, epoch]).permutation(len(urls))
        mine = [urls[i] for i in order][self.rank :: self.world][worker::workers]
        stream = wds.tarfile_to_samples(handler=self.skipped.record)
        modalities = set(self.cfg.modalities) if self.cfg.modalities else None
        for sample in stream(iter({"url": u} for u in mine)):
            tokens = _decode_tokens(sample, modalities)
            if tokens:
                yield sample["__key__"], tokens

    def _examples(self, worker: int, workers: int):
        epoch = 0
        while True:
            iters = [self._samples(urls, epoch, worker, workers) for urls, _ in self.sources]
            weights = np.array([w for _, w in self.sources], dtype=float)
            pick = np.random.default_rng([self.cfg.seed, epoch, 1_000_003 + worker])
            alive = [True] * len(iters)
            produced = 0
            while any(alive):
                p = weights * np.array(alive)
                i = int(pick.choice(len(iters), p=p / p.sum()))
                try:
                    key, tokens = next(iters[i])
                except StopIteration:
                    alive[i] = False
                    continue
                rng = np.random.default_rng([self.cfg.seed, epoch, zlib.crc32(key.encode())])
                example, objective = make_example(self.arch, tokens, self.kinds, self.vocab, self.grids, self.objective, rng)
                produced += 1
                yield example
            if produced == 0:
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
        for example in self._examples(worker, workers):
            buf.append(example)
            if len(buf) < self.cfg.shuffle_buffer:
                continue
            batch.append(buf.pop(int(shuffle.integers(len(buf)))))
            if len(batch) == self.cfg.batch_size:
                n_batches += 1
                if n_batches > skip:
                    yield collate(batch, self.vocab.pad_id)
                batch = []


def make_loader(stream: TokenStream) -> torch.utils.data.DataLoader:
    """A DataLoader over the stream (batches are made in the workers)."""
    return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=stream.cfg.num_workers, persistent_workers=False)
