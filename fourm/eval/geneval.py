"""A GenEval-style text -> image benchmark on the rendered scenes.

GenEval (Ghosh et al. 2023) scores a text-to-image model per image on six tasks, each with its own
rule, and reports the mean over tasks. Its counterpart here speaks the scenes' caption grammar:

| task | prompt names | passes when the judge finds |
| --- | --- | --- |
| single_object | one object | an object of its shape |
| two_object | two objects of different shapes (and, as every caption, how they stand) | both shapes |
| counting | 1-5 objects of one colour and shape | exactly that many of that colour and shape |
| colors | one object | an object of its shape in its colour |
| position | two objects of different shapes, one left of / right of / in front of / behind the other | both shapes, standing so |
| color_attr | two objects of different shapes and colours | both, each in its own colour |

Every prompt comes with its spec (``PromptSpec``) and a true image: a scene built to satisfy it,
rendered, and captioned by the dataset's own ``make_caption`` (so the prompt is worded as the
training captions are, and the grammar lives in one place). Scenes avoid what a judge cannot see,
as GenEval's prompts do: every object is fully in the frame, at least ``min_object_pixels``
large, at most ``1 - min_visible`` hidden behind others, no two objects of one colour touch in the
image, and a position prompt's relation shows in the image by ``relation_margin`` pixels.

Beside the model's score on the images it generates, three figures say what the score can mean:
the judge on the true images (how far the judge itself can be trusted; with its trained segmenter
and with the renderer's own segmentation), the floor (the judge on true images of *other* prompts
of the task) and the ceiling (the judge on the rgb tokenizer's round trips of the true images: the
best a generator of rgb tokens can show it).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np
import torch
from tqdm import tqdm

from fourm.data.synth.caption import RELATION_PHRASES, make_caption, relation
from fourm.data.synth.render import RenderResult, object_masks, render_scene
from fourm.data.synth.scene import COLORS, PLACEMENT_HALF_EXTENT, SHAPES, SIZES, Scene, SceneObject, sample_scene
from fourm.eval.captions import Mentioned, parse_caption
from fourm.eval.judge import find_objects, relation_holds, relation_margin, round_trip

log = logging.getLogger(__name__)

TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = tuple(RELATION_PHRASES)  # left, right, front, behind
INVERSE = {"left": "right", "right": "left", "front": "behind", "behind": "front"}
BY_SHAPE = ("single_object", "two_object", "position")  # GenEval's class-only tasks; the others read colour too


@dataclass
class GenevalConfig:
    """The prompt set: how many a task, from which seed, and how clean the true images are."""

    prompts: int = 64  # per task
    seed: int = 0
    res: int = 64  # the true images' resolution (the rgb tokenizer's)
    tasks: tuple[str, ...] = TASKS
    max_count: int = 5  # counting asks for 1..max_count objects
    min_object_pixels: int = 24  # every object at least this many visible pixels
    min_visible: float = 0.8  # and at least this share of its own silhouette not hidden by others
    relation_margin: float = 3.0  # pixels by which a position prompt's relation shows in the image
    gap: float = 0.3  # metres between objects' footprints (the dataset's 0.15 lets more touch)
    max_tries: int = 300  # scenes drawn for a spec before drawing another spec (e.g. five large cubes that never fit apart)
    max_specs: int = 20  # specs drawn for a prompt before giving up

    def __post_init__(self) -> None:
        for name in ("prompts", "max_count", "min_object_pixels", "max_tries", "max_specs"):
            if getattr(self, name) < 1:
                raise ValueError(f"geneval {name} must be >= 1, got {getattr(self, name)}")
        if self.res < 16:
            raise ValueError(f"geneval res must be >= 16, got {self.res}")
        if not 0.0 <= self.min_visible <= 1.0:
            raise ValueError(f"geneval min_visible must be in [0, 1], got {self.min_visible}")
        if not (self.relation_margin >= 0 and self.gap >= 0):
            raise ValueError(f"geneval relation_margin and gap must be >= 0, got {self.relation_margin} and {self.gap}")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise ValueError(f"geneval tasks must be a non-empty subset of {', '.join(TASKS)}, got {list(self.tasks)}")


@dataclass(frozen=True)
class PromptSpec:
    """What a prompt asks for: its objects (colour, shape, size, in the order drawn) and, for
    position, ``(i, rel, j)``: ``objects[i]`` is ``rel`` of ``objects[j]``."""

    task: str
    objects: tuple[Mentioned, ...]
    relation: tuple[int, str, int] | None = None

    @property
    def count(self) -> int:
        return len(self.objects)

    def to_json(self) -> dict:
        out = {"task": self.task, "objects": [{"size": o.size, "color": o.color, "shape": o.shape} for o in self.objects]}
        if self.task == "counting":
            out["count"] = self.count
        if self.relation is not None:
            out["relation"] = list(self.relation)
        return out


@dataclass
class GenevalPrompt:
    """One prompt with its spec and its true image: rgb (R, R, 3) uint8 and the renderer's
    segmentation (R, R) class ids."""

    prompt: str
    spec: PromptSpec
    scene: Scene
    rgb: np.ndarray
    semseg: np.ndarray


def sample_spec(task: str, index: int, rng: np.random.Generator, max_count: int = 5) -> PromptSpec:
    """The spec of prompt ``index`` of ``task``; counts cycle through 1..max_count and relations
    through left, right, front, behind, so every value has its share of the prompts."""

    if task not in TASKS:
        raise ValueError(f"unknown geneval task {task!r}; known: {', '.join(TASKS)}")

    def size() -> str:
        return tuple(SIZES)[int(rng.integers(len(SIZES)))]

    colors = [tuple(COLORS)[int(i)] for i in rng.permutation(len(COLORS))[:2]]
    shapes = [SHAPES[int(i)] for i in rng.permutation(len(SHAPES))[:2]]
    if task in ("single_object", "colors"):
        return PromptSpec(task, (Mentioned(colors[0], shapes[0], size()),))
    if task == "counting":
        return PromptSpec(task, tuple(Mentioned(colors[0], shapes[0], size()) for _ in range(1 + index % max_count)))
    if task in ("two_object", "position"):  # colours drawn independently: they may agree
        colors[1] = tuple(COLORS)[int(rng.integers(len(COLORS)))]
    rel = (0, RELATIONS[index % len(RELATIONS)], 1) if task == "position" else None
    return PromptSpec(task, tuple(Mentioned(c, s, size()) for c, s in zip(colors, shapes)), rel)


def _place(spec: PromptSpec, rng: np.random.Generator, gap: float, candidates: int = 64) -> list[SceneObject] | None:
    """The spec's objects at free spots of the placement square (each at least ``gap`` metres
    from the others' footprints), one batch of candidate spots per object; None when one has none."""
    placed: list[SceneObject] = []
    for m in spec.objects:
        rotation = float(rng.uniform(0.0, math.pi / 2))
        spots = rng.uniform(-PLACEMENT_HALF_EXTENT, PLACEMENT_HALF_EXTENT, size=(candidates, 2))
        probe = SceneObject(m.shape, m.color, m.size, (0.0, 0.0), rotation)
        free = np.ones(candidates, bool)
        for o in placed:
            free &= np.hypot(*(spots - np.asarray(o.position)).T) >= probe.footprint_radius + o.footprint_radius + gap
        if not free.any():
            return None
        x, z = spots[int(np.argmax(free))]
        placed.append(SceneObject(m.shape, m.color, m.size, (float(x), float(z)), rotation))
    return placed


