"""What ``tokenizers/train.py`` does: train one tokenizer and add it to a tokenizer-set directory.

A training YAML names its ``kind`` (``image`` or ``text``); the rest overrides the matching typed
config (``ImageTokenizerTrainingConfig`` or ``TextTokenizerTrainingConfig``).

By default the set's vocabulary is laid out again (canonical order) after each tokenizer; with
``grow`` a *new* tokenizer's ids are appended instead, so models and token shards made with the
set keep working (the way to add a modality to a trained model). ``add_text_modalities`` adds a
modality made of text ids (``count``) the same way.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fourm.cli import UsageError
from fourm.config import load_config, to_dict
from fourm.data.loader import LoaderConfig, build_loader
from fourm.tokenizers.boxes import BoxTokenizer, BoxTokenizerConfig
from fourm.tokenizers.text import TextTokenizer, TextTokenizerConfig
from fourm.tokenizers.tokenizer_set import TokenizerSet
from fourm.tokenizers.train_image import ImageTokenizerTrainingConfig, train_image_tokenizer
from fourm.vocab import VOCAB_FILE

log = logging.getLogger(__name__)


@dataclass
class TextTrainConfig:
    max_samples: int = 0  # 0: every caption in the data
    include_box_labels: bool = True


@dataclass
class TextTokenizerTrainingConfig:
    tokenizer: TextTokenizerConfig = field(default_factory=TextTokenizerConfig)
    train: TextTrainConfig = field(default_factory=TextTrainConfig)
    # the boxes' coordinate quantisation, set with the text tokenizer their labels are written in
    boxes: BoxTokenizerConfig = field(default_factory=BoxTokenizerConfig)


KINDS = {"image": ImageTokenizerTrainingConfig, "text": TextTokenizerTrainingConfig}


def load_training_config(path: str | os.PathLike, overrides: list[str]):
    """YAML with ``kind: image|text`` -> the typed training config."""
    if not os.path.isfile(path):
        raise UsageError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as exn:
        raise UsageError(f"cannot parse {path}: {str(exn).splitlines()[0]}") from None
    if not isinstance(data, dict) or data.get("kind") not in KINDS:
        raise UsageError(f"{path} must have 'kind: image' or 'kind: text' at the top")
    kind = data.pop("kind")
    return kind, load_config(KINDS[kind], data, overrides)


def _load_or_new_set(out: Path) -> TokenizerSet:
    if (out / VOCAB_FILE).is_file():
        return TokenizerSet.from_pretrained(out)
    return TokenizerSet()


def _texts(data, cfg: TextTrainConfig):
    loader, _ = build_loader(data, LoaderConfig(modalities=(), optional=("caption", "boxes"), batch_size=256, shuffle=0, num_workers=0))
    n = 0
    for batch in loader:
        for caption, boxes in zip(batch["caption"], batch["boxes"]):
            if caption:
                yield caption
            if cfg.include_box_labels and boxes:
                for b in boxes:
                    yield b["label"]
            n += 1
            if cfg.max_samples and n >= cfg.max_samples:
                return


def _existing_set(out: Path) -> TokenizerSet:
    if not (out / VOCAB_FILE).is_file():
        raise UsageError(f"--out {out}: no tokenizer set to grow (missing {out / VOCAB_FILE})")
    try:
        return TokenizerSet.from_pretrained(out)
    except (FileNotFoundError, ValueError) as exn:
        raise UsageError(str(exn)) from None


def add_text_modalities(out: str | os.PathLike, names: tuple[str, ...] | list[str]) -> dict:
    """Add text-id modalities (``count``) to the tokenizer set at ``out`` by appending their tags;
    every existing id keeps its meaning. Returns ``{"added": [...], "vocab_size": N}``."""
    out = Path(out)
    tset = _existing_set(out)
    added = []
    for name in names:
        try:
            if tset.add_text_modality(name):
                added.append(name)
        except ValueError as exn:
            raise UsageError(f"--add-text-modality {name}: {exn}") from None
    tset.save_pretrained(out)
    log.info("added %s to %s (vocabulary: %d ids)", ", ".join(added) or "nothing (already there)", out, tset.vocab.size)
    return {"added": added, "vocab_size": tset.vocab.size}


def train_tokenizer(kind: str, config, data, out: str | os.PathLike, val=None, progress: bool = True, grow: bool = False) -> dict:
    """Train, then write the tokenizer into ``out`` (a tokenizer set, created or updated).

    ``grow``: ``out`` must hold a set that lacks this tokenizer; its ids are appended to the set's
    vocabulary (``TokenizerSet.grow_vocab``) instead of laying the vocabulary out again.

    Returns a summary: the modality, the training history, whether the vocabulary layout changed
    (existing ids renumbered) and the modalities added.
    """
    out = Path(out)
    tset = _existing_set(out) if grow else _load_or_new_set(out)
    if grow:
        name = "text" if kind == "text" else config.tokenizer.modality
        has = tset.text is not None if kind == "text" else name in tset.images
        if has:
            raise UsageError(f"--grow adds a new tokenizer, but {out} has a {name} tokenizer already (train without --grow to replace it; that lays the vocabulary out again)")
    before = list(tset.vocab.modalities)
    if kind == "text":
        text = TextTokenizer.train(_texts(data, config.train), config.tokenizer)
        tset.text = text
        tset.boxes = BoxTokenizer(config.boxes)
        modality, history = "text", {"vocab_size": text.vocab_size, "box_bins": config.boxes.bins}
    else:
        model, history = train_image_tokenizer(config, data, val, progress=progress)
        modality = config.tokenizer.modality
        tset.images[modality] = model
    if grow:
        tset.grow_vocab()  # the tokenizer is new (checked above): nothing existing changes size
        changed = False
    else:
        changed = tset.rebuild_vocab()
        if changed and (out / VOCAB_FILE).is_file():
            log.warning("the shared vocabulary of %s was laid out again; models and token shards made with the old one no longer fit (--grow appends instead)", out)
    tset.save_pretrained(out)
    (out / modality).mkdir(parents=True, exist_ok=True)
    (out / modality / "train_config.json").write_text(json.dumps({"kind": kind, **to_dict(config)}, indent=1) + "\n")
    (out / modality / "train_history.json").write_text(json.dumps(history, indent=1) + "\n")
    log.info("%s tokenizer written to %s (vocabulary: %d ids)", modality, out, tset.vocab.size)
    added = [m for m in tset.vocab.modalities if m not in before]
    return {"modality": modality, "history": history, "vocab_changed": changed, "vocab_size": tset.vocab.size, "added": added}
