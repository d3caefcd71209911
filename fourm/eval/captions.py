"""Reading captions of the embedded scenes back into objects and relations (pure functions).

A caption names each object once with an indefinite article (``a large red sphere``) and may refer
back to it with ``the`` (``... left of the red sphere``); relations join a new object to an earlier
or a new one (``a small cyan cube to the left of a large gray cylinder``). The parser finds the
mentions in order, gives every indefinite mention a new object, resolves definite ones to the
earliest earlier object they match, and reads the relation phrase between two mentions.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from fourm.data.synth.caption import RELATION_PHRASES
from fourm.data.synth.scene import COLORS, SHAPES, SIZES, visible_objects

_MENTION = re.compile(r"\b(?:(an?|the)\s+)?(?:(" + "|".join(SIZES) + r")\s+)?(" + "|".join(COLORS) + r")\s+(" + "|".join(SHAPES) + r")\b")
_PHRASES = sorted(((p, rel) for rel, ps in RELATION_PHRASES.items() for p in ps), key=lambda x: -len(x[0]))


@dataclass(frozen=True)
class Mentioned:
    """One object a caption names: colour, shape and (when said) size."""

    color: str
    shape: str
    size: str | None = None


@dataclass
class ParsedCaption:
    objects: list[Mentioned]
    relations: list[tuple[int, str, int]]  # (subject index, left|right|front|behind, object index)


def parse_caption(text: str) -> ParsedCaption:
    """Objects and relations of one caption (unknown words are ignored)."""
    text = text.lower()
    objects: list[Mentioned] = []
    refs: list[tuple[int, int, int]] = []  # (object index, start, end) per mention
    for m in _MENTION.finditer(text):
        article, size, color, shape = m.groups()
        index = None
        if article == "the":
            index = next((i for i, o in enumerate(objects) if (o.color, o.shape) == (color, shape) and size in (None, o.size)), None)
        if index is None:
            objects.append(Mentioned(color, shape, size))
            index = len(objects) - 1
        refs.append((index, m.start(), m.end()))
    relations = []
    for (a, _, end), (b, start, _) in zip(refs, refs[1:]):
        between = text[end:start]
        for phrase, rel in _PHRASES:
            if re.search(r"\b" + re.escape(phrase) + r"\b", between):
                if a != b:
                    relations.append((a, rel, b))
                break
    return ParsedCaption(objects, relations)


def object_counts(text: str) -> Counter:
    """Multiset of (colour, shape) objects a caption names."""
    return Counter((o.color, o.shape) for o in parse_caption(text).objects)


def scene_object_counts(scene: dict) -> Counter:
    """Multiset of (colour, shape) of a ``scene.json``'s visible objects."""
    return Counter((o["color"], o["shape"]) for o in visible_objects(scene))


def object_match(predicted: Counter, truth: Counter) -> tuple[int, int, int]:
    """(true positives, predicted count, true count) of two multisets of objects."""
    return sum((predicted & truth).values()), sum(predicted.values()), sum(truth.values())


def precision_recall_f1(tp: int, n_pred: int, n_true: int) -> dict[str, float]:
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_true if n_true else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}
