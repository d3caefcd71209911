"""Captions for rendered scenes: every visible object named with size, colour and shape, and
spatial relations (camera-relative) between them, with varied wording."""

from __future__ import annotations

import numpy as np

from fourm.data.synth.scene import Scene, SceneObject

# every wording of each relation (the evaluation parses captions with these)
RELATION_PHRASES = {
    "left": ("left of", "to the left of", "on the left of"),
    "right": ("right of", "to the right of", "on the right of"),
    "front": ("in front of", "closer than"),
    "behind": ("behind", "farther away than"),
}
_OPENERS_ONE = ("{a}", "there is {a}", "{a} on the ground", "a rendering of {a}", "a scene with only {a}", "{a} stands alone")
_OPENERS_MANY = ("{s}", "there is {s}", "a scene with {s}", "we see {s}", "{s} on the ground")
_JOINERS = (", and ", ", with ", "; ", ", plus ")


def relation(a: SceneObject, b: SceneObject, scene: Scene) -> str:
    """Where ``a`` is relative to ``b`` from the camera: ``left``, ``right``, ``front`` or ``behind``.

    The axis with the larger camera-space offset between the two centres wins.
    """
    right, _, forward = scene.camera.basis()
    delta = a.center - b.center
    dx, dz = float(delta @ right), float(delta @ forward)
    if abs(dx) >= abs(dz):
        return "left" if dx < 0 else "right"
    return "front" if dz < 0 else "behind"


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _reference(obj: SceneObject, others: list[SceneObject]) -> str:
    """A short definite mention: ``the red sphere``, with the size when that is ambiguous."""
    short = f"{obj.color} {obj.shape}"
    clash = any(o is not obj and f"{o.color} {o.shape}" == short for o in others)
    return "the " + (obj.label if clash else short)


def make_caption(scene: Scene, rng: np.random.Generator) -> str:
    """One sentence naming every object with ``visible_pixels > 0`` (call ``render_scene`` first).

    The first mention of each object is its full label (``a large red sphere``); from the second
    object on, each is placed relative to an earlier one.
    """
    visible = [o for o in scene.objects if o.visible_pixels > 0]
    if not visible:
        return "an empty ground plane"
    order = [visible[i] for i in rng.permutation(len(visible))]
    if len(order) == 1:
        template = _OPENERS_ONE[int(rng.integers(len(_OPENERS_ONE)))]
        return template.format(a=_article(order[0].label))

    def placed(obj: SceneObject, ref: SceneObject, definite: bool) -> str:
        words = RELATION_PHRASES[relation(obj, ref, scene)]
        rel = words[int(rng.integers(len(words)))]
        target = _reference(ref, visible) if definite else _article(ref.label)
        return f"{_article(obj.label)} {rel} {target}"

    text = placed(order[0], order[1], definite=False)
    for k in range(2, len(order)):
        # relate to an earlier object with another label when there is one, so that
        # "a large red cube left of the large red cube" cannot happen
        earlier = [o for o in order[:k] if o.label != order[k].label] or order[:k]
        ref = earlier[int(rng.integers(len(earlier)))]
        text += _JOINERS[int(rng.integers(len(_JOINERS)))] + placed(order[k], ref, definite=True)
    template = _OPENERS_MANY[int(rng.integers(len(_OPENERS_MANY)))]
    return template.format(s=text)
