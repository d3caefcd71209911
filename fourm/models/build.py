"""Building, saving and loading models.

``build_model(config)`` takes a dataclass, a dict or a YAML path (a preset in ``configs/models/``);
``arch: decoder`` or ``arch: encdec`` picks the architecture. ``save_pretrained(model, dir)`` writes
``model.safetensors`` + ``config.json`` (+ ``vocab.json`` when given); ``load_model(dir)`` returns
whichever architecture the directory holds. Never pickle.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from fourm.config import load_config
from fourm.models.decoder import DecoderConfig, DecoderLM
from fourm.models.encdec import EncDecConfig, EncoderDecoder
from fourm.vocab import VOCAB_FILE, SharedVocab
from fourm.weights import load_fitting

log = logging.getLogger(__name__)

ARCHS = {"decoder": (DecoderConfig, DecoderLM), "encdec": (EncDecConfig, EncoderDecoder)}
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def config_from_vocab(vocab: SharedVocab) -> dict:
    """The vocabulary-derived fields of a model config: vocab_size, modalities, modality_ranges.

    Sequence modalities may also emit [EOS] and the span-masking sentinels (their span-masked
    targets are ``<extra_id_k> tokens ...``)."""
    ranges = {}
    for m in vocab.modalities:
        spans = [[vocab.space_range(s).start, vocab.space_range(s).stop] for s in vocab.modalities[m]]
        if vocab.ends_with_eos(m):
            spans.append([vocab.eos_id, vocab.eos_id + 1])
            if vocab.num_sentinels:
                spans.append([vocab.sentinel_id(0), vocab.sentinel_id(vocab.num_sentinels - 1) + 1])
        ranges[m] = spans
    return {"vocab_size": vocab.size, "modalities": list(vocab.modalities), "modality_ranges": ranges}


def make_config(source, overrides: list[str] | tuple = ()):
    """A model config dataclass from a dataclass, a dict or a YAML path (+ ``key=value`` overrides)."""
    if dataclasses.is_dataclass(source) and not isinstance(source, type):
        return source if not overrides else load_config(type(source), dataclasses.asdict(source), overrides)
    if isinstance(source, (str, os.PathLike)):
        with open(source) as f:
            source = yaml.safe_load(f) or {}
    if not isinstance(source, dict):
        raise TypeError(f"a model config is a dataclass, a dict or a YAML path, not {type(source).__name__}")
    arch = source.get("arch", "decoder")
    for item in overrides:
        if item.startswith("arch="):
            arch = item.split("=", 1)[1]
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; known: {', '.join(ARCHS)}")
    return load_config(ARCHS[arch][0], {**source, "arch": arch}, [o for o in overrides if not o.startswith("arch=")])


def build_model(source, vocab: SharedVocab | None = None, overrides: list[str] | tuple = ()) -> torch.nn.Module:
    """Build a model; ``vocab`` fills vocab_size/modalities/modality_ranges from a vocabulary."""
    config = make_config(source, overrides)
    if vocab is not None:
        for key, value in config_from_vocab(vocab).items():
            if hasattr(config, key):
                setattr(config, key, value)
    return ARCHS[config.arch][1](config)


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


def load_model(directory: str | os.PathLike, map_location: str = "cpu") -> torch.nn.Module:
    """Whichever architecture ``directory`` holds, with its weights, in eval mode."""
    directory = Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"no model at {directory}: missing {directory / name}")
    saved = json.loads((directory / CONFIG_FILE).read_text())
    if saved.get("arch") == "encdec" and "cross_rope" not in saved:  # saved before it existed
        saved["cross_rope"] = False
        log.warning("%s was saved before encoder-decoders had RoPE in cross-attention: its image targets are position-blind (one prediction for every position); retrain it", directory)
    config = make_config(saved)
    model = ARCHS[config.arch][1](config)
    state = load_file(str(directory / WEIGHTS_FILE), device=map_location)
    if "modality_embed.weight" in state:  # the name before models could grow (see grow.py)
        state["modality_embeddings.weight"] = state.pop("modality_embed.weight")
    load_fitting(model, state, f"{directory / WEIGHTS_FILE} does not fit its config", optional=("lm_head.weight",) if config.tie_embeddings else ())
    return model.eval()


def count_parameters(model: torch.nn.Module, exclude_embeddings: bool = False) -> int:
    """Unique parameters (tied weights once); optionally without token embeddings and LM head."""
    seen, total = set(), 0
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if exclude_embeddings and (name.startswith("embed.") or name.startswith("lm_head.")):
            continue
        total += p.numel()
    return total
