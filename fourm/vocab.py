"""The shared vocabulary: one id space for every modality.

Layout (deterministic from the modality registry and the tokenizers' sizes)::

    [PAD] [BOS] [EOS] [MASK]  <rgb> </rgb> <depth> </depth> ...  <extra_id_0> ... <extra_id_{S-1}>
    | text ids | box coordinate bins | rgb codebook | depth codebook | semseg codebook | (new spaces appended)

Ids are grouped into *spaces* (``special``, ``text``, ``box_coords``, ``rgb``, ...); every id belongs
to exactly one space. A modality uses one or more spaces: ``caption`` -> text; ``boxes`` ->
box_coords + text (coordinate bins followed by the label's text tokens); image-like modalities ->
their own codebook; ``count`` (an optional modality, only there when asked for) -> text.

Growing the vocabulary (``grow``: a new modality's codebook, or a new modality on existing spaces)
appends the new spaces and then one ``tags:<m>,...`` space with the new modalities' ``<m>``
``</m>`` tags; no existing id is renumbered.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fourm.modalities import MODALITIES

BASE_SPECIALS = ("[PAD]", "[BOS]", "[EOS]", "[MASK]")
DEFAULT_SENTINELS = 100
VOCAB_FILE = "vocab.json"


def modality_spaces(modality: str) -> tuple[str, ...]:
    """The id spaces a modality's tokens come from."""
    if modality in ("caption", "count"):
        return ("text",)
    if modality == "boxes":
        return ("box_coords", "text")
    if modality in MODALITIES and MODALITIES[modality].kind == "image" or modality not in MODALITIES:
        return (modality,)
    raise KeyError(f"modality {modality!r} has no tokens")


def _default_modality(m: str, spaces) -> bool:
    """A registry modality that a vocabulary with ``spaces`` holds unless asked otherwise."""
    spec = MODALITIES[m]
    return spec.kind != "meta" and not spec.optional and all(s in spaces for s in modality_spaces(m))


def _new_modalities(spaces, asked, existing) -> list[str]:
    """Modalities a vocabulary with ``spaces`` gains over ``existing``: the registry's default ones
    and the ``asked`` ones (registry order first, then unregistered names), each checked."""
    for m in asked:
        if m in MODALITIES and MODALITIES[m].kind == "meta":
            raise ValueError(f"modality {m!r} has no tokens")
        missing = [s for s in modality_spaces(m) if s not in spaces]
        if missing:
            raise ValueError(f"modality {m!r} needs the space(s) {', '.join(missing)}, which the vocabulary lacks")
    new = [m for m in MODALITIES if m not in existing and (m in asked or _default_modality(m, spaces))]
    return new + [m for m in dict.fromkeys(asked) if m not in MODALITIES and m not in existing]


def space_order(spaces: set[str] | list[str]) -> list[str]:
    """Canonical order of spaces: text, box_coords, then image codebooks in registry order, then
    anything else in the given order."""
    fixed = ["text", "box_coords"] + [m for m, spec in MODALITIES.items() if spec.kind == "image"]
    rest = [s for s in spaces if s not in fixed]
    return [s for s in fixed if s in spaces] + rest


