"""The embedded synthetic multimodal dataset: ray-cast 3D scenes with exact RGB, depth,
segmentation, boxes and captions. ``sample_scene`` -> ``render_scene`` -> ``make_caption``."""

from fourm.data.synth.caption import make_caption
from fourm.data.synth.render import RenderResult, render_scene
from fourm.data.synth.scene import CLASSES, COLORS, SHAPES, SIZES, Camera, Scene, SceneObject, sample_scene

__all__ = [
    "CLASSES",
    "COLORS",
    "SHAPES",
    "SIZES",
    "Camera",
    "RenderResult",
    "Scene",
    "SceneObject",
    "make_caption",
    "render_scene",
    "sample_scene",
]
