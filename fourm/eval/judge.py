"""A GenEval-style judge for caption -> rgb that does not use the model under test.

Shapes come from a small segmenter trained on ground-truth (rgb, semseg) pairs of the training
split, a share of whose images are replaced by the rgb tokenizer's round trips of them (with
their true labels): what it must read is generated images, which come out of that tokenizer's
decoder, and one trained on the sharp renders alone misreads the decoded shapes; colours from colour analysis: each connected object region's median colour is matched to
the CLEVR palette by direction in RGB (so shading, which scales brightness, does not change it).
A generated image is *correct* for its prompt when every named object is there with its colour,
the number of objects is the number named, and every stated relation holds (left/right by the
regions' centres, front/behind by their lowest rows: nearer objects reach lower in the image).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fourm.data.synth.scene import CLASSES, COLORS, SHAPES
from fourm.eval.captions import parse_caption
from fourm.precision import autocast_for, choose_autocast, training_step
from fourm.schedule import warmup_cosine

log = logging.getLogger(__name__)

_PALETTE = np.array(list(COLORS.values()), dtype=np.float64)
_PALETTE_NAMES = list(COLORS)
_FIRST_SHAPE_CLASS = CLASSES.index(SHAPES[0])
JUDGE_FORMAT = "fourm-judge-unet-relu/2"  # in the file's metadata; another value is not loadable


@dataclass
class JudgeConfig:
    width: int = 16
    steps: int = 2000
    batch_size: int = 16
    lr: float = 3e-3
    max_minutes: float = 3.5  # the cosine anneals over this when it runs out before ``steps``
    min_pixels: int = 8  # smaller regions are noise, not objects
    seed: int = 0
    # the share of training images replaced by the rgb tokenizer's round trips of them, when
    # ``train_segmenter`` is given the round trip
    round_trip_share: float = 0.25

    def __post_init__(self) -> None:
        for name in ("width", "steps", "batch_size", "min_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"judge {name} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and self.max_minutes > 0):
            raise ValueError(f"judge lr and max_minutes must be > 0, got {self.lr} and {self.max_minutes}")
        if not 0.0 <= self.round_trip_share <= 1.0:
            raise ValueError(f"judge round_trip_share must be in [0, 1], got {self.round_trip_share}")


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True), nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Segmenter(nn.Module):
    """A small U-Net, rgb (B, 3, H, W) in [0, 1] -> class logits (B, len(CLASSES), H, W); H and W
    multiples of 4. Two downsamplings give it the receptive field to tell a cube from a cylinder."""

    def __init__(self, width: int = 16):
        super().__init__()
        w = width
        self.down1, self.down2, self.mid = _conv(3, w), _conv(w, 2 * w), _conv(2 * w, 4 * w)
        self.up2, self.up1 = _conv(6 * w, 2 * w), _conv(3 * w, w)
        self.head = nn.Conv2d(w, len(CLASSES), 1)

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        a = self.down1(rgb)
        b = self.down2(F.avg_pool2d(a, 2))
        c = self.mid(F.avg_pool2d(b, 2))
        b = self.up2(torch.cat([b, F.interpolate(c, scale_factor=2.0)], 1))
        return self.head(self.up1(torch.cat([a, F.interpolate(b, scale_factor=2.0)], 1)))

    @torch.no_grad()
    def segment(self, rgb_uint8: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 -> (B, H, W) class ids."""
        return self(rgb_uint8.float() / 255.0).argmax(1)


