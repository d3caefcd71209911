"""Mixing objectives per sample.

encoder-decoder: ``4m`` (multimodal masking), ``prefix_lm`` (whole modalities as condition, the rest
as targets) and ``next_token`` (no condition: every modality a target);
decoder-only: ``next_token`` and ``prefix_lm``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fourm.objectives.builders import DecoderExample, EncDecExample, decoder_example, encdec_example, prefix_plans
from fourm.objectives.masking import MaskingConfig, plan_masking
from fourm.vocab import SharedVocab

OBJECTIVES = {"encdec": ("4m", "prefix_lm", "next_token"), "decoder": ("next_token", "prefix_lm")}


@dataclass
class ObjectiveConfig:
    # empty: the architecture's default (4m for encdec, next_token for decoder); a dict default
    # would be merged with, not replaced by, a config's own weights
    weights: dict[str, float] = field(default_factory=dict)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    condition_dropout: float = 0.1  # probability of dropping every condition token (for CFG)

    def validate(self, arch: str) -> None:
        """Fill the default weights for ``arch`` and check the rest."""
        known = OBJECTIVES[arch]
        if not self.weights:
            self.weights = {known[0]: 1.0}
        for name, w in self.weights.items():
            if name not in known:
                raise ValueError(f"objective {name!r} is not available for {arch}; choose from {', '.join(known)}")
            if w < 0:
                raise ValueError(f"objective weight {name}={w} is negative")
        if sum(self.weights.values()) <= 0:
            raise ValueError("objective weights must have a positive sum")
        if not 0.0 <= self.condition_dropout < 1.0:
            raise ValueError("condition_dropout must be in [0, 1)")


def make_example(arch: str, tokens: dict[str, np.ndarray], kinds: dict[str, str], vocab: SharedVocab, grids: dict[str, int], cfg: ObjectiveConfig, rng: np.random.Generator, pixels: dict[str, np.ndarray] | None = None, dense_labels: np.ndarray | None = None) -> tuple[EncDecExample | DecoderExample, str]:
    """Draw an objective by weight and build one example; returns it with the objective's name.
    ``pixels``, ``dense_labels``: the encoder-decoder's pixel inputs and label map (``encdec_example``)."""
    names = list(cfg.weights)
    w = np.array([cfg.weights[n] for n in names], dtype=float)
    objective = names[int(rng.choice(len(names), p=w / w.sum()))]
    drop = bool(rng.random() < cfg.condition_dropout)
    if arch == "encdec":
        if objective == "4m":
            sentinels = [vocab.sentinel_id(i) for i in range(vocab.num_sentinels)]
            plans, _ = plan_masking(rng, tokens, kinds, cfg.masking, sentinels)
        else:
            plans = prefix_plans(tokens, kinds, rng, n_condition=0 if objective == "next_token" else None)
        return encdec_example(tokens, plans, vocab, grids, drop_condition=drop, pixels=pixels, dense_labels=dense_labels), objective
    k = 0 if objective == "next_token" else int(rng.integers(1, max(2, len(tokens))))
    return decoder_example(tokens, vocab, grids, rng, n_condition=min(k, len(tokens) - 1), drop_condition=drop), objective