@dataclass
class SharedVocab:
    """The id layout. Build with ``SharedVocab.build``; never edit the fields by hand.

    Attributes:
        specials: special token strings in id order (ids 0 .. len-1).
        spaces: space name -> [start, size], in id order, after the specials.
        modalities: tokenized modality -> its spaces.
    """

    specials: list[str]
    spaces: dict[str, list[int]]
    modalities: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def build(cls, space_sizes: dict[str, int], num_sentinels: int = DEFAULT_SENTINELS, base: "SharedVocab | None" = None, modalities: tuple[str, ...] | list[str] = ()) -> "SharedVocab":
        """Lay out a vocabulary for spaces of the given sizes.

        Args:
            space_sizes: space name -> number of ids (a text tokenizer's vocab size, the number of
                coordinate bins, a codebook size).
            base: an existing vocabulary to grow: its ids stay as they are; new spaces (and the
                begin/end tags of new modalities) are appended (see ``grow``).
            modalities: optional modalities (``Modality.optional``, e.g. ``count``) to include too;
                every other registry modality whose spaces exist is always included.
        """
        if base is not None:
            return base.grow(space_sizes, modalities)
        for name, size in space_sizes.items():
            if size < 1:
                raise ValueError(f"space {name!r} needs a positive size, got {size}")
        modalities = _new_modalities(space_sizes, modalities, {})
        specials = list(BASE_SPECIALS)
        for m in modalities:
            specials += [f"<{m}>", f"</{m}>"]
        specials += [f"<extra_id_{i}>" for i in range(num_sentinels)]
        spaces: dict[str, list[int]] = {}
        start = len(specials)
        for name in space_order(list(space_sizes)):
            spaces[name] = [start, int(space_sizes[name])]
            start += int(space_sizes[name])
        return cls(specials=specials, spaces=spaces, modalities={m: list(modality_spaces(m)) for m in modalities})

    def grow(self, space_sizes: dict[str, int], modalities: tuple[str, ...] | list[str] = ()) -> "SharedVocab":
        """A copy with new spaces and new modalities appended; every existing id keeps its meaning.

        Spaces that exist must keep their size. New modalities are the registry's (non-optional)
        modalities whose spaces are all there and that the vocabulary lacks, plus ``modalities``
        (any modality whose spaces exist, e.g. ``count`` on the existing text space). Their
        ``<m>`` ``</m>`` tags go into one ``tags:`` space after the new spaces."""
        spaces = {k: list(v) for k, v in self.spaces.items()}
        known = {k: list(v) for k, v in self.modalities.items()}
        start = self.size
        for name in space_order(list(space_sizes)):
            size = int(space_sizes[name])
            if name in spaces:
                if spaces[name][1] != size:
                    raise ValueError(f"space {name!r} has {spaces[name][1]} ids in the existing vocabulary, not {size}")
                continue
            if size < 1:
                raise ValueError(f"space {name!r} needs a positive size, got {size}")
            spaces[name] = [start, size]
            start += size
        new = _new_modalities(spaces, modalities, known)
        if new:
            spaces["tags:" + ",".join(f"<{m}>" for m in new)] = [start, 2 * len(new)]
            known.update({m: list(modality_spaces(m)) for m in new})
        return SharedVocab(specials=list(self.specials), spaces=spaces, modalities=known)

    # -- sizes and lookups -------------------------------------------------------------------
    @property
    def size(self) -> int:
        """Total number of ids."""
        return max([len(self.specials)] + [s + n for s, n in self.spaces.values()])

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def bos_id(self) -> int:
        return 1

    @property
    def eos_id(self) -> int:
        return 2

    @property
    def mask_id(self) -> int:
        return 3

    def _tag_id(self, tag: str) -> int:
        if tag in self.specials:
            return self.specials.index(tag)
        for name, (start, _) in self.spaces.items():
            if name.startswith("tags:"):
                tags = []
                for m in name[5:].split(","):
                    tags += [m, "</" + m[1:]]
                if tag in tags:
                    return start + tags.index(tag)
        raise KeyError(f"no tag {tag!r} in the vocabulary")

    def begin_id(self, modality: str) -> int:
        """Id of ``<modality>``."""
        self._check_modality(modality)
        return self._tag_id(f"<{modality}>")

    def end_id(self, modality: str) -> int:
        """Id of ``</modality>``."""
        self._check_modality(modality)
        return self._tag_id(f"</{modality}>")

    @property
    def num_sentinels(self) -> int:
        return sum(1 for s in self.specials if s.startswith("<extra_id_"))

    def sentinel_id(self, i: int) -> int:
        """Id of ``<extra_id_i>`` (T5-style span masking)."""
        if not 0 <= i < self.num_sentinels:
            raise IndexError(f"sentinel {i} out of range (the vocabulary has {self.num_sentinels})")
        return self.specials.index(f"<extra_id_{i}>")

    def _check_modality(self, modality: str) -> None:
        if modality not in self.modalities:
            raise KeyError(f"unknown modality {modality!r}; this vocabulary has: {', '.join(self.modalities)}")

    def space_range(self, space: str) -> range:
        """Ids of one space."""
        if space not in self.spaces:
            raise KeyError(f"unknown space {space!r}; known: {', '.join(self.spaces)}")
        start, size = self.spaces[space]
        return range(start, start + size)

    def space_of(self, token_id: int) -> str:
        """The one space (or ``special``) an id belongs to."""
        if 0 <= token_id < len(self.specials):
            return "special"
        for name, (start, size) in self.spaces.items():
            if start <= token_id < start + size:
                return name
        raise IndexError(f"id {token_id} is outside the vocabulary (size {self.size})")

    def to_global(self, space: str, local: torch.Tensor) -> torch.Tensor:
        """Local ids 0..size-1 of ``space`` -> shared ids; out-of-range local ids are an error."""
        start, size = self.spaces[space]
        local = torch.as_tensor(local, dtype=torch.long)
        if local.numel() and (int(local.min()) < 0 or int(local.max()) >= size):
            raise ValueError(f"local ids for {space!r} must be in [0, {size}), got [{int(local.min())}, {int(local.max())}]")
        return local + start

    def to_local(self, space: str, ids: torch.Tensor) -> torch.Tensor:
        """Shared ids of ``space`` -> local ids; an id of another space is an error."""
        start, size = self.spaces[space]
        ids = torch.as_tensor(ids, dtype=torch.long)
        if ids.numel() and (int(ids.min()) < start or int(ids.max()) >= start + size):
            bad = ids[(ids < start) | (ids >= start + size)][0].item()
            raise ValueError(f"id {bad} is not a {space!r} id (range [{start}, {start + size}))")
        return ids - start

    def allowed_mask(self, modality: str, with_eos: bool | None = None) -> torch.Tensor:
        """(size,) bool: the ids a model may output for ``modality`` (its spaces; plus [EOS] for
        sequence modalities unless ``with_eos`` says otherwise)."""
        self._check_modality(modality)
        mask = torch.zeros(self.size, dtype=torch.bool)
        for space in self.modalities[modality]:
            r = self.space_range(space)
            mask[r.start : r.stop] = True
        if with_eos if with_eos is not None else self.ends_with_eos(modality):
            mask[self.eos_id] = True
        return mask

    def logit_span(self, modality: str) -> tuple[int, int]:
        """The smallest id range [lo, hi) that holds every id ``allowed_mask(modality)`` allows:
        generation computes logits only for those rows of the output layer."""
        ids = self.allowed_mask(modality).nonzero()[:, 0]
        return int(ids[0]), int(ids[-1]) + 1

    @staticmethod
    def ends_with_eos(modality: str) -> bool:
        """Sequence modalities (captions, boxes) have a variable length that [EOS] ends."""
        return modality in MODALITIES and MODALITIES[modality].kind == "sequence"

    def content_index(self, seq: torch.Tensor) -> torch.Tensor:
        """Indices of a sequence's content (L,) -> (N,): before the first [EOS], without
        [PAD]/[BOS]."""
        eos = (seq == self.eos_id).nonzero()
        n = int(eos[0]) if len(eos) else len(seq)
        return ((seq[:n] != self.pad_id) & (seq[:n] != self.bos_id)).nonzero()[:, 0]

    # -- persistence ---------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"format": "fourm-vocab/1", "size": self.size, "specials": self.specials, "spaces": self.spaces, "modalities": self.modalities}

    def save(self, path: str | os.PathLike) -> None:
        """Write JSON (atomically)."""
        path = Path(path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SharedVocab":
        """Read JSON written by ``save``; malformed files raise ValueError naming the path."""
        try:
            data = json.loads(Path(path).read_text())
            vocab = cls(specials=list(data["specials"]), spaces={k: [int(v[0]), int(v[1])] for k, v in data["spaces"].items()}, modalities={k: list(v) for k, v in data["modalities"].items()})
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exn:
            raise ValueError(f"cannot read vocabulary {path}: {type(exn).__name__}: {exn}") from None
        vocab.validate()
        return vocab

    def validate(self) -> None:
        """Spaces are disjoint, contiguous after the specials, and every modality's spaces exist."""
        ranges = sorted((s, s + n, name) for name, (s, n) in self.spaces.items())
        pos = len(self.specials)
        for start, stop, name in ranges:
            if start != pos or stop <= start:
                raise ValueError(f"space {name!r} [{start}, {stop}) is not contiguous at id {pos}")
            pos = stop
        for m, spaces in self.modalities.items():
            for s in spaces:
                if s not in self.spaces:
                    raise ValueError(f"modality {m!r} uses unknown space {s!r}")
