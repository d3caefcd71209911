"""Reconstruction quality of a tokenizer set on raw shards (what ``tokenizers/evaluate.py`` reports).

Per modality: rgb PSNR and SSIM; depth AbsRel, RMSE and δ1..δ3 of the reconstruction against the
true metric depth; semseg mIoU and pixel accuracy; boxes mean IoU of the round trip (greedy
same-label matching); caption exact round-trip rate; image codebook usage and perplexity.
"""

from __future__ import annotations

import logging

import torch
from tqdm import tqdm

from fourm.data.loader import LoaderConfig, build_loader
from fourm.eval.metrics import codebook_stats, depth_metrics, matched_box_iou, miou_from_confusion, psnr, segmentation_confusion, ssim
from fourm.tokenizers.tokenizer_set import TokenizerSet

log = logging.getLogger(__name__)


@torch.no_grad()
def evaluate_tokenizer_set(tset: TokenizerSet, data, max_samples: int = 0, batch_size: int = 64, progress: bool = True) -> dict:
    """Round-trip every sample of ``data`` through every tokenizer of the set that the data has.

    Returns ``{modality: {metric: value}}`` plus ``samples``.
    """
    mods = [m for m in tset.modalities if m in ("rgb", "depth", "semseg", "boxes", "caption")]
    loader, skipped = build_loader(data, LoaderConfig(modalities=(), optional=tuple(mods), batch_size=batch_size, shuffle=0, num_workers=0))
    acc: dict = {m: {} for m in mods}
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
            a = acc[m]
            if m in ("rgb", "depth", "semseg"):
                raw = values if isinstance(values, torch.Tensor) else torch.stack([values[i] for i in present])
                ids, scale = tset.encode_images(m, raw)
                recon = torch.stack(tset.decode(m, ids, scales=scale))
                a.setdefault("ids", []).append(tset.vocab.to_local(m, ids))
                if m == "rgb":
                    a.setdefault("psnr", []).append(psnr(recon, raw))
                    a.setdefault("ssim", []).append(ssim(recon, raw))
                elif m == "depth":
                    a.setdefault("pred", []).append(recon)
                    a.setdefault("true", []).append(raw.float())
                else:
                    c = segmentation_confusion(recon, raw, tset.images[m].config.num_classes)
                    a["conf"] = c if "conf" not in a else a["conf"] + c
            elif m == "caption":
                texts = [values[i] for i in present]
                back = tset.decode("caption", tset.encode("caption", texts))
                a.setdefault("exact", []).extend(float(x == y) for x, y in zip(back, texts))
                a.setdefault("length", []).extend(len(t) for t in tset.encode("caption", texts))
            else:
                sizes = batch["rgb"][:b] if "rgb" in batch and isinstance(batch["rgb"], torch.Tensor) else None
                for i in present:
                    hw = tuple(sizes.shape[-2:]) if sizes is not None else (64, 64)
                    ids = tset.encode("boxes", [values[i]], image_size=hw)
                    back = tset.decode("boxes", ids, image_size=hw)[0]
                    a.setdefault("iou", []).extend(matched_box_iou(back, values[i]))
                    a.setdefault("length", []).append(len(ids[0]))
        n += b
        bar.update(b)
        if max_samples and n >= max_samples:
            break
    bar.close()
    return {"samples": n, "skipped": skipped.as_dict(), **{m: _summarise(m, a, tset) for m, a in acc.items() if a}}


def _summarise(m: str, a: dict, tset: TokenizerSet) -> dict:
    out: dict = {}
    if "ids" in a:
        out.update({f"codebook_{k}": v for k, v in codebook_stats(torch.cat(a["ids"]), tset.images[m].codebook_size).items()})
        out["tokens_per_image"] = int(a["ids"][0].shape[1])
    if m == "rgb":
        out["psnr"] = float(torch.cat(a["psnr"]).mean())
        out["ssim"] = float(torch.cat(a["ssim"]).mean())
    elif m == "depth":
        out.update(depth_metrics(torch.cat(a["pred"]), torch.cat(a["true"])))
    elif m == "semseg":
        r = miou_from_confusion(a["conf"])
        out["miou"], out["pixel_acc"], out["per_class_iou"] = r["miou"], r["pixel_acc"], r["per_class_iou"]
    elif m == "caption":
        out["exact_round_trip"] = sum(a["exact"]) / len(a["exact"])
        out["mean_tokens"] = sum(a["length"]) / len(a["length"])
    else:
        out["mean_iou"] = sum(a["iou"]) / max(1, len(a["iou"]))
        out["boxes"] = len(a["iou"])
        out["mean_tokens"] = sum(a["length"]) / max(1, len(a["length"]))
    return out
