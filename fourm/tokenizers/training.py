"""What ``tokenizers/train.py`` does: train one tokenizer and add it to a tokenizer-set directory.

A training YAML names its ``kind`` (``image`` or ``text``); the rest overrides the matching typed
config (``ImageTokenizerTrainingConfig`` or ``TextTokenizerTrainingConfig``).
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


def train_tokenizer(kind: str, config, data, out: str | os.PathLike, val=None, progress: bool = True) -> dict:
    """Train, then write the tokenizer into ``out`` (a tokenizer set, created or updated).

    Returns a summary: the modality, the training history and whether the vocabulary layout changed.
    """
    out = Path(out)
    tset = _load_or_new_set(out)
    if kind == "text":
        text = TextTokenizer.train(_texts(data, config.train), config.tokenizer)
        tset.text = text
        modality, history = "text", {"vocab_size": text.vocab_size}
    else:
        model, history = train_image_tokenizer(config, data, val, progress=progress)
        modality = config.tokenizer.modality
        tset.images[modality] = model
    changed = tset.rebuild_vocab()
    if changed and (out / VOCAB_FILE).is_file():
        log.warning("the shared vocabulary of %s was laid out again; models and token shards made with the old one no longer fit", out)
    tset.save_pretrained(out)
    (out / modality).mkdir(parents=True, exist_ok=True)
    (out / modality / "train_config.json").write_text(json.dumps({"kind": kind, **to_dict(config)}, indent=1) + "\n")
    (out / modality / "train_history.json").write_text(json.dumps(history, indent=1) + "\n")
    log.info("%s tokenizer written to %s (vocabulary: %d ids)", modality, out, tset.vocab.size)
    return {"modality": modality, "history": history, "vocab_changed": changed, "vocab_size": tset.vocab.size}
