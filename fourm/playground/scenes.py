"""Held-out embedded scenes for the playground, rendered on demand.

Scene ``i`` of seed ``s`` is the same one ``make demo`` renders into ``data/val`` (the demo's
held-out seed is 1), so the page can show ground truth beside every prediction.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from fourm.data.codecs import decode_member
from fourm.data.synth.generate import render_sample

HELDOUT_SEED = 1  # DemoDataConfig.val_seed


class SceneStore:
    """``num`` held-out scenes at ``res`` pixels; each rendered once (~50 ms at 64 px) and cached."""

    def __init__(self, num: int = 500, seed: int = HELDOUT_SEED, res: int = 64, cache: int = 256):
        self.num, self.seed, self.res = num, seed, res
        self.get = lru_cache(maxsize=cache)(self._render)

    def _render(self, index: int) -> dict:
        """Scene ``index`` -> {"rgb": (3, R, R) uint8, "depth": (1, R, R) metres, "semseg": (R, R)
        int64, "boxes": [{"bbox", "label"}], "caption": str, "scene": dict, "rgb_png": bytes}."""
        if not 0 <= index < self.num:
            raise IndexError(f"scene {index} is out of range 0..{self.num - 1}")
        members = render_sample(self.seed, index, self.res)
        out = {name: decode_member(name, members[f"{name}.{ext}"]) for name, ext in (("rgb", "png"), ("depth", "npy"), ("semseg", "png"), ("boxes", "json"), ("caption", "txt"), ("scene", "json"))}
        out["rgb_png"] = members["rgb.png"]
        return out

    def rgb(self, index: int) -> torch.Tensor:
        """(1, 3, R, R) uint8 of scene ``index``."""
        return self.get(index)["rgb"][None]
