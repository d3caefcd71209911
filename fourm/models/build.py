"""Building, saving and loading models.

``build_model(config)`` takes a dataclass, a dict or a YAML path (a preset in ``configs/models/``);
``arch: decoder`` or ``arch: encdec`` picks the architecture. ``save_pretrained(model, dir)`` writes
``model.safetensors`` + ``config.json`` (+ ``vocab.json`` when given); ``load_model(dir)`` returns
whichever architecture the directory holds (the files: ``pretrained.py``). Never pickle.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
import yaml

from fourm.config import load_config
from fourm.models.decoder import DecoderConfig, DecoderLM
from fourm.models.encdec import EncDecConfig, EncoderDecoder
from fourm.models.pretrained import load_weights, read_config, save_pretrained  # noqa: F401 (save_pretrained is part of this module's API)
from fourm.vocab import SharedVocab

ARCHS = {"decoder": (DecoderConfig, DecoderLM), "encdec": (EncDecConfig, EncoderDecoder)}


# id spaces whose ids are ordered values: neighbouring ids are neighbouring numbers
ORDINAL_SPACES = ("box_coords",)


def config_from_vocab(vocab: SharedVocab) -> dict:
    """The vocabulary-derived fields of a model config: vocab_size, modalities, modality_ranges,
    ordinal_ranges (the id ranges of ``ORDINAL_SPACES``, for ``ordinal_sigma``).

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
    ordinal = [[vocab.space_range(s).start, vocab.space_range(s).stop] for s in ORDINAL_SPACES if s in vocab.spaces]
    return {"vocab_size": vocab.size, "modalities": list(vocab.modalities), "modality_ranges": ranges, "ordinal_ranges": ordinal}


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


def load_model(directory: str | os.PathLike, map_location: str = "cpu") -> torch.nn.Module:
    """Whichever architecture ``directory`` holds, with its weights, in eval mode."""
    directory = Path(directory)
    config = make_config(read_config(directory))
    return load_weights(ARCHS[config.arch][1](config), directory, map_location)


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
