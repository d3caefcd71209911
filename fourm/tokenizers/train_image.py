"""Training loop for an image-like tokenizer (single process, bf16 autocast on CPU and CUDA).

Stops at ``max_steps`` or after ``max_minutes``, whichever comes first; validates every
``val_every`` steps on held-out shards and keeps the weights with the best validation score.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from fourm.data.loader import LoaderConfig, build_loader
from fourm.precision import autocast_for, choose_autocast, training_step
from fourm.schedule import warmup_cosine
from fourm.tokenizers.image import ImageTokenizer, ImageTokenizerConfig, class_balanced_weights
from fourm.tokenizers.reconstruction import ReconstructionMeter

log = logging.getLogger(__name__)


@dataclass
class ImageTrainConfig:
    """Optimisation of an image tokenizer."""

    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    max_steps: int = 4000
    max_minutes: float = 10.0
    val_every: int = 250
    val_samples: int = 256
    grad_clip: float = 1.0
    bf16: bool = True
    seed: int = 0
    num_workers: int = 1
    # weigh each pixel's loss by a class map the shards hold ("semseg"; "" for none; a sample
    # without one weighs its pixels alike): ``class_balanced_weights`` with this power (1: every
    # class an image shows an equal share)
    balance_by: str = ""
    balance_power: float = 1.0
    # a share of the run (steps or minutes, whichever limit stops it) that also ends the warm-up
    # if it comes before warmup_steps; None: warmup_steps alone. Off: at the demo's budgets on a
    # 2-core AVX2 EPYC, 0.05 gave held-out delta1 0.925 against 0.940 (depth, 1.5 minutes) and
    # mIoU 0.804 against 0.879 (semseg, 2 minutes): the full learning rate early costs more
    # than the steps it adds (docs/tokenizers.md)
    warmup_share: float | None = None
    # > 0: train on random crops of this side (a multiple of the tokenizer's downsampling), each
    # sample its own, at offsets on the token grid: the networks are convolutional, so a step
    # costs (crop / resolution) ** 2 of a full one; 0: whole images
    crop: int = 0

    def __post_init__(self) -> None:
        if self.balance_power < 0:
            raise ValueError(f"balance_power must be >= 0, got {self.balance_power}")
        if self.warmup_share is not None and not 0 < self.warmup_share <= 1 or self.crop < 0:
            raise ValueError(f"warmup_share must be in (0, 1] and crop >= 0, got {self.warmup_share} and {self.crop}")


@dataclass
class ImageTokenizerTrainingConfig:
    """What ``tokenizers/train.py`` reads for an image-like tokenizer."""

    tokenizer: ImageTokenizerConfig = field(default_factory=ImageTokenizerConfig)
    train: ImageTrainConfig = field(default_factory=ImageTrainConfig)


def lr_at(step: int, progress: float, cfg: ImageTrainConfig) -> float:
    """Linear warm-up, then cosine decay to 5% over ``progress`` in [0, 1].

    Progress is the larger of the step fraction and the time-budget fraction, so the decay ends
    on time whichever limit stops the run.
    """
    return warmup_cosine(step, progress, cfg.lr, cfg.warmup_steps, 0.05, cfg.warmup_share)


def random_crops(tensors: list[torch.Tensor | None], size: int, grid: int, generator: torch.Generator) -> list[torch.Tensor | None]:
    """The same random ``size`` x ``size`` crop of each sample's last two dimensions in every
    tensor of ``tensors`` (each (B, ..., H, W), or None, passed through), a crop per sample, its
    offsets multiples of ``grid`` (the tokenizer's downsampling, so crops sit on the token
    grid). ``size`` >= H returns the tensors as they are."""
    first = next(t for t in tensors if t is not None)
    h, w = first.shape[-2:]
    if size >= min(h, w):
        return tensors
    if size % grid:
        raise ValueError(f"crop {size} must be a multiple of the tokenizer's downsampling {grid}")
    b = first.shape[0]
    ys = torch.randint(0, (h - size) // grid + 1, (b,), generator=generator) * grid
    xs = torch.randint(0, (w - size) // grid + 1, (b,), generator=generator) * grid
    return [None if t is None else torch.stack([t[i, ..., int(y) : int(y) + size, int(x) : int(x) + size] for i, (y, x) in enumerate(zip(ys, xs))]) for t in tensors]


@torch.no_grad()
def evaluate_image_tokenizer(model: ImageTokenizer, val_data, max_samples: int = 10**9, batch_size: int = 64) -> dict:
    """Reconstruction quality on raw shards (``ReconstructionMeter``); ``score`` is the one number
    to maximise (PSNR, δ1 or mIoU)."""
    modality = model.config.modality
    was_training = model.training
    model.eval()
    loader, _ = build_loader(val_data, LoaderConfig(modalities=(modality,), batch_size=batch_size, shuffle=0, num_workers=0))
    meter = ReconstructionMeter(modality, model.codebook_size, model.config.num_classes)
    for batch in loader:
        raw = batch[modality][: max_samples - meter.samples]
        ids, scale = model.encode(raw)
        meter.update(raw, model.decode(ids, scale), ids)
        if meter.samples >= max_samples:
            break
    out = {"samples": meter.samples, **meter.summary()}
    model.train(was_training)
    return out


def train_image_tokenizer(config: ImageTokenizerTrainingConfig, data, val_data=None, progress: bool = True) -> tuple[ImageTokenizer, dict]:
    """Train from raw shards ``data``; returns the model (best validation weights) and a history."""
    tcfg = config.train
    torch.manual_seed(tcfg.seed)
    model = ImageTokenizer(config.tokenizer)
    model.train()
    modality = config.tokenizer.modality
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, betas=(0.9, 0.99), weight_decay=tcfg.weight_decay)
    balance = tcfg.balance_by
    if balance == modality:
        raise ValueError(f"balance_by names the tokenizer's own modality {modality!r}: name a class map the shards hold beside it (e.g. semseg)")
    loader, skipped = build_loader(
        data, LoaderConfig(modalities=(modality,), optional=(balance,) if balance else (), batch_size=tcfg.batch_size, shuffle=2000, num_workers=tcfg.num_workers, seed=tcfg.seed, repeat=True, drop_last=True)
    )
    history: dict = {"loss": [], "val": []}
    best_score, best_state = -math.inf, None
    start = time.perf_counter()
    deadline = start + tcfg.max_minutes * 60
    bar = tqdm(total=tcfg.max_steps, desc=f"train {modality} tokenizer", unit="step", disable=not progress)
    step = 0
    ema_loss = None

    def weights(batch: dict) -> torch.Tensor | None:
        """(B, H, W) weights; a sample without the class map weighs its pixels alike."""
        maps = batch.get(balance) if balance else None
        if maps is None or isinstance(maps, torch.Tensor):  # none asked for, or every sample has one
            return None if maps is None else class_balanced_weights(maps, tcfg.balance_power)
        present = [m for m in maps if m is not None]
        if not present:
            return None
        return torch.stack([torch.ones(present[0].shape) if m is None else class_balanced_weights(m[None], tcfg.balance_power)[0] for m in maps])

    crop_rng = torch.Generator().manual_seed(tcfg.seed)
    if tcfg.crop and (tcfg.crop % config.tokenizer.downsample or tcfg.crop > config.tokenizer.resolution):
        raise ValueError(f"train.crop {tcfg.crop} must be a multiple of the tokenizer's downsampling {config.tokenizer.downsample} up to its resolution {config.tokenizer.resolution}")

    def inputs(batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The batch's images and pixel weights, cropped when ``crop`` asks."""
        raw, w = batch[modality], weights(batch)
        if tcfg.crop:
            raw, w = random_crops([raw, w], tcfg.crop, config.tokenizer.downsample, crop_rng)
        return raw, w

    batches = iter(loader)
    first = next(batches, None)
    if first is not None:  # precision by timing this tokenizer's own step both ways (one batch: its shapes never vary)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        dtype = choose_autocast("cpu", tcfg.bf16, f"{modality} tokenizer training step: {params:.2f} M parameters, batch {tcfg.batch_size}", training_step(model, lambda i: model(*inputs(first)).loss)).dtype
        batches = itertools.chain([first], batches)
    for batch in batches:
        progress = max(step / tcfg.max_steps, (time.perf_counter() - start) / (tcfg.max_minutes * 60))
        for group in opt.param_groups:
            group["lr"] = lr_at(step, progress, tcfg)
        with autocast_for("cpu", dtype):
            out = model(*inputs(batch))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        opt.step()
        step += 1
        loss = float(out.loss.detach())  # logged every step: cheap next to a conv autoencoder step
        history["loss"].append(loss)
        ema_loss = loss if ema_loss is None else 0.95 * ema_loss + 0.05 * loss
        bar.update()
        bar.set_postfix(loss=f"{ema_loss:.4f}")
        done = step >= tcfg.max_steps or time.perf_counter() > deadline
        if val_data is not None and (step % tcfg.val_every == 0 or done):
            metrics = evaluate_image_tokenizer(model, val_data, tcfg.val_samples)
            metrics["step"] = step
            metrics["minutes"] = round((time.perf_counter() - start) / 60, 2)
            history["val"].append(metrics)
            log.info("step %d: %s", step, {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})
            if metrics["score"] > best_score:
                best_score = metrics["score"]
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if done:
            break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    history.update(steps=step, minutes=round((time.perf_counter() - start) / 60, 2), skipped=skipped.as_dict(), best_score=best_score)
    model.eval()
    return model, history
