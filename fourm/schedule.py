"""The learning-rate schedule every training loop shares (the model's, the tokenizers', the judge's)."""

from __future__ import annotations

import math


def warmup_cosine(step: int, progress: float, lr: float, warmup_steps: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine from ``lr`` to ``lr * min_ratio`` as
    ``progress`` goes from 0 to 1 (clamped)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, progress)))))
