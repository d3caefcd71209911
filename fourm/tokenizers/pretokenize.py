"""Token shards: raw shards run once through a tokenizer set, so training never runs encoders.

Each sample of ``OUT/shard-*.tar`` holds ``<modality>.tokens.npy`` (int32 shared-vocabulary ids:
(h*w,) row-major for image-like modalities, (L,) for sequences) for every modality the raw sample
has and the set can encode (``normals`` and ``count`` too, once the set has them), plus ``meta.json`` (``image_size`` as (H, W) and, for affine depth, the
per-image ``depth_scale``), and ``rgb.pixels.npy``: the (3, R, R) uint8 image the rgb tokens were
made from, for models that also read rgb inputs as pixel patches (the manifest's ``pixels``:
{modality: R}), and ``semseg.labels.npy``: the (R, R) uint8 class map the semseg tokens were made
from, for a model's dense auxiliary loss (``EncDecConfig.aux_labels``; the manifest's ``labels``:
{modality: R}). Where the raw dataset has instance maps and its manifest lists its box labels, also
``objects.labels.npy``: the object label map (``fourm.data.object_labels``; the manifest's
``object_classes`` names its classes). A sample missing a modality keeps the others. ``OUT/manifest.json``
names the tokenizer set and carries a copy of its vocabulary and the vocabulary's SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fourm.data.codecs import encode_json, encode_npy
from fourm.data.loader import LoaderConfig, build_loader, image_size_of
from fourm.data.object_labels import OBJECT_LABELS, object_classes, object_label_map
from fourm.data.shards import MANIFEST, ShardSink, prepare_output_dir
from fourm.tokenizers.tokenizer_set import TokenizerSet

log = logging.getLogger(__name__)

TOKENS_SUFFIX = ".tokens.npy"
PIXELS_SUFFIX = ".pixels.npy"  # the image a modality's tokens were made from, (C, R, R) uint8
PIXEL_MODALITIES = ("rgb",)  # kept as pixels too (``EncDecConfig.rgb_pixels`` reads them)
LABELS_SUFFIX = ".labels.npy"  # the class map a modality's tokens were made from, (R, R) uint8
LABEL_MODALITIES = ("semseg",)  # kept as class maps too (``EncDecConfig.aux_labels`` reads them)
PRETOKENIZER_VERSION = "pretokenize/1"


def vocab_sha256(tset: TokenizerSet) -> str:
    return hashlib.sha256(json.dumps(tset.vocab.to_json(), sort_keys=True).encode()).hexdigest()


def pretokenize(tokenizers: str | os.PathLike, data, out: str | os.PathLike, batch_size: int = 64, shard_size: int = 1000, overwrite: bool = False, progress: bool = True) -> dict:
    """Tokenize raw shards ``data`` with the set at ``tokenizers`` into token shards at ``out``."""
    tset = TokenizerSet.from_pretrained(tokenizers)
    mods = tset.modalities
    raw_manifest = Path(str(data)) / MANIFEST if not isinstance(data, (list, tuple)) else None
    dataset = json.loads(raw_manifest.read_text()) if raw_manifest is not None and raw_manifest.is_file() else {}
    classes = object_classes(dataset)
    stuff = len(dataset["classes"]) if classes else 0
    extra = ("instance",) if classes and "semseg" in mods and "boxes" in mods else ()
    loader, skipped = build_loader(data, LoaderConfig(modalities=(), optional=(*mods, *extra), batch_size=batch_size, shuffle=0, num_workers=1))
    out_dir = prepare_output_dir(out, overwrite)
    counts = {m: 0 for m in mods}
    pixel_sizes: dict[str, int] = {}  # modality -> R of its (3, R, R) pixel images
    label_sizes: dict[str, int] = {}  # modality -> R of its (R, R) class maps
    bar = tqdm(desc="pretokenize", unit="sample", disable=not progress)
    with ShardSink(Path(out_dir), shard_size) as sink:
        for batch in loader:
            b = len(batch["__key__"])
            samples: list[dict] = [{"__key__": k} for k in batch["__key__"]]
            metas: list[dict] = [{} for _ in range(b)]
            for i in range(b):
                size = image_size_of(batch, i)
                if size is not None:
                    metas[i]["image_size"] = list(size)
            for m in mods:
                values = batch[m]
                present = [i for i in range(b) if values[i] is not None]
                if not present:
                    continue
                if m in tset.images:
                    raw = values[present] if isinstance(values, torch.Tensor) else torch.stack([values[i] for i in present])
                    ids, scale = tset.encode_images(m, raw)
                    as_labels = m in LABEL_MODALITIES and raw.dim() == 3 and 0 <= int(raw.min()) and int(raw.max()) < 256
                    for j, i in enumerate(present):
                        samples[i][m + TOKENS_SUFFIX] = encode_npy(ids[j].numpy().astype(np.int32))
                        if m in PIXEL_MODALITIES and raw.dtype == torch.uint8:
                            samples[i][m + PIXELS_SUFFIX] = encode_npy(raw[j].numpy())
                            pixel_sizes[m] = int(raw.shape[-1])
                        if as_labels:
                            samples[i][m + LABELS_SUFFIX] = encode_npy(raw[j].numpy().astype(np.uint8))
                            label_sizes[m] = int(raw.shape[-1])
                        if scale is not None:
                            metas[i]["depth_scale"] = [float(v) for v in scale[j]]
                elif tset.is_text(m):
                    for i, ids in zip(present, tset.encode(m, [values[i] for i in present])):
                        samples[i][m + TOKENS_SUFFIX] = encode_npy(ids.numpy().astype(np.int32))
                else:
                    for i in present:
                        if "image_size" not in metas[i]:
                            log.warning("%s: boxes without an image to take the size from; skipped", samples[i]["__key__"])
                            continue
                        ids = tset.encode("boxes", [values[i]], image_size=tuple(metas[i]["image_size"]))[0]
                        samples[i][m + TOKENS_SUFFIX] = encode_npy(ids.numpy().astype(np.int32))
            for i in range(b) if extra else ():
                semseg, instance, boxes = batch["semseg"][i], batch["instance"][i], batch["boxes"][i]
                if semseg is not None and instance is not None and boxes is not None:
                    labels = object_label_map(semseg.numpy(), instance.numpy(), boxes, classes, stuff)
                    samples[i][OBJECT_LABELS + LABELS_SUFFIX] = encode_npy(labels)
                    label_sizes[OBJECT_LABELS] = int(labels.shape[-1])
            for s, meta in zip(samples, metas):
                for m in mods:
                    counts[m] += (m + TOKENS_SUFFIX) in s
                s["meta.json"] = encode_json(meta)
                sink.write(s)
            bar.update(b)
        bar.close()
        manifest = sink.finish(
            {
                "generator": PRETOKENIZER_VERSION,
                "kind": "tokens",
                "tokenizers": str(Path(tokenizers).resolve()),
                "source": str(data),
                "modalities": [m for m in mods if counts[m]],
                "modality_counts": counts,
                "pixels": pixel_sizes,
                "labels": label_sizes,
                **({"object_classes": classes} if OBJECT_LABELS in label_sizes else {}),
                "grids": tset.grids,
                "vocab_sha256": vocab_sha256(tset),
                "vocab": tset.vocab.to_json(),
                "skipped": skipped.as_dict(),
            }
        )
    log.info("pretokenized %d samples into %s (%s)", manifest["num_samples"], out_dir, ", ".join(f"{k} {v}" for k, v in counts.items()))
    return manifest
