"""Reconstruction quality of one image-like tokenizer, accumulated over batches: used by the
validation during tokenizer training and by ``tokenizers/evaluate.py``."""

from __future__ import annotations

import torch

from fourm.data.normals import decode_normals
from fourm.metrics import codebook_stats, depth_metrics, miou_from_confusion, normal_angle_metrics, psnr, segmentation_confusion, ssim


class ReconstructionMeter:
    """rgb: PSNR (and SSIM when asked); depth: AbsRel, RMSE, δ1..δ3; semseg: mIoU, pixel accuracy,
    per-class IoU; normals: angular error (mean, median, within 11.25/22.5/30 degrees); every
    modality: codebook usage and perplexity. ``score`` is the one number to maximise (PSNR, δ1,
    mIoU or the fraction of normals within 11.25 degrees)."""

    def __init__(self, modality: str, codebook_size: int, num_classes: int = 0, with_ssim: bool = False):
        self.modality, self.codebook_size, self.num_classes, self.with_ssim = modality, codebook_size, num_classes, with_ssim
        self.ids: list[torch.Tensor] = []
        self.psnr: list[torch.Tensor] = []
        self.ssim: list[torch.Tensor] = []
        self.pred: list[torch.Tensor] = []
        self.true: list[torch.Tensor] = []
        self.conf: torch.Tensor | None = None

    def update(self, raw: torch.Tensor, recon: torch.Tensor, local_ids: torch.Tensor) -> None:
        """raw and recon in the tokenizer's raw form (see ``ImageTokenizer``); local_ids (B, N)."""
        self.ids.append(local_ids)
        if self.modality == "rgb":
            self.psnr.append(psnr(recon, raw))
            if self.with_ssim:
                self.ssim.append(ssim(recon, raw))
        elif self.modality == "depth":
            self.pred.append(recon)
            self.true.append(raw.float())
        elif self.modality == "normals":
            self.pred.append(recon)
            self.true.append(decode_normals(raw))
        else:
            c = segmentation_confusion(recon, raw, self.num_classes)
            self.conf = c if self.conf is None else self.conf + c

    @property
    def samples(self) -> int:
        return sum(len(i) for i in self.ids)

    def summary(self) -> dict:
        stats = codebook_stats(torch.cat(self.ids), self.codebook_size)
        out: dict = {"codebook_usage": stats["usage"], "codebook_perplexity": stats["perplexity"], "tokens_per_image": int(self.ids[0].shape[1])}
        if self.modality == "rgb":
            out["psnr"] = float(torch.cat(self.psnr).mean())
            if self.with_ssim:
                out["ssim"] = float(torch.cat(self.ssim).mean())
            out["score"] = out["psnr"]
        elif self.modality == "depth":
            out.update(depth_metrics(torch.cat(self.pred), torch.cat(self.true)))
            out["score"] = out["delta1"]
        elif self.modality == "normals":
            out.update(normal_angle_metrics(torch.cat(self.pred), torch.cat(self.true)))
            out["score"] = out["within_11_25"]
        else:
            r = miou_from_confusion(self.conf)
            out["miou"], out["pixel_acc"], out["per_class_iou"] = r["miou"], r["pixel_acc"], r["per_class_iou"]
            out["score"] = out["miou"]
        return out
