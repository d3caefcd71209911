"""The learning-rate schedule every training loop shares (the model's, the tokenizers', the judge's)."""

from __future__ import annotations

import math


def warmup_cosine(step: int, progress: float, lr: float, warmup_steps: int, min_ratio: float, warmup_share: float | None = None) -> float:
    """Linear warm-up over ``warmup_steps`` (or, given ``warmup_share``, that share of
    ``progress`` if it ends first: a time-capped run on a slow machine may make few more steps
    than the warm-up's), then cosine from ``lr`` to ``lr * min_ratio`` as ``progress`` goes from
    0 to 1 (clamped)."""
    if step < warmup_steps and (warmup_share is None or progress < warmup_share):
        return lr * max((step + 1) / warmup_steps, progress / warmup_share if warmup_share else 0.0)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, progress)))))
