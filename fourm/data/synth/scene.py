"""Scene description and sampling for the embedded dataset.

World frame: metres, y up, the ground is the plane y = 0. Objects stand on the ground.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

SHAPES = ("sphere", "cube", "cylinder")
# semseg class ids: 0 background (sky), 1 ground, then one class per shape, in SHAPES order
CLASSES = ("background", "ground") + SHAPES
# CLEVR's palette (sRGB 0..255)
COLORS = {
    "gray": (87, 87, 87),
    "red": (173, 35, 35),
    "blue": (42, 75, 215),
    "green": (29, 105, 20),
    "brown": (129, 74, 25),
    "purple": (129, 38, 192),
    "cyan": (41, 208, 208),
    "yellow": (255, 238, 51),
}
# characteristic half-extent in metres: sphere/cylinder radius, cube half side (cubes look larger)
SIZES = {"small": 0.4, "large": 0.75}
# every box label the grammar makes (``SceneObject.label``), in a fixed order: the manifest's
# ``box_labels``, which number the object classes of a dense label map (``fourm.data.object_labels``)
BOX_LABELS = tuple(f"{size} {color} {shape}" for size in SIZES for color in COLORS for shape in SHAPES)
CUBE_SCALE = 0.85
PLACEMENT_HALF_EXTENT = 2.7  # objects are placed in [-2.7, 2.7]^2 on the ground
MIN_GAP = 0.15  # metres between the bounding circles of two objects


@dataclass
class SceneObject:
    """One object. ``position`` is the centre of its footprint on the ground, (x, z) in metres."""

    shape: str
    color: str
    size: str
    position: tuple[float, float]
    rotation: float  # radians about the vertical axis (matters for cubes)
    visible_pixels: int = 0

    @property
    def half_extent(self) -> float:
        """Radius (sphere, cylinder) or half side (cube), metres."""
        return SIZES[self.size] * (CUBE_SCALE if self.shape == "cube" else 1.0)

    @property
    def height(self) -> float:
        """Height of the top above the ground, metres."""
        return 2.0 * self.half_extent

    @property
    def footprint_radius(self) -> float:
        """Radius of a circle on the ground that contains the object."""
        return self.half_extent * (math.sqrt(2.0) if self.shape == "cube" else 1.0)

    @property
    def center(self) -> np.ndarray:
        """3D centre of the object's volume, (3,)."""
        return np.array([self.position[0], self.half_extent, self.position[1]])

    @property
    def label(self) -> str:
        """``"<size> <color> <shape>"``: the box label and the caption's first mention."""
        return f"{self.size} {self.color} {self.shape}"


@dataclass
class Camera:
    """Pinhole camera looking from ``position`` at ``look_at`` with vertical field of view ``fov_deg``."""

    position: tuple[float, float, float]
    look_at: tuple[float, float, float]
    fov_deg: float

    def basis(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(right, up, forward) unit vectors in world coordinates, each (3,)."""
        forward = np.asarray(self.look_at, float) - np.asarray(self.position, float)
        forward /= np.linalg.norm(forward)
        right = np.cross(forward, [0.0, 1.0, 0.0])
        right /= np.linalg.norm(right)
        up = np.cross(right, forward)
        return right, up, forward


@dataclass
class Scene:
    """Everything needed to render one sample; serialised as ``scene.json``."""

    objects: list[SceneObject]
    camera: Camera
    light_direction: tuple[float, float, float]  # unit vector pointing towards the light
    ground_color: tuple[int, int, int]
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        """A JSON-ready dict: objects (with 3D centre), camera, light, ground colour."""
        out = asdict(self)
        for obj, d in zip(self.objects, out["objects"]):
            d["center"] = [round(float(v), 6) for v in obj.center]
            d["label"] = obj.label
        return out


def visible_objects(scene_json: dict) -> list[dict]:
    """The objects of a ``scene.json`` that show at least one pixel (captions name exactly these,
    and only these get a box); objects without a ``visible_pixels`` record count as visible."""
    return [o for o in scene_json["objects"] if o.get("visible_pixels", 1) > 0]


def _sample_camera(rng: np.random.Generator) -> Camera:
    # a CLEVR-like viewpoint, jittered
    azimuth = math.radians(45.0 + rng.uniform(-12.0, 12.0))
    elevation = math.radians(30.0 + rng.uniform(-5.0, 5.0))
    distance = 9.5 + rng.uniform(-0.5, 0.5)
    look_at = (rng.uniform(-0.3, 0.3), 0.0, rng.uniform(-0.3, 0.3))
    position = (
        look_at[0] + distance * math.cos(elevation) * math.sin(azimuth),
        distance * math.sin(elevation),
        look_at[2] + distance * math.cos(elevation) * math.cos(azimuth),
    )
    return Camera(position=position, look_at=look_at, fov_deg=float(38.0 + rng.uniform(-2.0, 2.0)))


def _sample_light(rng: np.random.Generator) -> tuple[float, float, float]:
    azimuth = rng.uniform(0.0, 2.0 * math.pi)
    elevation = math.radians(rng.uniform(35.0, 70.0))
    return (
        math.cos(elevation) * math.sin(azimuth),
        math.sin(elevation),
        math.cos(elevation) * math.cos(azimuth),
    )


def sample_scene(rng: np.random.Generator, max_objects: int = 5) -> Scene:
    """Draw a scene: 1..max_objects non-overlapping objects, a jittered camera, one light.

    Placement is rejection sampling; an object that finds no free spot in 100 tries is dropped
    (never the first one), so the count is at least 1.
    """
    n = int(rng.integers(1, max_objects + 1))
    objects: list[SceneObject] = []
    color_names = list(COLORS)
    for _ in range(n):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        color = color_names[int(rng.integers(len(color_names)))]
        size = ("small", "large")[int(rng.integers(2))]
        rotation = float(rng.uniform(0.0, math.pi / 2))
        for _try in range(100):
            xz = rng.uniform(-PLACEMENT_HALF_EXTENT, PLACEMENT_HALF_EXTENT, size=2)
            cand = SceneObject(shape, color, size, (float(xz[0]), float(xz[1])), rotation)
            if all(
                math.dist(cand.position, o.position) >= cand.footprint_radius + o.footprint_radius + MIN_GAP
                for o in objects
            ):
                objects.append(cand)
                break
    ground_level = int(rng.integers(150, 185))
    tint = rng.integers(-8, 9, size=3)
    ground_color = tuple(int(np.clip(ground_level + t, 0, 255)) for t in tint)
    return Scene(objects, _sample_camera(rng), _sample_light(rng), ground_color)
