"""The modality registry: every modality the system knows, how it is stored in a shard.

Order matters: it is the order in which the shared vocabulary assigns id ranges (see
``fourm/vocab.py``), so new modalities are appended, never inserted.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Modality:
    """One modality.

    Attributes:
        name: registry name, used in configs and on the command line (``rgb``, ``depth``, ...).
        member: the WebDataset member suffix holding it in a raw shard (``rgb.png``).
        kind: ``image`` (a 2D grid: tokenized to an image-like token grid), ``sequence``
            (tokenized to a 1D token sequence) or ``meta`` (not a model input; kept for evaluation).
        description: one line for ``--help`` texts and the README.
        optional: left out of a freshly built vocabulary even when its id spaces exist (``count``
            uses the text space, which every set has); added on request (``SharedVocab.build(...,
            modalities=...)`` or ``SharedVocab.grow``), so existing vocabularies keep their layout.
    """

    name: str
    member: str
    kind: str
    description: str
    optional: bool = False


MODALITIES: dict[str, Modality] = {
    m.name: m
    for m in (
        Modality("rgb", "rgb.png", "image", "R x R x 3 uint8 colour image"),
        Modality("depth", "depth.npy", "image", "R x R float32 metres along the camera axis"),
        Modality("semseg", "semseg.png", "image", "R x R uint8 class ids (manifest 'classes')"),
        Modality("boxes", "boxes.json", "sequence", "list of {bbox: [x0, y0, x1, y1] pixels, label}"),
        Modality("caption", "caption.txt", "sequence", "one UTF-8 sentence"),
        Modality("normals", "normals.png", "image", "R x R x 3 uint8 unit surface normal (camera frame: x right, y down, z forward; towards the camera) as round((n + 1) * 127.5)"),
        Modality("count", "count.txt", "sequence", "number of visible objects as text (e.g. '3')", optional=True),
        Modality("scene", "scene.json", "meta", "full scene description (synthetic data only)"),
        Modality("instance", "instance.png", "meta", "R x R uint8 object map: 0 no object, k the pixel shows the k-th box of boxes.json"),
    )
}

IMAGE_MODALITIES = tuple(n for n, m in MODALITIES.items() if m.kind == "image")
SEQUENCE_MODALITIES = tuple(n for n, m in MODALITIES.items() if m.kind == "sequence")


def get_modality(name: str) -> Modality:
    """Look a modality up by name; the error lists the known ones."""
    try:
        return MODALITIES[name]
    except KeyError:
        raise KeyError(f"unknown modality {name!r}; known: {', '.join(MODALITIES)}") from None


def parse_modalities(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``"rgb,depth"`` or a list -> validated tuple of names, in the given order, no duplicates."""
    names = [t.strip() for t in text.split(",")] if isinstance(text, str) else list(text)
    names = [n for n in names if n]
    if not names:
        raise ValueError("no modality given")
    for n in names:
        get_modality(n)
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate modality in {names}")
    return tuple(names)
