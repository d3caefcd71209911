"""Bounding boxes as token sequences, in the 4M / Unified-IO manner.

Per box: four coordinate-bin tokens ``x0 y0 x1 y1`` (each coordinate divided by the image width or
height and quantised to ``bins`` levels), then the label's text tokens. Boxes are put in a stated
order (``raster``: by top edge, then left edge, the default; ``area``: largest first; ``given``).
The pure functions here work on local coordinate bins; ``TokenizerSet`` joins them with the text
tokenizer into shared-vocabulary ids.
"""

from __future__ import annotations

from dataclasses import dataclass

ORDERS = ("raster", "area", "given")


@dataclass
class BoxTokenizerConfig:
    bins: int = 1000
    order: str = "raster"
    max_boxes: int = 0  # 0: no limit

    def __post_init__(self) -> None:
        if self.bins < 2:
            raise ValueError(f"bins must be >= 2, got {self.bins}")
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {self.order!r}")


def order_boxes(boxes: list[dict], order: str) -> list[dict]:
    """Boxes in the stated order (a stable sort)."""
    if order == "raster":
        return sorted(boxes, key=lambda b: (b["bbox"][1], b["bbox"][0]))
    if order == "area":
        return sorted(boxes, key=lambda b: -(b["bbox"][2] - b["bbox"][0]) * (b["bbox"][3] - b["bbox"][1]))
    return list(boxes)


def quantize_box(bbox: list[float], image_size: tuple[int, int], bins: int) -> list[int]:
    """[x0, y0, x1, y1] pixels -> 4 bins in [0, bins); image_size is (height, width)."""
    h, w = image_size
    out = []
    for i, v in enumerate(bbox):
        extent = w if i % 2 == 0 else h
        out.append(min(bins - 1, max(0, round(float(v) / extent * (bins - 1)))))
    return out


def dequantize_box(bins_xyxy: list[int], image_size: tuple[int, int], bins: int) -> list[float]:
    """4 bins -> [x0, y0, x1, y1] pixels."""
    h, w = image_size
    return [b / (bins - 1) * (w if i % 2 == 0 else h) for i, b in enumerate(bins_xyxy)]


class BoxTokenizer:
    """Quantisation and ordering of boxes (no training needed)."""

    def __init__(self, config: BoxTokenizerConfig | None = None):
        self.config = config or BoxTokenizerConfig()

    def to_bins(self, boxes: list[dict], image_size: tuple[int, int]) -> list[tuple[list[int], str]]:
        """Boxes -> [(4 coordinate bins, label)] in the configured order (truncated to max_boxes)."""
        ordered = order_boxes(boxes, self.config.order)
        if self.config.max_boxes:
            ordered = ordered[: self.config.max_boxes]
        return [(quantize_box(b["bbox"], image_size, self.config.bins), str(b["label"])) for b in ordered]

    def from_bins(self, items: list[tuple[list[int], str]], image_size: tuple[int, int]) -> list[dict]:
        """[(4 bins, label)] -> boxes in pixels."""
        return [{"bbox": dequantize_box(c, image_size, self.config.bins), "label": label} for c, label in items]