def _region(mask: np.ndarray) -> dict:
    """The judge's reading of where a region is: {"cx", "bottom"} (mean column, lowest row)."""
    ys, xs = np.nonzero(mask)
    return {"cx": float(xs.mean()), "bottom": float(ys.max())}


def scene_problems(spec: PromptSpec, scene: Scene, view: RenderResult, silhouettes: np.ndarray, config: GenevalConfig) -> list[str]:
    """Why a rendered scene is not a clean true image of ``spec`` (empty: it is one).

    Args:
        silhouettes: (K, R, R) bool, each object's own silhouette (``object_masks``).
    """
    from scipy import ndimage

    problems = []
    seen = [view.instance == k for k in range(len(scene.objects))]
    for k, (own, mask) in enumerate(zip(silhouettes, seen)):
        if own[0].any() or own[-1].any() or own[:, 0].any() or own[:, -1].any():
            problems.append(f"object {k} is cut by the frame")
        elif mask.sum() < config.min_object_pixels:
            problems.append(f"object {k} shows {int(mask.sum())} pixels")
        elif mask.sum() < config.min_visible * own.sum():
            problems.append(f"object {k} is {1 - mask.sum() / own.sum():.0%} hidden")
    for a, b in combinations(range(len(scene.objects)), 2):
        if scene.objects[a].color == scene.objects[b].color and (ndimage.binary_dilation(seen[a], np.ones((3, 3), bool)) & seen[b]).any():
            problems.append(f"objects {a} and {b} of one colour touch")
    if spec.relation is not None and not problems:
        i, rel, j = spec.relation
        if relation(scene.objects[i], scene.objects[j], scene) != rel:
            problems.append(f"the caption would not say {rel}")
        elif relation_margin(rel, _region(seen[i]), _region(seen[j])) < config.relation_margin:
            problems.append(f"{rel} shows by under {config.relation_margin} pixels")
    return problems


