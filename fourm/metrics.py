"""Pure-torch evaluation metrics, below everything that scores (tokenizer training and
evaluation, ``fourm.eval``'s suite, the playground): functions of tensors, no model, no data.

Used to score tokenizer reconstructions and model predictions: PSNR and SSIM for images, the
standard monocular-depth metrics, angular errors of surface normals, confusion-matrix mIoU for semantic segmentation, box IoU with
greedy same-label matching, and codebook usage/perplexity for VQ/FSQ tokenizers.

Image metrics compute in float64 (inputs of any numeric dtype, on any device) so that results do
not depend on the input dtype; batch metrics that callers accumulate return Python floats.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "psnr",
    "ssim",
    "depth_metrics",
    "normal_angle_metrics",
    "segmentation_confusion",
    "miou_from_confusion",
    "box_iou",
    "matched_box_iou",
    "codebook_stats",
]

_MSE_FLOOR = 1e-10


def _check_images(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    if pred.dim() != 4:
        raise ValueError(f"expected (B, C, H, W) images, got shape {tuple(pred.shape)}")


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 255.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image.

    Args:
        pred, target: (B, C, H, W) images of any numeric dtype, values in [0, data_range].
        data_range: the span of pixel values (255 for uint8, 1 for [0, 1] floats).

    Returns:
        (B,) float64 tensor in dB: ``10 * log10(data_range**2 / MSE)`` with the MSE over C, H, W
        clamped at 1e-10, so identical images give a large finite value (e.g. 148.13 dB on 255).
    """
    _check_images(pred, target)
    diff = pred.to(torch.float64) - target.to(torch.float64)
    mse = diff.pow(2).flatten(1).mean(dim=1).clamp_min(_MSE_FLOOR)
    return 10.0 * torch.log10(torch.as_tensor(float(data_range) ** 2, dtype=torch.float64, device=mse.device) / mse)


