"""fourm.metrics: known values and a slow SSIM reference."""

from __future__ import annotations

import math

import pytest
import torch

from fourm.metrics import (
    box_iou,
    codebook_stats,
    depth_metrics,
    matched_box_iou,
    miou_from_confusion,
    psnr,
    segmentation_confusion,
    ssim,
)


# ---------------------------------------------------------------- PSNR


def test_psnr_known_values():
    target = torch.full((2, 3, 8, 8), 100, dtype=torch.uint8)
    pred = target.clone()
    pred[0] += 1  # constant error 1 -> 20 log10(255) = 48.1308 dB
    out = psnr(pred, target)
    assert out.shape == (2,)
    assert out[0].item() == pytest.approx(20 * math.log10(255.0), abs=1e-4)
    assert out[0].item() == pytest.approx(48.1308, abs=1e-4)
    # identical -> MSE clamped at 1e-10: finite, 10 log10(255^2 / 1e-10)
    assert math.isfinite(out[1].item())
    assert out[1].item() == pytest.approx(10 * math.log10(255.0**2 / 1e-10), abs=1e-6)
    # uint8 arithmetic must not wrap: pred < target by 10 everywhere
    lo = target - 10
    assert psnr(lo, target)[0].item() == pytest.approx(20 * math.log10(25.5), abs=1e-4)


def test_psnr_data_range_and_mixed_error():
    target = torch.zeros(1, 1, 2, 2)
    pred = torch.tensor([[[[0.1, 0.0], [0.0, 0.1]]]])  # MSE = 0.005
    assert psnr(pred, target, data_range=1.0).item() == pytest.approx(10 * math.log10(1 / 0.005), abs=1e-4)
    with pytest.raises(ValueError):
        psnr(pred, target[..., :1])


# ---------------------------------------------------------------- SSIM


def _ssim_reference(x: torch.Tensor, y: torch.Tensor, data_range: float, window: int, sigma: float) -> torch.Tensor:
    """Slow SSIM: explicit loops over images, channels and valid window positions, with the
    (co)variances computed as weighted sums of centred products."""
    x = x.double()
    y = y.double()
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    r = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g1 = torch.exp(-(r**2) / (2 * sigma**2))
    w = g1[:, None] * g1[None, :]
    w = w / w.sum()
    b, c, h, wd = x.shape
    out = []
    for bi in range(b):
        vals = []
        for ci in range(c):
            for i in range(h - window + 1):
                for j in range(wd - window + 1):
                    px = x[bi, ci, i : i + window, j : j + window]
                    py = y[bi, ci, i : i + window, j : j + window]
                    mx = (w * px).sum()
                    my = (w * py).sum()
                    vx = (w * (px - mx) ** 2).sum()
                    vy = (w * (py - my) ** 2).sum()
                    cxy = (w * (px - mx) * (py - my)).sum()
                    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
                    vals.append(s.item())
        out.append(sum(vals) / len(vals))
    return torch.tensor(out, dtype=torch.float64)


def test_ssim_matches_slow_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, 3, 11, 12), generator=g).to(torch.uint8)
    noise = torch.randint(-40, 41, x.shape, generator=g)
    y = (x.to(torch.int64) + noise).clamp(0, 255).to(torch.uint8)
    got = ssim(x, y)
    ref = _ssim_reference(x, y, 255.0, 7, 1.5)
    assert got.shape == (2,)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-9)
    # other window / sigma / range
    xf, yf = x.float() / 255, y.float() / 255
    got = ssim(xf, yf, data_range=1.0, window=5, sigma=1.0)
    torch.testing.assert_close(got, _ssim_reference(xf, yf, 1.0, 5, 1.0), rtol=0, atol=1e-6)


def test_ssim_identity_and_monotone_in_noise():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 32, generator=g) * 255
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64), atol=1e-12)
    noise = torch.randn(x.shape, generator=g)
    scores = [ssim((x + s * noise).clamp(0, 255), x).mean().item() for s in (2.0, 10.0, 30.0, 80.0)]
    assert all(a > b for a, b in zip(scores, scores[1:])), scores
    assert scores[0] < 1.0 and scores[-1] < 0.8


def test_ssim_rejects_small_images():
    x = torch.zeros(1, 1, 6, 6)
    with pytest.raises(ValueError):
        ssim(x, x)


# ---------------------------------------------------------------- depth


def test_depth_metrics_known_values():
    target = torch.tensor([[[1.0, 2.0], [4.0, 0.0]]])  # (1, 2, 2); the 0 is invalid by default
    pred = torch.tensor([[[1.0, 3.0], [2.0, 7.0]]])
    m = depth_metrics(pred, target)
    # valid pixels: (1,1), (3,2), (2,4); ratios 1, 1.5, 2
    assert m["abs_rel"] == pytest.approx((0 + 0.5 + 0.5) / 3)
    assert m["rmse"] == pytest.approx(math.sqrt((0 + 1 + 4) / 3))
    assert m["delta1"] == pytest.approx(1 / 3)  # 1 < 1.25
    assert m["delta2"] == pytest.approx(2 / 3)  # 1.5 < 1.5625
    assert m["delta3"] == pytest.approx(2 / 3)  # 2 >= 1.953125
    # (B, 1, H, W) gives the same; explicit mask drops the (3, 2) pixel
    assert depth_metrics(pred[:, None], target[:, None]) == pytest.approx(m)
    valid = torch.tensor([[[True, False], [True, True]]])
    m2 = depth_metrics(pred, target, valid)
    assert m2["abs_rel"] == pytest.approx(0.25)
    assert m2["rmse"] == pytest.approx(math.sqrt(2.0))
    assert m2["delta1"] == pytest.approx(0.5) and m2["delta3"] == pytest.approx(0.5)