def true_scene(spec: PromptSpec, rng: np.random.Generator, config: GenevalConfig) -> tuple[Scene, RenderResult]:
    """A scene of exactly the spec's objects that ``scene_problems`` finds clean, rendered
    (camera, light and ground as the dataset draws them). RuntimeError after ``max_tries``."""
    for _ in range(config.max_tries):
        base = sample_scene(rng, max_objects=1)
        objects = _place(spec, rng, config.gap)
        if objects is None:
            continue
        scene = Scene(objects, base.camera, base.light_direction, base.ground_color)
        if spec.relation is not None and relation(objects[spec.relation[0]], objects[spec.relation[2]], scene) != spec.relation[1]:
            continue  # cheap to tell before rendering
        view = render_scene(scene, config.res)
        if not scene_problems(spec, scene, view, object_masks(scene, config.res), config):
            return scene, view
    raise RuntimeError(f"no clean scene for {spec} in {config.max_tries} tries")


def make_prompts(config: GenevalConfig | None = None, progress: bool = False) -> list[GenevalPrompt]:
    """``config.prompts`` prompts a task, tasks in ``config.tasks`` order. Prompt ``i`` of a task
    is drawn from ``default_rng([seed, task's index in TASKS, i])``: the same whatever the number
    of prompts or the tasks asked for. A spec with no clean scene in ``max_tries`` draws is
    replaced by another (its count or relation kept), as GenEval's prompts leave out what a judge
    cannot see."""
    config = config or GenevalConfig()
    out = []
    bar = tqdm(total=config.prompts * len(config.tasks), desc="geneval prompts", disable=not progress, leave=False)
    for task in config.tasks:
        for i in range(config.prompts):
            rng = np.random.default_rng([config.seed, TASKS.index(task), i])
            for _ in range(config.max_specs):
                spec = sample_spec(task, i, rng, config.max_count)
                try:
                    scene, view = true_scene(spec, rng, config)
                    break
                except RuntimeError:
                    continue  # a spec whose true image the judge could not see: draw another
            else:
                raise RuntimeError(f"geneval {task} prompt {i}: no spec with a clean scene in {config.max_specs} draws")
            out.append(GenevalPrompt(make_caption(scene, rng), spec, scene, view.rgb, view.semseg))
            bar.update()
    bar.close()
    return out


def spec_of_prompt(prompt: str, task: str) -> PromptSpec:
    """Read a prompt back (``parse_caption``) into the spec it states: its objects in the order
    named and, for position, its one relation."""
    parsed = parse_caption(prompt)
    rel = parsed.relations[0] if task == "position" and len(parsed.relations) == 1 else None
    return PromptSpec(task, tuple(parsed.objects), rel)


def same_spec(a: PromptSpec, b: PromptSpec) -> bool:
    """Two specs ask for the same: one task, one multiset of objects, and the same relation
    between the same objects (``x left of y`` is ``y right of x``)."""
    if a.task != b.task or Counter(a.objects) != Counter(b.objects):
        return False
    if a.relation is None or b.relation is None:
        return a.relation is None and b.relation is None

    def stated(spec: PromptSpec) -> set:
        i, rel, j = spec.relation
        x, y = spec.objects[i], spec.objects[j]
        return {(x, rel, y), (y, INVERSE[rel], x)}

    return bool(stated(a) & stated(b))


# ---- scoring ---------------------------------------------------------------------------------


@dataclass
class Verdict:
    """The judge on one image for one prompt: pass or fail, and what it found
    (``find_objects``' dicts: shape, color, cx, bottom, pixels)."""

    task: str
    passed: bool
    found: list[dict] = field(default_factory=list)

    @property
    def reading(self) -> str:
        """What the judge saw, in words: ``2: red sphere, blue cube``."""
        names = Counter(f"{f['color']} {f['shape']}" for f in self.found)
        return f"{len(self.found)}: " + (", ".join(f"{n}x {k}" if n > 1 else k for k, n in names.most_common()) or "nothing")


