"""Loading tensors into a module only once they fit: the one check every loader makes (models,
image tokenizers, the judge's segmenter, training checkpoints), with the first difference in words."""

from __future__ import annotations

import torch


def first_difference(model: dict[str, torch.Tensor], checkpoint: dict[str, torch.Tensor], optional: tuple[str, ...] = ()) -> str | None:
    """The first way ``checkpoint``'s tensors do not fit ``model``'s state dict (a key missing or
    unexpected, or a shape), in words; None when they fit. Keys in ``optional`` may be missing
    (a tied LM head is saved once, as the embedding)."""
    for key in model:
        if key not in checkpoint:
            if key in optional:
                continue
            return f"missing {key}"
        if tuple(checkpoint[key].shape) != tuple(model[key].shape):
            return f"{key}: shape {tuple(checkpoint[key].shape)} in the checkpoint, {tuple(model[key].shape)} in the model"
    extra = [key for key in checkpoint if key not in model]
    return f"unexpected {extra[0]}" if extra else None


def load_fitting(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str, optional: tuple[str, ...] = (), hint: str = "") -> None:
    """Load ``state`` into ``module`` once it fits (``first_difference``); otherwise ValueError
    ``"{what} ({the first difference})[: {hint}]"``, with nothing loaded."""
    difference = first_difference(module.state_dict(), state, optional)
    if difference:
        raise ValueError(f"{what} ({difference})" + (f": {hint}" if hint else ""))
    module.load_state_dict(state, strict=not optional)
