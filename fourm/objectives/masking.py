"""4M multimodal masking: per sample, an input and a target token budget split across the available
modalities by Dirichlet draws; random visible tokens and disjoint random targets for image-like
modalities; T5-style span masking with sentinels for sequence modalities.

All functions are pure: they take token counts or ids and a ``numpy.random.Generator``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class AlphaSetting:
    """One Dirichlet setting of a mixture (4M-21 style): concentration per modality for the input
    and the target split, and its sampling weight. A modality missing from a dict gets ``default``;
    alpha 0 excludes a modality from that side."""

    input_alphas: dict[str, float] = field(default_factory=dict)
    target_alphas: dict[str, float] = field(default_factory=dict)
    default: float = 1.0
    weight: float = 1.0
    name: str = "all-to-all"


@dataclass
class MaskingConfig:
    """Budgets are counted in tokens over all modalities of a sample."""

    input_budget: int = 128
    target_budget: int = 128
    settings: list[AlphaSetting] = field(default_factory=lambda: [AlphaSetting()])
    span_ratio: float = 0.15  # sequence inputs: fraction of tokens hidden in spans
    mean_span: float = 3.0

    def __post_init__(self) -> None:
        if self.input_budget < 1 or self.target_budget < 1:
            raise ValueError("input_budget and target_budget must be >= 1")
        if not self.settings or any(s.weight < 0 for s in self.settings) or sum(s.weight for s in self.settings) <= 0:
            raise ValueError("masking settings need non-negative weights with a positive sum")
        if not 0.0 <= self.span_ratio < 1.0 or self.mean_span < 1.0:
            raise ValueError("need 0 <= span_ratio < 1 and mean_span >= 1")


def dirichlet_split(rng: np.random.Generator, budget: int, alphas: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """Split ``budget`` tokens across modalities with proportions ~ Dir(alphas), capped by capacity.

    Modalities with alpha 0 or capacity 0 get nothing; what a cap cuts off is handed on to the
    others in proportion to their draw, so the budget is used when capacity allows.
    Returns (M,) int counts with counts <= capacity and sum <= budget.
    """
    counts = np.zeros(len(alphas), dtype=np.int64)
    live = (alphas > 0) & (capacity > 0)
    if not live.any() or budget <= 0:
        return counts
    props = np.zeros(len(alphas))
    props[live] = rng.dirichlet(alphas[live])
    remaining = min(budget, int(capacity[live].sum()))
    while remaining > 0:
        room = capacity - counts
        open_ = live & (room > 0)
        if not open_.any():
            break
        p = props * open_
        p = p / p.sum() if p.sum() > 0 else open_ / open_.sum()
        give = np.minimum(np.floor(p * remaining).astype(np.int64), room)
        if give.sum() == 0:  # rounding left a few tokens: one to the most-wanted open modality
            give[np.argmax(np.where(open_, p, -1.0))] = 1
        counts += give
        remaining -= int(give.sum())
    return counts


def random_split(rng: np.random.Generator, n: int, n_input: int, n_target: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint random visible and target positions among ``n`` tokens (sorted), as in MAE."""
    if n_input + n_target > n:
        raise ValueError(f"cannot pick {n_input} inputs and {n_target} targets from {n} tokens")
    perm = rng.permutation(n)
    return np.sort(perm[:n_input]), np.sort(perm[n_input : n_input + n_target])


