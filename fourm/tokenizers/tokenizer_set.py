"""A tokenizer set: every modality's tokenizer plus the shared vocabulary, in one directory.

    DIR/vocab.json                       the shared vocabulary (fourm.vocab.SharedVocab)
    DIR/set.json                         format tag and which modalities the set holds
    DIR/text/tokenizer.json | spm.model  the text tokenizer (captions and box labels)
    DIR/boxes/config.json                box quantisation (no weights)
    DIR/<rgb|depth|semseg|normals>/config.json + model.safetensors

Every ``encode`` returns shared-vocabulary ids, one 1-D LongTensor per sample; every ``decode``
takes them back to raw values. Ids of another modality's range are an error. Text modalities
(``caption``, and ``count`` once ``add_text_modality`` added it) are the text tokenizer's ids.

A set grows without renumbering: ``grow_vocab`` appends the spaces of newly added tokenizers,
``add_text_modality`` the tags of a new text modality; ``rebuild_vocab`` lays everything out anew.
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
from fourm.tokenizers.boxes import BoxTokenizer, BoxTokenizerConfig
from fourm.tokenizers.image import IMAGE_TOKENIZER_MODALITIES, ImageTokenizer, ImageTokenizerConfig
from fourm.tokenizers.text import TextTokenizer
from fourm.modalities import MODALITIES
from fourm.vocab import VOCAB_FILE, SharedVocab, modality_spaces
from fourm.weights import load_fitting

log = logging.getLogger(__name__)

SET_FILE = "set.json"
# registry modalities whose tokens are text ids alone ([EOS]-terminated sequences)
TEXT_MODALITIES = tuple(m for m, spec in MODALITIES.items() if spec.kind == "sequence" and modality_spaces(m) == ("text",))
SET_FORMAT = "fourm-tokenizer-set/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


class TokenizerSet:
    """All tokenizers of a model, mapping raw modalities to shared ids and back."""

    def __init__(self, text: TextTokenizer | None = None, boxes: BoxTokenizer | None = None, images: dict[str, ImageTokenizer] | None = None, vocab: SharedVocab | None = None):
        self.text = text
        self.boxes = boxes or BoxTokenizer()
        self.images: dict[str, ImageTokenizer] = dict(images or {})
        self.vocab = vocab or SharedVocab.build(self.space_sizes())

    # -- layout ---------------------------------------------------------------------------------
    def space_sizes(self) -> dict[str, int]:
        sizes = {"box_coords": self.boxes.config.bins}
        if self.text is not None:
            sizes["text"] = self.text.vocab_size
        for name, tok in self.images.items():
            sizes[name] = tok.codebook_size
        return sizes

    def rebuild_vocab(self) -> bool:
        """Lay the vocabulary out again for the current tokenizers (canonical order, keeping the
        optional modalities the set has); returns whether any id changed. Models and token shards
        trained on the old layout no longer fit."""
        sizes = self.space_sizes()
        keep = [m for m, spaces in self.vocab.modalities.items() if set(spaces) <= set(sizes)]
        new = SharedVocab.build(sizes, modalities=keep)
        changed = new.to_json() != self.vocab.to_json()
        self.vocab = new
        return changed

    def grow_vocab(self, modalities: tuple[str, ...] | list[str] = ()) -> list[str]:
        """Append the spaces of tokenizers added since the vocabulary was made (and ``modalities``'
        tags); every existing id keeps its meaning. Returns the modalities added.

        Raises ValueError when a tokenizer the vocabulary has changed its number of ids."""
        old = self.vocab
        self.vocab = old.grow(self.space_sizes(), modalities)
        return [m for m in self.vocab.modalities if m not in old.modalities]

    def add_text_modality(self, name: str) -> bool:
        """Add a sequence modality made of text-tokenizer ids (``count``) by growing the
        vocabulary with its tags; returns False when the set has it already."""
        if self.text is None:
            raise ValueError(f"{name!r} needs a text tokenizer, and this set has none")
        if name not in TEXT_MODALITIES:
            raise ValueError(f"{name!r} is not a text modality; text modalities: {', '.join(TEXT_MODALITIES)}")
        if name in self.vocab.modalities:
            return False
        self.grow_vocab((name,))
        return True

    @property
    def grids(self) -> dict[str, int]:
        """Tokens per side of each image-like modality's grid."""
        return {m: tok.config.grid for m, tok in self.images.items()}

    @property
    def resolution(self) -> int:
        """Image side the image tokenizers take (64 when the set has none)."""
        return next(iter(self.images.values())).config.resolution if self.images else 64

    @property
    def modalities(self) -> list[str]:
        """Modalities this set can encode."""
        return [m for m, spaces in self.vocab.modalities.items() if m in self.images or (self.text is not None and "text" in spaces)]

    def is_text(self, modality: str) -> bool:
        """Whether ``modality``'s tokens are text ids alone (caption, count), [EOS]-terminated."""
        return self.vocab.modalities.get(modality) == ["text"]

    def _require(self, modality: str) -> None:
        if modality not in self.modalities:
            raise KeyError(f"this tokenizer set has no tokenizer for {modality!r}; it has: {', '.join(self.modalities) or 'none'}")

    # -- encode / decode ------------------------------------------------------------------------
    def encode(self, modality: str, batch, image_size: tuple[int, int] | None = None) -> list[torch.Tensor]:
        """Raw batch -> one 1-D LongTensor of shared ids per sample.

        caption: list[str]; count: list of int (or str); boxes: list[list[dict]] with
        ``image_size`` (H, W) of the images the boxes are in pixels of; rgb/depth/semseg/normals: a
        batched tensor (see ``ImageTokenizer.preprocess``).
        """
        self._require(modality)
        if modality in self.images:
            ids, _ = self.encode_images(modality, batch)
            return list(ids)
        if self.is_text(modality):
            return [self.vocab.to_global("text", torch.tensor(x, dtype=torch.long)) for x in self.text.encode_batch([str(t) for t in batch])]
        if image_size is None:
            raise ValueError("boxes need image_size=(height, width)")
        return [self._encode_boxes(b, image_size) for b in batch]

    def encode_images(self, modality: str, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Image batch -> (shared ids (B, h*w), depth scales (B, 2) or None)."""
        self._require(modality)
        local, scale = self.images[modality].encode(batch)
        return self.vocab.to_global(modality, local), scale

    def _encode_boxes(self, boxes: list[dict], image_size: tuple[int, int]) -> torch.Tensor:
        ids: list[int] = []
        start_coord, start_text = self.vocab.spaces["box_coords"][0], self.vocab.spaces["text"][0]
        for coords, label in self.boxes.to_bins(boxes, image_size):
            ids += [start_coord + c for c in coords]
            ids += [start_text + t for t in self.text.encode(label)]
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, modality: str, ids, image_size: tuple[int, int] | None = None, scales: torch.Tensor | None = None, probs: list[torch.Tensor] | None = None) -> list:
        """Shared ids (a list of 1-D tensors, or a (B, N) tensor) -> list of raw samples.

        caption, count -> str; boxes -> list[dict] in pixels of ``image_size``; rgb -> uint8
        (3, H, W); depth -> float metres (1, H, W); semseg -> int64 (H, W); normals -> float32
        unit vectors (3, H, W). ``probs`` (boxes): per sample, a model's probability of each id;
        each box then gets a ``score``, the geometric mean over its tokens.
        """
        self._require(modality)
        if modality in self.images:
            stacked = ids if isinstance(ids, torch.Tensor) else torch.stack(list(ids))
            return list(self.images[modality].decode(self.vocab.to_local(modality, stacked), scales))
        seqs = [torch.as_tensor(x, dtype=torch.long) for x in ids]
        if self.is_text(modality):
            return [self.text.decode(self.vocab.to_local("text", self._strip(s)).tolist()) for s in seqs]
        if image_size is None:
            raise ValueError("boxes need image_size=(height, width)")
        if probs is not None and len(probs) != len(seqs):
            raise ValueError(f"{len(probs)} probability rows for {len(seqs)} sequences")
        kept = [self.vocab.content_index(s) for s in seqs]
        return [self._decode_boxes(s[k], image_size, None if probs is None else torch.as_tensor(probs[i], dtype=torch.float64)[k]) for i, (s, k) in enumerate(zip(seqs, kept))]

    def _strip(self, seq: torch.Tensor) -> torch.Tensor:
        """Cut at the first [EOS] and drop [PAD]/[BOS]."""
        return seq[self.vocab.content_index(seq)]

    def _decode_boxes(self, seq: torch.Tensor, image_size: tuple[int, int], probs: torch.Tensor | None = None) -> list[dict]:
        """Parse ``(4 coordinate ids, label text ids)*``; a box with fewer than 4 coordinates or an
        empty label is dropped; any other id is an error. With ``probs`` (one per id) each box gets
        ``score``: the geometric mean of its tokens' probabilities."""
        coords_r, text_r = self.vocab.space_range("box_coords"), self.vocab.space_range("text")
        items: list[tuple[list[int], list[int], list[int]]] = []  # coordinates, label ids, positions in seq
        for j, t in enumerate(seq.tolist()):
            if t in coords_r:
                if not items or len(items[-1][0]) == 4 and items[-1][1]:
                    items.append(([], [], []))
                if len(items[-1][0]) < 4 and not items[-1][1]:
                    items[-1][0].append(t - coords_r.start)
                    items[-1][2].append(j)
                else:  # a coordinate inside a label: start over
                    items.append(([t - coords_r.start], [], [j]))
            elif t in text_r:
                if items and len(items[-1][0]) == 4:
                    items[-1][1].append(t - text_r.start)
                    items[-1][2].append(j)
            else:
                raise ValueError(f"id {t} ({self.vocab.space_of(t)}) is not a boxes id")
        complete = [it for it in items if len(it[0]) == 4 and it[1]]
        boxes = self.boxes.from_bins([(c, self.text.decode(lab).strip()) for c, lab, _ in complete], image_size)
        if probs is not None:
            for box, (_, _, where) in zip(boxes, complete):
                box["score"] = float(probs[where].clamp_min(1e-12).log().mean().exp())
        return boxes

    # -- persistence ----------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the whole set (see the module docstring)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.text is not None:
            self.text.save(directory / "text")
        (directory / "boxes").mkdir(exist_ok=True)
        (directory / "boxes" / CONFIG).write_text(json.dumps(dataclasses.asdict(self.boxes.config), indent=1) + "\n")
        for name, tok in self.images.items():
            save_image_tokenizer(tok, directory / name)
        self.vocab.save(directory / VOCAB_FILE)
        (directory / SET_FILE).write_text(json.dumps({"format": SET_FORMAT, "modalities": self.modalities, "spaces": self.space_sizes()}, indent=1) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "TokenizerSet":
        """Load a set written by ``save_pretrained``; a missing file is named in the error."""
        directory = Path(directory)
        if not (directory / VOCAB_FILE).is_file():
            raise FileNotFoundError(f"no tokenizer set at {directory} (missing {directory / VOCAB_FILE})")
        vocab = SharedVocab.load(directory / VOCAB_FILE)
        text = TextTokenizer.load(directory / "text") if (directory / "text").is_dir() else None
        boxes_cfg = directory / "boxes" / CONFIG
        boxes = BoxTokenizer(load_config(BoxTokenizerConfig, json.loads(boxes_cfg.read_text()))) if boxes_cfg.is_file() else BoxTokenizer()
        images = {m: load_image_tokenizer(directory / m) for m in IMAGE_TOKENIZER_MODALITIES if (directory / m / CONFIG).is_file()}
        tset = cls(text=text, boxes=boxes, images=images, vocab=vocab)
        expected = tset.space_sizes()
        for space, size in expected.items():
            if vocab.spaces.get(space, [0, None])[1] != size:
                raise ValueError(f"{directory / VOCAB_FILE} does not match the tokenizers: space {space!r} has {vocab.spaces.get(space)} but the tokenizer has {size} ids")
        return tset


def save_image_tokenizer(tok: ImageTokenizer, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG).write_text(json.dumps(dataclasses.asdict(tok.config), indent=1) + "\n")
    save_file({k: v.contiguous() for k, v in tok.state_dict().items()}, str(directory / WEIGHTS))


def load_image_tokenizer(directory: Path) -> ImageTokenizer:
    config = load_config(ImageTokenizerConfig, json.loads((directory / CONFIG).read_text()))
    if not (directory / WEIGHTS).is_file():
        raise FileNotFoundError(f"missing weights {directory / WEIGHTS}")
    tok = ImageTokenizer(config)
    load_fitting(tok, load_file(str(directory / WEIGHTS)), f"{directory / WEIGHTS} does not fit its config")
    tok.eval()
    return tok