def test_depth_metrics_clamp_nonfinite_and_empty():
    target = torch.tensor([[[2.0, float("nan"), float("inf")]]])
    pred = torch.tensor([[[-1.0, 1.0, 1.0]]])  # clamped to 1e-6
    m = depth_metrics(pred, target)
    assert m["abs_rel"] == pytest.approx((2.0 - 1e-6) / 2.0)
    assert m["delta3"] == 0.0
    assert all(math.isfinite(v) for v in m.values())
    empty = depth_metrics(pred, torch.zeros_like(target))
    assert all(math.isnan(v) for v in empty.values())
    with pytest.raises(ValueError):
        depth_metrics(torch.ones(1, 2, 2, 2), torch.ones(1, 2, 2, 2))


# ---------------------------------------------------------------- segmentation


def test_segmentation_confusion_and_miou():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 1]])
    conf = segmentation_confusion(pred, target, num_classes=4, ignore_index=255)
    expected = torch.tensor(
        [
            [1, 1, 0, 0],
            [0, 3, 0, 0],
            [1, 0, 1, 0],
            [0, 0, 0, 0],
        ]
    )
    assert conf.dtype == torch.int64
    assert torch.equal(conf, expected)
    r = miou_from_confusion(conf)
    # IoU0 = 1/(2+2-1) = 1/3, IoU1 = 3/(3+4-3) = 3/4, IoU2 = 1/(2+1-1) = 1/2; class 3 absent
    assert r["per_class_iou"][:3] == pytest.approx([1 / 3, 3 / 4, 1 / 2])
    assert r["per_class_iou"][3] is None
    assert r["miou"] == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)
    assert r["pixel_acc"] == pytest.approx(5 / 7)
    # accumulation over batches = one big batch
    both = segmentation_confusion(pred, target, 4, 255) + segmentation_confusion(pred.flip(0), target.flip(0), 4, 255)
    assert torch.equal(both, 2 * expected)


def test_segmentation_class_only_in_pred_counts_and_errors():
    conf = segmentation_confusion(torch.tensor([0, 2]), torch.tensor([0, 0]), num_classes=3)
    r = miou_from_confusion(conf)
    assert r["per_class_iou"] == [0.5, None, 0.0]
    assert r["miou"] == pytest.approx(0.25)
    with pytest.raises(ValueError):
        segmentation_confusion(torch.tensor([3]), torch.tensor([0]), num_classes=3)
    with pytest.raises(ValueError):
        segmentation_confusion(torch.tensor([0]), torch.tensor([255]), num_classes=3)


# ---------------------------------------------------------------- boxes


def test_box_iou_known_values():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 6.0, 6.0], [1.0, 1.0, 1.0, 1.0]])
    iou = box_iou(a, b)
    assert iou.shape == (2, 4)
    expected = torch.tensor([[1 / 7, 1.0, 0.0, 0.0], [0.0, 0.25, 0.0, 0.0]])
    torch.testing.assert_close(iou, expected)
    assert box_iou(torch.tensor([[0, 0, 4, 2]]), torch.tensor([[2, 0, 6, 2]])).item() == pytest.approx(1 / 3)
    assert box_iou(torch.zeros(0, 4), b).shape == (0, 4)


def test_matched_box_iou_greedy_same_label():
    target = [
        {"bbox": [0, 0, 10, 10], "label": "cube"},
        {"bbox": [0, 0, 10, 5], "label": "cube"},
        {"bbox": [20, 20, 30, 30], "label": "sphere"},
        {"bbox": [40, 40, 50, 50], "label": "cone"},
    ]
    pred = [
        {"bbox": [0, 0, 10, 10], "label": "cube"},  # IoU 1 with t0, 0.5 with t1
        {"bbox": [20, 20, 30, 30], "label": "cube"},  # wrong label for t2
        {"bbox": [20, 20, 30, 25], "label": "sphere"},  # IoU 0.5 with t2
    ]
    assert matched_box_iou(pred, target) == pytest.approx([1.0, 0.0, 0.5, 0.0])
    # greedy takes the best pair first: p0 goes to t0, so t1 gets the second-best remaining box
    pred2 = pred + [{"bbox": [0, 0, 10, 4], "label": "cube"}]  # IoU 0.8 with t1
    assert matched_box_iou(pred2, target) == pytest.approx([1.0, 0.8, 0.5, 0.0])
    assert matched_box_iou([], target) == [0.0] * 4
    assert matched_box_iou(pred, []) == []


# ---------------------------------------------------------------- codebook


def test_codebook_stats():
    uniform = torch.arange(16).repeat(3).reshape(3, 4, 4)
    s = codebook_stats(uniform, 16)
    assert s["usage"] == 1.0
    assert s["perplexity"] == pytest.approx(16.0)
    single = torch.full((2, 8, 8), 5)
    s = codebook_stats(single, 1024)
    assert s["usage"] == pytest.approx(1 / 1024)
    assert s["perplexity"] == pytest.approx(1.0)
    half = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    s = codebook_stats(half, 8)
    assert s["usage"] == 0.5 and s["perplexity"] == pytest.approx(4.0)
    skew = torch.tensor([0, 0, 0, 1])  # H = -(3/4 ln 3/4 + 1/4 ln 1/4)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert codebook_stats(skew, 2)["perplexity"] == pytest.approx(math.exp(h))
    with pytest.raises(ValueError):
        codebook_stats(torch.tensor([16]), 16)
