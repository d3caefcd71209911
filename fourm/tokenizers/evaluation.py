"""Reconstruction quality of a tokenizer set on raw shards (what ``tokenizers/evaluate.py`` reports).

Per modality: rgb PSNR and SSIM; depth AbsRel, RMSE and δ1..δ3 of the reconstruction against the
true metric depth; semseg mIoU and pixel accuracy; normals angular error; boxes mean IoU of the
round trip (greedy same-label matching); caption and count exact round-trip rate; image codebook
usage and perplexity.
"""

from __future__ import annotations

import logging

import torch
from tqdm import tqdm

from fourm.data.loader import LoaderConfig, build_loader, image_size_of
from fourm.metrics import matched_box_iou
from fourm.tokenizers.reconstruction import ReconstructionMeter
from fourm.tokenizers.tokenizer_set import TokenizerSet

log = logging.getLogger(__name__)


@torch.no_grad()
def evaluate_tokenizer_set(tset: TokenizerSet, data, max_samples: int = 0, batch_size: int = 64, progress: bool = True) -> dict:
    """Round-trip every sample of ``data`` through every tokenizer of the set that the data has.

    Returns ``{modality: {metric: value}}`` plus ``samples``.
    """
    mods = tset.modalities
    loader, skipped = build_loader(data, LoaderConfig(modalities=(), optional=tuple(mods), batch_size=batch_size, shuffle=0, num_workers=0))
    meters = {m: ReconstructionMeter(m, tset.images[m].codebook_size, tset.images[m].config.num_classes, with_ssim=True) for m in mods if m in tset.images}
    seq: dict = {m: {"score": [], "length": []} for m in mods if m not in tset.images}
    n = 0
    bar = tqdm(desc="evaluate tokenizers", unit="sample", disable=not progress)
    for batch in loader:
        b = len(batch["__key__"])
        if max_samples:
            b = min(b, max_samples - n)
        for m in mods:
            values = batch[m][:b]
            present = [i for i, v in enumerate(values) if v is not None]
            if not present:
                continue
            if m in meters:
                raw = values if isinstance(values, torch.Tensor) else torch.stack([values[i] for i in present])
                ids, scale = tset.encode_images(m, raw)
                meters[m].update(raw, torch.stack(tset.decode(m, ids, scales=scale)), tset.vocab.to_local(m, ids))
            elif tset.is_text(m):
                texts = [str(values[i]) for i in present]
                ids = tset.encode(m, texts)
                seq[m]["score"].extend(float(x == y) for x, y in zip(tset.decode(m, ids), texts))
                seq[m]["length"].extend(len(t) for t in ids)
            else:
                for i in present:
                    hw = image_size_of(batch, i) or (tset.resolution, tset.resolution)
                    ids = tset.encode("boxes", [values[i]], image_size=hw)
                    seq[m]["score"].extend(matched_box_iou(tset.decode("boxes", ids, image_size=hw)[0], values[i]))
                    seq[m]["length"].append(len(ids[0]))
        n += b
        bar.update(b)
        if max_samples and n >= max_samples:
            break
    bar.close()
    result = {"samples": n, "skipped": skipped.as_dict()}
    result.update({m: meter.summary() for m, meter in meters.items() if meter.ids})
    for m, acc in seq.items():
        if not acc["length"]:
            continue
        mean_tokens = sum(acc["length"]) / len(acc["length"])
        if tset.is_text(m):
            result[m] = {"exact_round_trip": sum(acc["score"]) / len(acc["score"]), "mean_tokens": mean_tokens}
        else:
            result[m] = {"mean_iou": sum(acc["score"]) / max(1, len(acc["score"])), "boxes": len(acc["score"]), "mean_tokens": mean_tokens}
    return result