def round_trip(tokenizers, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """The rgb tokenizer's encode -> decode of ``images`` (N, 3, R, R) uint8, as uint8."""
    with torch.no_grad():
        parts = [torch.stack(tokenizers.decode("rgb", tokenizers.encode("rgb", images[i : i + batch_size]))) for i in range(0, len(images), batch_size)]
    return torch.cat(parts).round().clamp(0, 255).to(torch.uint8)


def train_segmenter(train_dir: str | Path, config: JudgeConfig, progress: bool = True, round_trip=None) -> Segmenter:
    """Fit the judge's segmenter to ground truth (rgb, semseg) of ``train_dir``. ``round_trip``:
    (B, 3, H, W) uint8 -> the rgb tokenizer's encode -> decode of them, uint8; a
    ``round_trip_share`` of each batch's images (chosen at random) is replaced by it."""
    from tqdm import tqdm

    from fourm.data.loader import LoaderConfig, build_loader

    torch.manual_seed(config.seed)
    model = Segmenter(config.width).to(memory_format=torch.channels_last)  # ~17% faster convolutions on CPU
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)
    rng = torch.Generator().manual_seed(config.seed)
    share = config.round_trip_share if round_trip is not None else 0.0

    def with_round_trips(batch):
        swap = torch.rand(len(batch["rgb"]), generator=rng) < share
        if bool(swap.any()):
            rgb = batch["rgb"].clone()
            rgb[swap] = round_trip(rgb[swap])
            batch = {**batch, "rgb": rgb}
        return batch

    loader, _ = build_loader(train_dir, LoaderConfig(modalities=("rgb", "semseg"), batch_size=config.batch_size, shuffle=500, num_workers=1, seed=config.seed, repeat=True))
    batches = iter(loader)
    first = next(batches, None)
    if first is None:
        raise ValueError(f"{train_dir}: no (rgb, semseg) samples to train the judge's segmenter on")
    first = with_round_trips(first)

    def loss_of(batch):
        logits = model((batch["rgb"].float() / 255.0).contiguous(memory_format=torch.channels_last))
        # objects cover a few percent of the pixels: weight the classes by 1/sqrt(frequency)
        target = batch["semseg"].long()
        freq = torch.bincount(target.flatten(), minlength=len(CLASSES)).float() + 1.0
        return F.cross_entropy(logits.float(), target, weight=freq.rsqrt() / freq.rsqrt().mean())

    # precision by timing this segmenter's own step both ways (one batch: its shapes never vary)
    dtype = choose_autocast("cpu", not torch.cuda.is_available(), f"judge segmenter training step: width {config.width}, batch {config.batch_size}", training_step(model, lambda i: loss_of(first))).dtype
    start, step = time.perf_counter(), 0
    bar = tqdm(total=config.steps, desc="judge segmenter", disable=not progress)
    for batch in itertools.chain([first], (with_round_trips(b) for b in batches)):
        elapsed = time.perf_counter() - start
        if step >= config.steps or elapsed > 60 * config.max_minutes:
            break
        # the cosine follows whichever budget runs out first, so a time-capped run still anneals
        lr = warmup_cosine(step, max(step / config.steps, elapsed / (60 * config.max_minutes)), config.lr, 0, 0.0)
        for group in opt.param_groups:
            group["lr"] = lr
        with autocast_for("cpu", dtype):
            loss = loss_of(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    log.info("judge segmenter: %d steps in %.0f s, last loss %.3f (%s)", step, time.perf_counter() - start, loss.item(), f"{share:.0%} of its images the rgb tokenizer's round trips" if share else "true images only")
    return model.eval()


def save_segmenter(model: Segmenter, path: str | Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata={"format": JUDGE_FORMAT, "width": str(model.head.in_channels)})


def load_segmenter(path: str | Path) -> Segmenter:
    """A saved judge segmenter; ValueError when the file is of another format or its tensors do
    not fit its width (retrain it)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from fourm.weights import load_fitting

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != JUDGE_FORMAT:
        raise ValueError(f"{path}: a judge segmenter of another format ({meta.get('format', 'unknown')}, expected {JUDGE_FORMAT})")
    model = Segmenter(int(meta["width"]))
    load_fitting(model, load_file(str(path)), f"{path}: a judge segmenter whose tensors do not fit its width {meta['width']}")
    return model.eval()


def round_trip_of(tokenizers):
    """``train_segmenter``'s ``round_trip`` from a tokenizer set (None without one or its rgb)."""
    if tokenizers is None or "rgb" not in tokenizers.modalities:
        return None
    return lambda images: round_trip(tokenizers, images)


def load_or_train_segmenter(path: str | Path, train_dir: str | Path | None, config: JudgeConfig, tokenizers=None) -> Segmenter | None:
    """The judge at ``path`` if it is there and loadable, else one trained on ``train_dir`` (with
    ``tokenizers``' rgb round trips among its images, see ``train_segmenter``) and saved to
    ``path``; None when neither is possible."""
    path = Path(path)
    if path.is_file():
        try:
            return load_segmenter(path)
        except ValueError as exn:
            log.warning("%s; training a new one", exn)
    if train_dir is None:
        return None
    model = train_segmenter(train_dir, config, round_trip=round_trip_of(tokenizers))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_segmenter(model, path)
    return model


def _nearest_palette(colors: np.ndarray) -> np.ndarray:
    """(..., 3) RGB -> (...) index of the palette colour nearest by direction (shading, which
    scales brightness, does not change it)."""
    c = colors.astype(np.float64)
    c = c / (np.linalg.norm(c, axis=-1, keepdims=True) + 1e-9)
    return np.argmax(c @ (_PALETTE / np.linalg.norm(_PALETTE, axis=1, keepdims=True)).T, -1)


def color_name(pixels: np.ndarray) -> str:
    """The palette colour nearest the pixels' (N, 3) median."""
    return _PALETTE_NAMES[int(_nearest_palette(np.median(pixels.astype(np.float64), axis=0)))]


def _parts(region: np.ndarray, labels: np.ndarray, min_pixels: int, share: float, small_share: float | None = None) -> list[np.ndarray]:
    """The connected parts of ``region`` (H, W) bool within which ``labels`` (H, W) is constant,
    keeping those of at least ``min_pixels`` and ``share`` of the region that are more than a thin
    rim: at least ``min_pixels`` survive a morphological opening. A decoded image's object edges
    blend into the ground, and the blend reads as another colour along the outline. With
    ``small_share``, parts of ``small_share`` to ``share`` of the region are kept too when at least
    a third of their outline borders the ground: a small object in front of a large one does, a
    highlight inside one does not."""
    from scipy import ndimage

    keep, size = [], int(region.sum())
    floor = share if small_share is None else min(share, small_share)
    for value in np.unique(labels[region]):
        sub, n = ndimage.label(region & (labels == value))
        for i in range(1, n + 1):
            part = sub == i
            pixels = int(part.sum())
            # cheapest test first: most parts of a decoded image are specks under the floor
            if pixels < max(min_pixels, floor * size) or ndimage.binary_opening(part).sum() < min_pixels:
                continue
            if pixels >= share * size or _exposed(part, region) >= 1 / 3:
                keep.append(part)
    return keep


def _exposed(part: np.ndarray, region: np.ndarray) -> float:
    """The share of ``part``'s outline (the pixels just outside it) that lies outside ``region``."""
    from scipy import ndimage

    ring = ndimage.binary_dilation(part) & ~part
    return float((ring & ~region).sum() / max(int(ring.sum()), 1))


def find_objects(rgb: np.ndarray, seg: np.ndarray, min_pixels: int = 8, color_share: float = 0.1, small_share: float = 0.03, shape_share: float = 0.3) -> list[dict]:
    """Objects in a segmentation: rgb (H, W, 3) uint8, seg (H, W) class ids ->
    [{"shape", "color", "cx", "bottom", "pixels"}].

    Instances: each connected foreground region (any shape class) is split by pixel colour into
    parts of at least ``color_share`` of it (touching objects of different colours), or of at least
    ``small_share`` when a third of the part's outline borders the ground (a small object in front
    of a large one can be 4% of their region; a highlight inside one borders no ground), then by
    shape class only where each shape holds at least ``shape_share`` of the part (touching
    objects of one colour); otherwise its shape is the majority of its pixels' classes, so a few
    mislabelled pixels neither invent an object nor split one. Parts under ``min_pixels`` are
    noise.
    """
    from scipy import ndimage

    found = []
    colors = _nearest_palette(rgb)
    foreground, n = ndimage.label(seg >= _FIRST_SHAPE_CLASS)
    for i in range(1, n + 1):
        region = foreground == i
        if region.sum() < min_pixels:
            continue
        for part in _parts(region, colors, min_pixels, color_share, small_share) or [region]:
            shapes = _parts(part, seg, min_pixels, shape_share)
            for obj in shapes if len(shapes) > 1 else [part]:
                ys, xs = np.nonzero(obj)
                votes = np.bincount(seg[ys, xs] - _FIRST_SHAPE_CLASS, minlength=len(SHAPES))
                found.append({"shape": SHAPES[int(np.argmax(votes))], "color": color_name(rgb[ys, xs]), "cx": float(xs.mean()), "bottom": float(ys.max()), "pixels": int(len(ys))})
    return found


def relation_margin(rel: str, a: dict, b: dict) -> float:
    """Pixels by which found object ``a`` is ``rel`` (left, right, front, behind) of ``b``; the
    relation holds when it is > 0. Left/right by the regions' centres, front/behind by their
    lowest rows (nearer objects reach lower in the image)."""
    if rel == "left":
        return b["cx"] - a["cx"]
    if rel == "right":
        return a["cx"] - b["cx"]
    if rel == "front":
        return a["bottom"] - b["bottom"]
    return b["bottom"] - a["bottom"]  # behind


def relation_holds(rel: str, a: dict, b: dict) -> bool:
    return relation_margin(rel, a, b) > 0


def judge(caption: str, found: list[dict]) -> dict[str, bool]:
    """Score one generated image's ``found`` objects against its prompt ``caption``."""
    parsed = parse_caption(caption)
    named = Counter((o.color, o.shape) for o in parsed.objects)
    seen = Counter((o["color"], o["shape"]) for o in found)
    objects_ok = all(seen[k] >= v for k, v in named.items())
    count_ok = len(found) == len(parsed.objects)
    relations_ok = True
    for a, rel, b in parsed.relations:
        oa, ob = parsed.objects[a], parsed.objects[b]
        ca = [f for f in found if (f["color"], f["shape"]) == (oa.color, oa.shape)]
        cb = [f for f in found if (f["color"], f["shape"]) == (ob.color, ob.shape)]
        # the relation holds for some choice of the two objects (names can repeat)
        if not any(relation_holds(rel, x, y) for x in ca for y in cb if x is not y):
            relations_ok = False
    return {"objects": objects_ok, "count": count_ok, "relations": relations_ok, "correct": objects_ok and count_ok and relations_ok}


def judge_images(segmenter: Segmenter, images: torch.Tensor, captions: list[str], min_pixels: int = 8) -> list[dict[str, bool]]:
    """images (B, 3, H, W) uint8 and their prompts -> one verdict per image."""
    seg = segmenter.segment(images).numpy()
    hwc = images.permute(0, 2, 3, 1).numpy()
    return [judge(c, find_objects(hwc[i], seg[i], min_pixels)) for i, c in enumerate(captions)]


def summarize(verdicts: list[dict[str, bool]]) -> dict[str, float]:
    """Share of images passing each check; ``accuracy`` is the GenEval-style all-checks score."""
    n = max(len(verdicts), 1)
    return {"accuracy": sum(v["correct"] for v in verdicts) / n, "objects": sum(v["objects"] for v in verdicts) / n, "count": sum(v["count"] for v in verdicts) / n, "relations": sum(v["relations"] for v in verdicts) / n, "images": len(verdicts)}
