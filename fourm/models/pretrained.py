"""The saved form of a model and the ``save_pretrained`` / ``from_pretrained`` methods both
architectures carry: ``model.safetensors`` + ``config.json`` (+ ``vocab.json`` when given). Never
pickle.

This module knows no architecture (they import it): ``Class.from_pretrained(dir)`` builds the class
it is called on, ``fourm.models.build.load_model(dir)`` the one the saved ``arch`` names.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fourm.config import load_config
from fourm.vocab import VOCAB_FILE, SharedVocab
from fourm.weights import load_fitting

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def save_pretrained(model: torch.nn.Module, directory: str | os.PathLike, vocab: SharedVocab | None = None) -> None:
    """``model.safetensors`` + ``config.json`` (+ ``vocab.json``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt", "arch": model.config.arch})
    (directory / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(model.config), indent=1) + "\n")
    if vocab is not None:
        vocab.save(directory / VOCAB_FILE)


def read_config(directory: Path) -> dict:
    """The config ``directory`` was saved with, as a dict, brought up to date (fields added since
    get the value the old model was trained with). FileNotFoundError when a file is missing."""
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"no model at {directory}: missing {directory / name}")
    saved = json.loads((directory / CONFIG_FILE).read_text())
    if saved.get("arch") == "encdec" and "cross_rope" not in saved:  # saved before it existed
        saved["cross_rope"] = False
        log.warning("%s was saved before encoder-decoders had RoPE in cross-attention: its image targets are position-blind (one prediction for every position); retrain it", directory)
    return saved


def load_weights(model: torch.nn.Module, directory: Path, map_location: str = "cpu") -> torch.nn.Module:
    """``model`` (built from ``read_config(directory)``) with the weights ``directory`` holds, in
    eval mode; ValueError naming the first difference when they do not fit its config."""
    state = load_file(str(directory / WEIGHTS_FILE), device=map_location)
    if "modality_embed.weight" in state:  # the name before models could grow (see grow.py)
        state["modality_embeddings.weight"] = state.pop("modality_embed.weight")
    load_fitting(model, state, f"{directory / WEIGHTS_FILE} does not fit its config", optional=("lm_head.weight",) if model.config.tie_embeddings else ())
    return model.eval()


class Pretrained:
    """Mixin: ``model.save_pretrained(dir, vocab=None)`` and ``Class.from_pretrained(dir)``.

    Attributes:
        config_class: the architecture's config dataclass (its ``ARCH`` names it in ``config.json``).
    """

    config_class: type

    def save_pretrained(self, directory: str | os.PathLike, vocab=None) -> None:
        save_pretrained(self, directory, vocab)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str = "cpu"):
        directory = Path(directory)
        saved = read_config(directory)
        if saved.get("arch") != cls.config_class.ARCH:
            raise TypeError(f"{directory} holds a {saved.get('arch')!r} model, not a {cls.__name__} ({cls.config_class.ARCH!r}); use fourm.load_model")
        return load_weights(cls(load_config(cls.config_class, saved)), directory, map_location)