def _gaussian_window(window: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(window, window) normalised 2D Gaussian, the outer product of a normalised 1D one."""
    coords = torch.arange(window, dtype=dtype, device=device) - (window - 1) / 2.0
    g = torch.exp(-(coords**2) / (2.0 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(
    pred: torch.Tensor,
    target: torch.Tensor,
    data_range: float = 255.0,
    window: int = 7,
    sigma: float = 1.5,
) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) per image.

    Local statistics use a ``window`` x ``window`` normalised Gaussian (std ``sigma`` pixels),
    applied per channel with 'valid' padding (only windows fully inside the image), with
    K1 = 0.01, K2 = 0.03, C1 = (K1 * L)**2, C2 = (K2 * L)**2 and L = ``data_range``:

        SSIM = ((2 mu_x mu_y + C1)(2 cov_xy + C2)) / ((mu_x**2 + mu_y**2 + C1)(var_x + var_y + C2))

    where the (co)variances are Gaussian-weighted, without a sample-size correction. The SSIM map
    is averaged over channels and window positions.

    Args:
        pred, target: (B, C, H, W) images of any numeric dtype, values in [0, data_range];
            H and W must be at least ``window``.
        data_range: the span of pixel values (255 for uint8, 1 for [0, 1] floats).
        window: odd-or-even side of the Gaussian window in pixels.
        sigma: Gaussian standard deviation in pixels.

    Returns:
        (B,) float64 tensor, unitless, 1.0 for identical images.
    """
    _check_images(pred, target)
    b, c, h, w = pred.shape
    if window < 1 or h < window or w < window:
        raise ValueError(f"window {window} does not fit images of size {h}x{w}")
    x = pred.to(torch.float64)
    y = target.to(torch.float64)
    kernel = _gaussian_window(window, sigma, x.dtype, x.device).expand(c, 1, window, window).contiguous()

    def filt(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=c)

    mu_x, mu_y = filt(x), filt(y)
    var_x = filt(x * x) - mu_x * mu_x
    var_y = filt(y * y) - mu_y * mu_y
    cov_xy = filt(x * y) - mu_x * mu_y
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    num = (2.0 * mu_x * mu_y + c1) * (2.0 * cov_xy + c2)
    den = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    return (num / den).flatten(1).mean(dim=1)


def depth_metrics(
    pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None
) -> dict[str, float]:
    """Standard monocular depth metrics over all valid pixels of a batch.

    Args:
        pred, target: (B, 1, H, W) or (B, H, W) depth in metres (same shape). ``pred`` is
            clamped to >= 1e-6 before any ratio is taken.
        valid: optional bool mask broadcastable to ``target``; default ``target > 0`` and finite.
            It is always intersected with ``target > 0`` and finite.

    Returns:
        {"abs_rel": mean |p - t| / t (unitless), "rmse": sqrt(mean (p - t)**2) (metres),
         "delta1", "delta2", "delta3": fraction of pixels with max(p/t, t/p) < 1.25**k}, pooled
        over every valid pixel of the batch (not averaged per image). All NaN if no pixel is valid.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    if pred.dim() == 4 and pred.shape[1] != 1:
        raise ValueError(f"expected (B, 1, H, W) or (B, H, W) depth, got shape {tuple(pred.shape)}")
    if pred.dim() not in (3, 4):
        raise ValueError(f"expected (B, 1, H, W) or (B, H, W) depth, got shape {tuple(pred.shape)}")
    p = pred.to(torch.float64).clamp_min(1e-6)
    t = target.to(torch.float64)
    mask = torch.isfinite(t) & (t > 0)
    if valid is not None:
        mask = mask & valid.to(torch.bool).expand_as(t)
    keys = ("abs_rel", "rmse", "delta1", "delta2", "delta3")
    if not bool(mask.any()):
        return {k: float("nan") for k in keys}
    p, t = p[mask], t[mask]
    ratio = torch.maximum(p / t, t / p)
    return {
        "abs_rel": float(((p - t).abs() / t).mean()),
        "rmse": float((p - t).pow(2).mean().sqrt()),
        "delta1": float((ratio < 1.25).to(torch.float64).mean()),
        "delta2": float((ratio < 1.25**2).to(torch.float64).mean()),
        "delta3": float((ratio < 1.25**3).to(torch.float64).mean()),
    }


NORMAL_THRESHOLDS = {"within_11_25": 11.25, "within_22_5": 22.5, "within_30": 30.0}  # degrees, the usual bins


def normal_angle_metrics(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> dict[str, float]:
    """Angular error of surface normals over all valid pixels of a batch.

    Args:
        pred, target: (B, 3, H, W) normal vectors (same shape), normalised here (a zero vector
            counts as 90 degrees from anything).
        valid: optional bool mask broadcastable to (B, H, W).

    Returns:
        {"mean_deg", "median_deg": the angle between pred and target in degrees, pooled over every
         valid pixel of the batch; "within_11_25", "within_22_5", "within_30": the fraction of
         those pixels with an angle below the threshold}. All NaN if no pixel is valid.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    if pred.dim() != 4 or pred.shape[1] != 3:
        raise ValueError(f"expected (B, 3, H, W) normals, got shape {tuple(pred.shape)}")
    p = F.normalize(pred.to(torch.float64), dim=1, eps=1e-12)
    t = F.normalize(target.to(torch.float64), dim=1, eps=1e-12)
    angle = torch.rad2deg(torch.arccos((p * t).sum(1).clamp(-1.0, 1.0)))  # (B, H, W)
    if valid is not None:
        angle = angle[valid.to(torch.bool).expand_as(angle)]
    n = angle.numel()
    if n == 0:
        return {k: float("nan") for k in ("mean_deg", "median_deg", *NORMAL_THRESHOLDS)}
    angle = angle.flatten()
    median = (angle.kthvalue((n + 1) // 2).values + angle.kthvalue(n // 2 + 1).values) / 2  # the middle one or two
    out = {"mean_deg": float(angle.mean()), "median_deg": float(median)}
    out.update({k: float((angle < th).to(torch.float64).mean()) for k, th in NORMAL_THRESHOLDS.items()})
    return out


def segmentation_confusion(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None = None
) -> torch.Tensor:
    """Confusion counts of a semantic segmentation.

    Args:
        pred, target: integer class maps of the same shape (e.g. (B, H, W)), values in
            [0, num_classes) except ``ignore_index`` in ``target``.
        num_classes: number of classes K.
        ignore_index: target value whose pixels are skipped (e.g. 255); None skips nothing.

    Returns:
        (K, K) int64 tensor on the input's device; entry [i, j] counts pixels with target i and
        prediction j (rows = target, cols = pred). Sum these over batches, then call
        :func:`miou_from_confusion`.

    Raises:
        ValueError: shapes differ or a counted value falls outside [0, num_classes).
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    p = pred.reshape(-1).to(torch.int64)
    t = target.reshape(-1).to(torch.int64)
    if ignore_index is not None:
        keep = t != ignore_index
        p, t = p[keep], t[keep]
    k = int(num_classes)
    if p.numel() and (int(p.min()) < 0 or int(p.max()) >= k or int(t.min()) < 0 or int(t.max()) >= k):
        raise ValueError(f"class ids must lie in [0, {k}) (ignore_index={ignore_index})")
    return torch.bincount(t * k + p, minlength=k * k).reshape(k, k)


def miou_from_confusion(conf: torch.Tensor) -> dict[str, Any]:
    """Mean IoU and pixel accuracy from a (K, K) confusion matrix (rows = target, cols = pred).

    Returns:
        {"miou": mean IoU over classes present in target or pred (float, NaN if none),
         "pixel_acc": correct / counted pixels (float, NaN if none),
         "per_class_iou": list of K floats, None for classes absent from both target and pred}.
    """
    if conf.dim() != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"expected a square (K, K) confusion matrix, got shape {tuple(conf.shape)}")
    c = conf.to(torch.float64)
    tp = torch.diagonal(c)
    union = c.sum(dim=1) + c.sum(dim=0) - tp
    present = union > 0
    iou = tp / union.clamp_min(1.0)
    per_class = [float(v) if ok else None for v, ok in zip(iou.tolist(), present.tolist())]
    total = float(c.sum())
    return {
        "miou": float(iou[present].mean()) if bool(present.any()) else float("nan"),
        "pixel_acc": float(tp.sum()) / total if total > 0 else float("nan"),
        "per_class_iou": per_class,
    }


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of axis-aligned boxes.

    Args:
        a: (N, 4) boxes, b: (M, 4) boxes, both ``[x0, y0, x1, y1]`` in any consistent unit
            (pixels or normalised); boxes with x1 < x0 or y1 < y0 count as empty.

    Returns:
        (N, M) tensor of IoU in [0, 1], in the inputs' promoted floating dtype (float64 for
        integer inputs); a pair whose union is empty has IoU 0.
    """
    a = torch.as_tensor(a)
    b = torch.as_tensor(b)
    dtype = torch.promote_types(a.dtype, b.dtype)
    if not dtype.is_floating_point:
        dtype = torch.float64
    a = a.to(dtype).reshape(-1, 4)
    b = b.to(dtype).reshape(-1, 4)
    area_a = (a[:, 2] - a[:, 0]).clamp_min(0) * (a[:, 3] - a[:, 1]).clamp_min(0)
    area_b = (b[:, 2] - b[:, 0]).clamp_min(0) * (b[:, 3] - b[:, 1]).clamp_min(0)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp_min(0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(torch.finfo(dtype).tiny), torch.zeros_like(inter))


def matched_box_iou(pred: list[dict], target: list[dict]) -> list[float]:
    """Greedy one-to-one matching of predicted to target boxes of the same label.

    All same-label (pred, target) pairs are visited in order of decreasing IoU (ties: lower target
    index, then lower pred index) and a pair is matched when neither box is matched yet and its IoU
    is > 0.

    Args:
        pred, target: lists of ``{"bbox": [x0, y0, x1, y1], "label": str}``.

    Returns:
        One float per target box, in target order: the IoU with its matched prediction, 0.0 if
        unmatched.
    """
    result = [0.0] * len(target)
    if not pred or not target:
        return result
    ious = box_iou(
        torch.tensor([d["bbox"] for d in pred], dtype=torch.float64),
        torch.tensor([d["bbox"] for d in target], dtype=torch.float64),
    ).tolist()
    pairs = [
        (-ious[pi][ti], ti, pi)
        for ti, t in enumerate(target)
        for pi, p in enumerate(pred)
        if p["label"] == t["label"] and ious[pi][ti] > 0
    ]
    pairs.sort()
    used_pred: set[int] = set()
    used_target: set[int] = set()
    for neg_iou, ti, pi in pairs:
        if ti in used_target or pi in used_pred:
            continue
        used_target.add(ti)
        used_pred.add(pi)
        result[ti] = -neg_iou
    return result


def codebook_stats(ids: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """Codebook utilisation of tokenizer ids.

    Args:
        ids: integer tensor of any shape, values in [0, codebook_size).
        codebook_size: number of codes K.

    Returns:
        {"usage": fraction of the K codes used at least once (in [0, 1]),
         "perplexity": exp(entropy in nats of the empirical code distribution), in [1, K];
         1 when a single code is used, K when all are used equally}. For empty ``ids``,
        usage is 0.0 and perplexity NaN.
    """
    flat = torch.as_tensor(ids).reshape(-1).to(torch.int64)
    k = int(codebook_size)
    if flat.numel() == 0:
        return {"usage": 0.0, "perplexity": float("nan")}
    if int(flat.min()) < 0 or int(flat.max()) >= k:
        raise ValueError(f"ids must lie in [0, {k})")
    counts = torch.bincount(flat, minlength=k).to(torch.float64)
    probs = counts / counts.sum()
    nz = probs[probs > 0]
    entropy = -(nz * nz.log()).sum()
    return {"usage": float((counts > 0).sum()) / k, "perplexity": math.exp(float(entropy))}