def _key(task: str, o) -> tuple:
    """What a task matches objects by: the shape alone for GenEval's class-only tasks, else
    (colour, shape); ``o`` a ``Mentioned`` or a found object's dict."""
    color, shape = (o["color"], o["shape"]) if isinstance(o, dict) else (o.color, o.shape)
    return (shape,) if task in BY_SHAPE else (color, shape)


def passes(spec: PromptSpec, found: list[dict]) -> bool:
    """GenEval's rule for ``spec.task`` on the objects the judge ``found`` (module docstring)."""
    named, seen = Counter(_key(spec.task, o) for o in spec.objects), Counter(_key(spec.task, f) for f in found)
    if spec.task == "counting":
        return all(seen[k] == n for k, n in named.items())
    if not all(seen[k] >= n for k, n in named.items()):
        return False
    if spec.relation is None:
        return True
    i, rel, j = spec.relation
    a, b = _key(spec.task, spec.objects[i]), _key(spec.task, spec.objects[j])
    return any(relation_holds(rel, x, y) for x in found if _key(spec.task, x) == a for y in found if _key(spec.task, y) == b and y is not x)


def judge_prompts(prompts: list[GenevalPrompt], images: torch.Tensor, segmenter=None, semseg: torch.Tensor | np.ndarray | None = None, min_pixels: int = 8, batch_size: int = 64) -> list[Verdict]:
    """One verdict per prompt for ``images`` (N, 3, R, R) uint8, the i-th image judged against
    the i-th prompt. Shapes come from ``segmenter`` (the judge's ``Segmenter``) or, given
    ``semseg`` (N, R, R) instead, from that segmentation (the renderer's, for true images)."""
    if (segmenter is None) == (semseg is None):
        raise ValueError("judge_prompts needs exactly one of a segmenter and a segmentation")
    images = torch.as_tensor(images)
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    if segmenter is not None:
        seg = torch.cat([segmenter.segment(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]).numpy() if len(images) else np.zeros((0,) + tuple(images.shape[-2:]), np.int64)
    else:
        seg = np.asarray(semseg).astype(np.int64)
    hwc = images.permute(0, 2, 3, 1).numpy()
    out = []
    for p, rgb, s in zip(prompts, hwc, seg):
        found = find_objects(rgb, s, min_pixels)
        out.append(Verdict(p.spec.task, passes(p.spec, found), found))
    return out


def task_scores(verdicts: list[Verdict]) -> dict[str, float]:
    """Share of images passing per task, and ``overall``: the mean over the tasks present."""
    by_task: dict[str, list[bool]] = {}
    for v in verdicts:
        by_task.setdefault(v.task, []).append(v.passed)
    scores = {t: sum(by_task[t]) / len(by_task[t]) for t in TASKS if t in by_task}
    scores["overall"] = sum(scores.values()) / len(scores) if scores else 0.0
    return scores


def other_prompts(prompts: list[GenevalPrompt]) -> list[int]:
    """For the floor: per prompt, the index of the next prompt of its task (cyclically)."""
    order = list(range(len(prompts)))
    for task in {p.spec.task for p in prompts}:
        idx = [i for i, p in enumerate(prompts) if p.spec.task == task]
        for a, b in zip(idx, idx[1:] + idx[:1]):
            order[a] = b
    return order


def true_images(prompts: list[GenevalPrompt]) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts' true images (N, 3, R, R) uint8 and the renderer's segmentations (N, R, R)."""
    rgb = torch.from_numpy(np.stack([p.rgb for p in prompts])).permute(0, 3, 1, 2).contiguous()
    return rgb, torch.from_numpy(np.stack([p.semseg for p in prompts]).astype(np.int64))


def generate_images(model, tokenizers, prompts: list[GenevalPrompt], config=None, batch_size: int = 16, progress: bool = False) -> torch.Tensor:
    """One image per prompt from ``fourm.generation``: (N, 3, R, R) uint8. ``config``: a
    ``GenerationConfig`` (default: the evaluation suite's caption -> rgb sampling)."""
    from fourm.generation.api import generate, text_to_image_config

    config = config or text_to_image_config()
    out = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="geneval generate", disable=not progress):
        out += generate(model, tokenizers, {"caption": [p.prompt for p in prompts[i : i + batch_size]]}, ["rgb"], config).outputs["rgb"]
    return torch.stack(out).round().clamp(0, 255).to(torch.uint8)


@dataclass
class GenevalResult:
    """``figures``: per part (``model``, ``floor``, ``ceiling``, ``true_images``, and with the
    renderer's segmentation ``true_images_renderer``, ``floor_renderer``, ``ceiling_renderer``)
    the task scores and ``overall``; ``prompts``: how many a task. ``verdicts``: per part, one per
    prompt. Parts that could not be measured (no segmenter, no tokenizers, no model) are absent."""

    figures: dict
    verdicts: dict[str, list[Verdict]]


def run_geneval(prompts: list[GenevalPrompt], segmenter=None, tokenizers=None, generated: torch.Tensor | None = None, min_pixels: int = 8) -> GenevalResult:
    """Every figure of the benchmark. ``segmenter``: the judge's (the parts without
    ``_renderer``); ``tokenizers``: for the ceiling; ``generated``: the model's images, one per
    prompt (N, 3, R, R) uint8 (``generate_images``)."""
    rgb, semseg = true_images(prompts)
    other = torch.tensor(other_prompts(prompts), dtype=torch.long)
    parts = {"true_images_renderer": judge_prompts(prompts, rgb, semseg=semseg, min_pixels=min_pixels), "floor_renderer": judge_prompts(prompts, rgb[other], semseg=semseg[other], min_pixels=min_pixels)}
    decoded = round_trip(tokenizers, rgb) if tokenizers is not None else None
    if decoded is not None:
        parts["ceiling_renderer"] = judge_prompts(prompts, decoded, semseg=semseg, min_pixels=min_pixels)
    if segmenter is not None:
        parts["true_images"] = judge_prompts(prompts, rgb, segmenter, min_pixels=min_pixels)
        parts["floor"] = judge_prompts(prompts, rgb[other], segmenter, min_pixels=min_pixels)
        if decoded is not None:
            parts["ceiling"] = judge_prompts(prompts, decoded, segmenter, min_pixels=min_pixels)
        if generated is not None:
            parts["model"] = judge_prompts(prompts, generated, segmenter, min_pixels=min_pixels)
    figures: dict = {"prompts": dict(Counter(p.spec.task for p in prompts))}
    figures.update({name: task_scores(v) for name, v in parts.items()})
    return GenevalResult(figures, parts)


# ---- reporting -------------------------------------------------------------------------------

PARTS = {  # figure part -> column heading, in the table's order
    "floor": "floor",
    "model": "model",
    "ceiling": "ceiling",
    "true_images": "judge on true",
    "floor_renderer": "floor (renderer seg.)",
    "ceiling_renderer": "ceiling (renderer seg.)",
    "true_images_renderer": "judge on true (renderer seg.)",
}


def markdown(figures: dict) -> str:
    """The per-task table: prompts, then floor, model, ceiling and the judge on the true images,
    with the judge's segmenter and with the renderer's segmentation (the columns measured; the
    model's always, ``-`` when it was not)."""
    from fourm.cli import markdown_table

    prompts = figures.get("prompts", {})
    parts = [p for p in PARTS if p in figures or p == "model"]
    rows = []
    for t in [t for t in TASKS if t in prompts] + ["overall"]:
        n = sum(prompts.values()) if t == "overall" else prompts[t]
        rows.append([t, n] + ["-" if figures.get(p, {}).get(t) is None else f"{figures[p][t]:.3f}" for p in parts])
    return markdown_table(["GenEval-style task", "prompts"] + [PARTS[p] for p in parts], rows)


def grid_picture(prompts: list[GenevalPrompt], images: torch.Tensor, verdicts: list[Verdict], per_task: int = 8, scale: int = 2) -> np.ndarray:
    """Per task a row of (at most ``per_task``) prompts -> images, each framed green (pass) or red
    (fail) and labelled with the prompt and the judge's reading: (H, W, 3) uint8."""
    from fourm.viz import grid, labelled_cell, title_strip

    rows = []
    for task in TASKS:
        idx = [i for i, p in enumerate(prompts) if p.spec.task == task][:per_task]
        if not idx:
            continue
        cells = [labelled_cell(images[i].permute(1, 2, 0).numpy(), ["judge: " + verdicts[i].reading, prompts[i].prompt], verdicts[i].passed, scale) for i in idx]
        block = grid([cells])
        passed = sum(v.passed for v in verdicts if v.task == task)
        rows += [[title_strip(f"{task}: {passed} of {sum(v.task == task for v in verdicts)} prompts pass", block.shape[1])], [block]]
    return grid(rows, pad=0)