def span_mask(rng: np.random.Generator, ids: np.ndarray, ratio: float, mean_span: float, sentinels: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """T5 span corruption of one sequence.

    Hides about ``ratio`` of the tokens in spans of mean length ``mean_span``; each span becomes a
    sentinel in the input, and the target lists every sentinel followed by the tokens it hid.
    Returns (corrupted input ids, target ids). With nothing to hide the target is empty.
    """
    n = len(ids)
    n_hidden = int(round(n * ratio))
    if n == 0 or n_hidden == 0:
        return ids.copy(), np.zeros(0, dtype=ids.dtype)
    n_spans = max(1, min(len(sentinels), int(round(n_hidden / mean_span)), n_hidden, n - n_hidden + 1))
    # span lengths: a random composition of n_hidden into n_spans parts >= 1
    cuts = np.sort(rng.choice(np.arange(1, n_hidden), n_spans - 1, replace=False)) if n_spans > 1 else np.zeros(0, dtype=np.int64)
    span_len = np.diff(np.concatenate([[0], cuts, [n_hidden]]))
    # gaps between spans: a composition of the visible tokens into n_spans + 1 parts, inner ones >= 1
    n_visible = n - n_hidden
    inner = n_spans - 1
    free = n_visible - inner
    slots = free + n_spans  # stars and bars: `free` visible tokens into n_spans + 1 gaps >= 0
    bars = np.sort(rng.choice(np.arange(slots), n_spans, replace=False))
    parts = np.diff(np.concatenate([[-1], bars, [slots]])) - 1
    parts[1:-1] += 1
    inputs, targets, pos = [], [], 0
    for k in range(n_spans):
        inputs.extend(ids[pos : pos + parts[k]])
        pos += parts[k]
        inputs.append(sentinels[k])
        targets.append(sentinels[k])
        targets.extend(ids[pos : pos + span_len[k]])
        pos += span_len[k]
    inputs.extend(ids[pos:])
    return np.asarray(inputs, dtype=ids.dtype), np.asarray(targets, dtype=ids.dtype)


@dataclass
class ModalityPlan:
    """What one modality contributes to one training example.

    image-like: ``input_idx`` / ``target_idx`` are positions in its token grid (disjoint).
    sequence: ``role`` is ``input`` (span-corrupted ``input_ids`` go in, ``target_ids`` = the
    sentinel-delimited spans come out, if any), ``target`` (the whole sequence is predicted) or
    ``none``.
    """

    name: str
    input_idx: np.ndarray | None = None
    target_idx: np.ndarray | None = None
    role: str = "none"
    input_ids: np.ndarray | None = None
    target_ids: np.ndarray | None = None


def plan_masking(rng: np.random.Generator, tokens: dict[str, np.ndarray], kinds: dict[str, str], cfg: MaskingConfig, sentinels: list[int]) -> tuple[list[ModalityPlan], str]:
    """One sample's 4M masking plan.

    Args:
        tokens: modality -> ids (image-like: (N,) grid ids; sequence: (L,) ids), present ones only.
        kinds: modality -> ``image`` or ``sequence``.
        sentinels: span-masking sentinel ids.
    Returns:
        plans in the order of ``tokens`` and the name of the alpha setting drawn.
    """
    names = list(tokens)
    weights = np.array([s.weight for s in cfg.settings], dtype=float)
    setting = cfg.settings[int(rng.choice(len(cfg.settings), p=weights / weights.sum()))]
    a_in = np.array([setting.input_alphas.get(m, setting.default) for m in names], dtype=float)
    a_out = np.array([setting.target_alphas.get(m, setting.default) for m in names], dtype=float)
    sizes = np.array([len(tokens[m]) for m in names], dtype=np.int64)
    n_in = dirichlet_split(rng, cfg.input_budget, a_in, sizes)
    n_out = dirichlet_split(rng, cfg.target_budget, a_out, sizes - n_in)
    plans = []
    for i, m in enumerate(names):
        plan = ModalityPlan(m)
        if kinds[m] == "image":
            plan.input_idx, plan.target_idx = random_split(rng, int(sizes[i]), int(n_in[i]), int(n_out[i]))
        elif n_in[i] > 0 and n_in[i] >= n_out[i]:
            plan.role = "input"
            corrupted, spans = span_mask(rng, tokens[m], cfg.span_ratio if n_out[i] > 0 else 0.0, cfg.mean_span, sentinels)
            plan.input_ids, plan.target_ids = corrupted, spans
        elif n_out[i] > 0:
            plan.role = "target"
            plan.target_ids = tokens[m].copy()
        plans.append(plan)
    return plans, setting.name
