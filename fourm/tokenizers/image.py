"""Image-like modality tokenizers (rgb, depth, semseg): a convolutional autoencoder with a
discrete bottleneck (FSQ or VQ). Downsampling ``stem_patch * 2 ** len(channels)`` (default 8:
64x64 -> 8x8 = 64 tokens).

Per-modality input/output handling:
    rgb     uint8 (B, 3, H, W) -> [-1, 1]; decoder regresses [-1, 1]; loss MSE + 0.1 L1.
    depth   metres (B, 1, H, W) -> log depth mapped from [depth_min, depth_max] to [-1, 1]
            (``depth_norm: log``, metric: decode returns metres), or per-image affine
            normalisation of log depth (``affine``: decode returns metres when given the scale,
            else relative depth); loss L1.
    semseg  class ids (B, H, W) -> one-hot (B, K, H, W); decoder gives K logits; cross-entropy.
    normals uint8 (B, 3, H, W) as in ``normals.png`` (or float unit vectors) -> [-1, 1]; loss MSE
            + (1 - cosine similarity); decode gives float32 unit vectors (B, 3, H, W).
Training may weigh each pixel's loss (``class_balanced_weights``: small objects as much as the
ground they stand on).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from fourm.precision import autocast
from fourm.tokenizers.quantizers import FSQ, Quantized, VectorQuantizer

IMAGE_TOKENIZER_MODALITIES = ("rgb", "depth", "semseg", "normals")


@dataclass
class ImageTokenizerConfig:
    """An image-like tokenizer. ``codebook_size`` is derived for FSQ (product of levels)."""

    modality: str = "rgb"
    resolution: int = 64
    num_classes: int = 5  # semseg only
    channels: list[int] = field(default_factory=lambda: [64, 128, 256])
    res_blocks: int = 1
    stem_patch: int = 1  # >1: a patchifying stem (and pixel-shuffle head) of this stride
    quantizer: str = "fsq"  # fsq | vq
    fsq_levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])
    vq_codebook_size: int = 1024
    vq_dim: int = 32
    vq_beta: float = 0.25
    vq_decay: float = 0.99
    depth_norm: str = "log"  # log | affine
    depth_min: float = 0.5
    depth_max: float = 50.0

    def __post_init__(self) -> None:
        if self.modality not in IMAGE_TOKENIZER_MODALITIES and not self.modality:
            raise ValueError("modality must be named")
        if self.quantizer not in ("fsq", "vq"):
            raise ValueError(f"quantizer must be 'fsq' or 'vq', got {self.quantizer!r}")
        if self.depth_norm not in ("log", "affine"):
            raise ValueError(f"depth_norm must be 'log' or 'affine', got {self.depth_norm!r}")
        if self.stem_patch < 1:
            raise ValueError(f"stem_patch must be >= 1, got {self.stem_patch}")
        if not self.channels or self.resolution % self.downsample:
            raise ValueError(f"resolution {self.resolution} must be divisible by the downsampling {self.downsample}")
        if not 0 < self.depth_min < self.depth_max:
            raise ValueError("need 0 < depth_min < depth_max")

    @property
    def downsample(self) -> int:
        return self.stem_patch * 2 ** len(self.channels)

    @property
    def grid(self) -> int:
        """Tokens per side."""
        return self.resolution // self.downsample

    @property
    def codebook_size(self) -> int:
        return math.prod(self.fsq_levels) if self.quantizer == "fsq" else self.vq_codebook_size

    @property
    def in_channels(self) -> int:
        return {"rgb": 3, "depth": 1, "semseg": self.num_classes, "normals": 3}.get(self.modality, 3)

    @property
    def out_channels(self) -> int:
        return self.in_channels


def _groups(c: int) -> int:
    return math.gcd(32, c)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Encoder(nn.Module):
    """(B, C_in, H, W) -> (B, D, H/f, W/f) with f = stem_patch * 2 ** len(channels)."""

    def __init__(self, c_in: int, channels: list[int], res_blocks: int, c_latent: int, stem_patch: int = 1):
        super().__init__()
        stem = nn.Conv2d(c_in, channels[0], stem_patch, stride=stem_patch) if stem_patch > 1 else nn.Conv2d(c_in, channels[0], 3, padding=1)
        layers: list[nn.Module] = [stem]
        c = channels[0]
        for c_next in channels:
            for _ in range(res_blocks):
                layers.append(ResBlock(c, c_next))
                c = c_next
            layers.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        layers += [ResBlock(c, c), nn.GroupNorm(_groups(c), c), nn.SiLU(), nn.Conv2d(c, c_latent, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """(B, D, h, w) -> (B, C_out, h*f, w*f)."""

    def __init__(self, c_latent: int, channels: list[int], res_blocks: int, c_out: int, stem_patch: int = 1):
        super().__init__()
        c = channels[-1]
        layers: list[nn.Module] = [nn.Conv2d(c_latent, c, 3, padding=1), ResBlock(c, c)]
        for c_next in reversed(channels):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c_next, 3, padding=1)]
            c = c_next
            for _ in range(res_blocks):
                layers.append(ResBlock(c, c))
        layers += [nn.GroupNorm(_groups(c), c), nn.SiLU(), nn.Conv2d(c, c_out * stem_patch**2, 3, padding=1)]
        if stem_patch > 1:
            layers.append(nn.PixelShuffle(stem_patch))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


@dataclass
class TokenizerOutput:
    """A forward pass: decoder output (model space), code indices (B, h, w) and losses."""

    recon: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor
    recon_loss: torch.Tensor
    quant_loss: torch.Tensor


class ImageTokenizer(nn.Module):
    """Autoencoder tokenizer for one image-like modality; ids here are *local* (0..codebook_size-1)."""

    def __init__(self, config: ImageTokenizerConfig):
        super().__init__()
        self.config = config
        if config.quantizer == "fsq":
            self.quantizer: FSQ | VectorQuantizer = FSQ(config.fsq_levels)
        else:
            self.quantizer = VectorQuantizer(config.vq_codebook_size, config.vq_dim, beta=config.vq_beta, decay=config.vq_decay)
        latent = self.quantizer.dim
        self.encoder = Encoder(config.in_channels, config.channels, config.res_blocks, latent, config.stem_patch)
        self.decoder = Decoder(latent, config.channels, config.res_blocks, config.out_channels, config.stem_patch)

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    # -- modality-specific input and output ------------------------------------------------------
    def preprocess(self, raw: torch.Tensor, crops: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Raw batch -> (model input (B, C_in, H, W) float, per-image depth scale (B, 2) or None).

        rgb: uint8 (B, 3, H, W); depth: metres (B, 1, H, W) or (B, H, W); semseg: ids (B, H, W);
        normals: uint8 (B, 3, H, W) or float unit vectors (B, 3, H, W). ``crops``: H and W may
        be any multiples of the downsampling up to the resolution (the training pass on crops).
        """
        cfg = self.config
        size = raw.shape[-2:]
        if crops:
            if size[0] % cfg.downsample or size[1] % cfg.downsample or max(size) > cfg.resolution:
                raise ValueError(f"{cfg.modality} tokenizer trains on crops of sides that are multiples of {cfg.downsample} up to {cfg.resolution}, got {size[1]}x{size[0]}")
        elif tuple(size) != (cfg.resolution, cfg.resolution):
            raise ValueError(f"{cfg.modality} tokenizer expects {cfg.resolution}x{cfg.resolution} images, got {size[1]}x{size[0]}")
        if cfg.modality == "semseg":
            ids = raw.long()
            if ids.dim() == 4:
                ids = ids[:, 0]
            if int(ids.min()) < 0 or int(ids.max()) >= cfg.num_classes:
                raise ValueError(f"semseg class ids must be in [0, {cfg.num_classes}), got [{int(ids.min())}, {int(ids.max())}]")
            return F.one_hot(ids, cfg.num_classes).permute(0, 3, 1, 2).float(), None
        if cfg.modality == "depth":
            d = raw.float()
            if d.dim() == 3:
                d = d[:, None]
            logd = torch.log(d.clamp(cfg.depth_min, cfg.depth_max))
            if cfg.depth_norm == "log":
                lo, hi = math.log(cfg.depth_min), math.log(cfg.depth_max)
                return (logd - lo) / (hi - lo) * 2 - 1, None
            lo = logd.amin(dim=(1, 2, 3))
            hi = logd.amax(dim=(1, 2, 3)).clamp_min(lo + 1e-3)
            scale = torch.stack([lo, hi], 1)
            return (logd - lo[:, None, None, None]) / (hi - lo)[:, None, None, None] * 2 - 1, scale
        if cfg.modality == "normals" and raw.dtype != torch.uint8:
            return raw.float(), None
        return raw.float() / 127.5 - 1.0, None

    def postprocess(self, out: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder output -> raw: rgb uint8 (B, 3, H, W); depth metres (B, 1, H, W) (relative in
        [0, 1] for ``affine`` without a scale); semseg ids (B, H, W); normals float32 unit
        vectors (B, 3, H, W)."""
        cfg = self.config
        out = out.float()
        if cfg.modality == "semseg":
            return out.argmax(1)
        if cfg.modality == "normals":
            return F.normalize(out, dim=1, eps=1e-8)
        if cfg.modality == "depth":
            x = (out.clamp(-1, 1) + 1) / 2
            if cfg.depth_norm == "log":
                lo, hi = math.log(cfg.depth_min), math.log(cfg.depth_max)
                return torch.exp(lo + x * (hi - lo))
            if scale is None:
                return x
            lo, hi = scale[:, 0, None, None, None], scale[:, 1, None, None, None]
            return torch.exp(lo + x * (hi - lo))
        return ((out.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)

    def reconstruction_loss(self, out: torch.Tensor, target_raw: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The modality's loss (module docstring); ``weight`` (B, H, W), mean 1 per image, weighs
        each pixel's share of it (``class_balanced_weights``; None: every pixel alike)."""
        cfg = self.config
        out = out.float()
        if cfg.modality == "semseg":
            ids = target_raw.long()
            per_pixel = F.cross_entropy(out, ids[:, 0] if ids.dim() == 4 else ids, reduction="none")  # (B, H, W)
        elif cfg.modality == "depth":
            per_pixel = (out - x).abs().mean(1)
        elif cfg.modality == "normals":
            per_pixel = (out - x).pow(2).mean(1) + 1.0 - F.cosine_similarity(out, x, dim=1, eps=1e-6)
        else:
            per_pixel = (out - x).pow(2).mean(1) + 0.1 * (out - x).abs().mean(1)
        return per_pixel.mean() if weight is None else (per_pixel * weight).mean()

    # -- the tokenizer ---------------------------------------------------------------------------
    def quantize(self, x: torch.Tensor) -> Quantized:
        return self.quantizer(self.encoder(x))

    def forward(self, raw: torch.Tensor, weight: torch.Tensor | None = None) -> TokenizerOutput:
        """Training pass on a raw batch, full images or crops of them (sides multiples of the
        downsampling: the networks are convolutional); ``weight`` (B, H, W): see
        ``reconstruction_loss``."""
        x, _ = self.preprocess(raw, crops=True)
        q = self.quantize(x)
        recon = self.decoder(q.z_q.to(x.dtype) if not torch.is_autocast_enabled("cpu") else q.z_q)
        rec = self.reconstruction_loss(recon, raw, x, weight)
        return TokenizerOutput(recon=recon, indices=q.indices, loss=rec + q.loss, recon_loss=rec, quant_loss=q.loss)

    @torch.no_grad()
    def encode(self, raw: torch.Tensor, bf16: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Raw batch -> (local ids (B, h*w) row-major, depth scale (B, 2) for ``affine`` else None).

        ``bf16``: the conv encoder under bfloat16 autocast, as it was trained (about 3x faster on
        this CPU); the quantizer always runs in float32."""
        x, scale = self.preprocess(raw)
        with autocast(x.device.type, bf16):
            z = self.encoder(x)
        return self.quantizer(z.float()).indices.flatten(1), scale

    @torch.no_grad()
    def decode(self, ids: torch.Tensor, scale: torch.Tensor | None = None, bf16: bool = True) -> torch.Tensor:
        """Local ids (B, h*w) -> raw batch (see ``postprocess``); ``bf16`` as in ``encode``."""
        g = self.config.grid
        if ids.dim() != 2 or ids.shape[1] != g * g:
            raise ValueError(f"{self.config.modality} ids must have shape (B, {g * g}), got {tuple(ids.shape)}")
        if int(ids.min()) < 0 or int(ids.max()) >= self.codebook_size:
            raise ValueError(f"{self.config.modality} local ids must be in [0, {self.codebook_size})")
        z = self.quantizer.lookup(ids.view(-1, g, g))
        with autocast(z.device.type, bf16):
            out = self.decoder(z)
        return self.postprocess(out.float(), scale)


def class_balanced_weights(labels: torch.Tensor, power: float = 1.0) -> torch.Tensor:
    """Per-pixel loss weights that share an image's loss among the classes it shows: labels (B, H,
    W) class ids -> (B, H, W) float32 weights proportional to (pixels of the pixel's class in its
    image) ** -power, scaled to mean 1 per image. power 0: all ones; 1: every class present holds
    an equal share (a 30-pixel object as much as the 3,000-pixel ground)."""
    b, h, w = labels.shape
    flat = labels.reshape(b, -1).long()
    counts = torch.zeros(b, int(flat.max()) + 1 if flat.numel() else 1).scatter_add_(1, flat, torch.ones(flat.shape))
    weight = counts.gather(1, flat).pow(-float(power))  # (B, H * W)
    return (weight / weight.mean(1, keepdim=True)).view(b, h, w)
