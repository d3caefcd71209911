"""A small numpy ray caster: exact depth, occlusion, Lambert + Blinn-Phong shading, hard shadows.

One primary ray per pixel (no anti-aliasing), so RGB, depth, segmentation and instance maps agree
pixel for pixel. Depth is the z-distance along the camera axis in metres; rays that hit nothing
(sky, beyond the ground disk) get the far-plane depth ``FAR``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fourm.data.synth.scene import CLASSES, COLORS, Scene, SceneObject

FAR = 40.0  # metres: depth of background pixels (a far plane)
GROUND_RADIUS = 14.0  # metres: the ground is a disk around the origin
EPS = 1e-6
AMBIENT = 0.3
SPECULAR = 0.25
SHININESS = 32.0
SKY_HORIZON = np.array([0.80, 0.85, 0.92])
SKY_ZENITH = np.array([0.35, 0.52, 0.82])


@dataclass
class RenderResult:
    """One rendered view.

    Attributes:
        rgb: (R, R, 3) uint8.
        depth: (R, R) float32 metres along the camera axis, finite and > 0.
        semseg: (R, R) uint8 class ids into ``CLASSES``.
        instance: (R, R) int16: -2 background, -1 ground, k >= 0 the k-th scene object.
        normals: (R, R, 3) float32 exact unit surface normals in the camera frame (x right, y
            down, z forward), facing the camera; background pixels get the far plane's (0, 0, -1).
    """

    rgb: np.ndarray
    depth: np.ndarray
    semseg: np.ndarray
    instance: np.ndarray
    normals: np.ndarray


def _srgb_to_linear(rgb8: tuple[int, int, int]) -> np.ndarray:
    return (np.asarray(rgb8, float) / 255.0) ** 2.2


def _hit_sphere(o: np.ndarray, d: np.ndarray, obj: SceneObject) -> np.ndarray:
    """Ray parameter of the first hit, inf where missed. o: (N, 3) or (3,), d: (N, 3) -> (N,)."""
    r = obj.half_extent
    oc = o - obj.center
    b = np.einsum("...i,...i->...", oc, d) if oc.ndim == 2 else d @ oc
    c = (oc * oc).sum(-1) - r * r
    disc = b * b - c
    sq = np.sqrt(np.maximum(disc, 0.0))
    t = -b - sq
    t = np.where(t > EPS, t, -b + sq)
    return np.where((disc >= 0.0) & (t > EPS), t, np.inf)


def _normal_sphere(p: np.ndarray, obj: SceneObject) -> np.ndarray:
    return (p - obj.center) / obj.half_extent


def _rot(obj: SceneObject) -> tuple[float, float]:
    return math.cos(obj.rotation), math.sin(obj.rotation)


def _to_local(v: np.ndarray, ca: float, sa: float) -> np.ndarray:
    # inverse of the rotation about y by the object's angle
    return np.stack([ca * v[..., 0] - sa * v[..., 2], v[..., 1], sa * v[..., 0] + ca * v[..., 2]], -1)


def _to_world(v: np.ndarray, ca: float, sa: float) -> np.ndarray:
    return np.stack([ca * v[..., 0] + sa * v[..., 2], v[..., 1], -sa * v[..., 0] + ca * v[..., 2]], -1)


def _box_slabs(o: np.ndarray, d: np.ndarray, obj: SceneObject) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ca, sa = _rot(obj)
    h = obj.half_extent
    ol = _to_local(o - obj.center, ca, sa)
    dl = _to_local(d, ca, sa)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / dl
        t1 = (-h - ol) * inv
        t2 = (h - ol) * inv
    tlo = np.minimum(t1, t2)
    thi = np.maximum(t1, t2)
    return tlo, thi, dl


def _hit_cube(o: np.ndarray, d: np.ndarray, obj: SceneObject) -> np.ndarray:
    tlo, thi, _ = _box_slabs(o, d, obj)
    tmin = tlo.max(-1)
    tmax = thi.min(-1)
    t = np.where(tmin > EPS, tmin, tmax)
    ok = (tmax >= tmin) & (t > EPS)
    return np.where(ok, t, np.inf)


def _normal_cube(p: np.ndarray, obj: SceneObject) -> np.ndarray:
    ca, sa = _rot(obj)
    pl = _to_local(p - obj.center, ca, sa) / obj.half_extent
    axis = np.abs(pl).argmax(-1)
    n = np.zeros_like(pl)
    rows = np.arange(len(pl))
    n[rows, axis] = np.sign(pl[rows, axis])
    return _to_world(n, ca, sa)


def _hit_cylinder(o: np.ndarray, d: np.ndarray, obj: SceneObject) -> np.ndarray:
    r, hgt = obj.half_extent, obj.height
    cx, cz = obj.position
    ox = o[..., 0] - cx
    oz = o[..., 2] - cz
    oy = o[..., 1]
    dx, dy, dz = d[..., 0], d[..., 1], d[..., 2]
    a = dx * dx + dz * dz
    b = ox * dx + oz * dz
    c = ox * ox + oz * oz - r * r
    disc = b * b - a * c
    with np.errstate(divide="ignore", invalid="ignore"):
        sq = np.sqrt(np.maximum(disc, 0.0))
        t_side = (-b - sq) / a
        t_side = np.where(t_side > EPS, t_side, (-b + sq) / a)
        y_side = oy + t_side * dy
        side_ok = (disc >= 0.0) & (a > 0.0) & (t_side > EPS) & (y_side >= 0.0) & (y_side <= hgt)
        t_cap = (hgt - oy) / dy
    px = ox + t_cap * dx
    pz = oz + t_cap * dz
    cap_ok = (t_cap > EPS) & (px * px + pz * pz <= r * r)
    return np.minimum(np.where(side_ok, t_side, np.inf), np.where(cap_ok, t_cap, np.inf))


def _normal_cylinder(p: np.ndarray, obj: SceneObject) -> np.ndarray:
    cx, cz = obj.position
    side = np.stack([p[:, 0] - cx, np.zeros(len(p)), p[:, 2] - cz], -1) / obj.half_extent
    on_cap = p[:, 1] >= obj.height - 1e-6
    side[on_cap] = (0.0, 1.0, 0.0)
    return side


_HIT = {"sphere": _hit_sphere, "cube": _hit_cube, "cylinder": _hit_cylinder}
_NORMAL = {"sphere": _normal_sphere, "cube": _normal_cube, "cylinder": _normal_cylinder}


def _hit_ground(o: np.ndarray, d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        t = -o[..., 1] / d[:, 1]
    px = o[..., 0] + t * d[:, 0]
    pz = o[..., 2] + t * d[:, 2]
    ok = (d[:, 1] < 0.0) & (t > EPS) & (px * px + pz * pz <= GROUND_RADIUS**2)
    return np.where(ok, t, np.inf)


def camera_rays(scene: Scene, res: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Primary rays through pixel centres, row-major from the top-left.

    Returns:
        origin (3,), unit directions (res*res, 3), camera forward axis (3,).
    """
    right, up, forward = scene.camera.basis()
    half = math.tan(math.radians(scene.camera.fov_deg) / 2.0)
    coords = (np.arange(res) + 0.5) / res * 2.0 - 1.0
    u = np.tile(coords, res) * half  # column -> right
    v = -np.repeat(coords, res) * half  # row -> down
    dirs = forward[None] + u[:, None] * right[None] + v[:, None] * up[None]
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    return np.asarray(scene.camera.position, float), dirs, forward


def render_scene(scene: Scene, res: int) -> RenderResult:
    """Ray-cast ``scene`` at ``res`` x ``res`` pixels; also fills each object's ``visible_pixels``."""
    origin, dirs, forward = camera_rays(scene, res)
    n_pix = dirs.shape[0]
    # (K + 1, N): ground first, then each object
    ts = np.stack([_hit_ground(origin, dirs)] + [_HIT[o.shape](origin, dirs, o) for o in scene.objects])
    nearest = ts.argmin(0)
    t = ts[nearest, np.arange(n_pix)]
    hit = np.isfinite(t)
    instance = np.where(hit, nearest - 1, -2).astype(np.int16)  # -2 background, -1 ground, k object

    # z-depth along the camera axis; background on the far plane
    depth = np.where(hit, t * (dirs @ forward), FAR).astype(np.float32)

    class_of = np.array([CLASSES.index("background"), CLASSES.index("ground")] + [CLASSES.index(o.shape) for o in scene.objects], np.uint8)
    semseg = class_of[instance.astype(np.int64) + 2]

    # shading
    light = np.asarray(scene.light_direction, float)
    sky_w = np.clip(dirs[:, 1] * 4.0 + 0.2, 0.0, 1.0)[:, None]
    color = (1.0 - sky_w) * SKY_HORIZON + sky_w * SKY_ZENITH
    normals = np.tile(np.array([0.0, 0.0, -1.0]), (n_pix, 1))
    idx = np.nonzero(hit)[0]
    if idx.size:
        p = origin + t[idx, None] * dirs[idx]
        normal = np.empty_like(p)
        albedo = np.empty_like(p)
        shiny = np.zeros(len(idx))
        inst = instance[idx]
        g = inst == -1
        normal[g] = (0.0, 1.0, 0.0)
        albedo[g] = _srgb_to_linear(scene.ground_color)
        for k, obj in enumerate(scene.objects):
            m = inst == k
            if m.any():
                normal[m] = _NORMAL[obj.shape](p[m], obj)
                albedo[m] = _srgb_to_linear(COLORS[obj.color])
                shiny[m] = 1.0
        right, up, _ = scene.camera.basis()
        normals[idx] = np.stack([normal @ right, -(normal @ up), normal @ forward], -1)
        lambert = np.clip(normal @ light, 0.0, None)
        # hard shadows: is anything between the hit point and the light?
        shadow_o = p + 1e-4 * normal
        lit = np.ones(len(idx), bool)
        for obj in scene.objects:
            lit &= ~np.isfinite(_HIT[obj.shape](shadow_o, np.broadcast_to(light, p.shape), obj))
        half_vec = light[None] - dirs[idx]
        half_vec /= np.linalg.norm(half_vec, axis=1, keepdims=True)
        spec = SPECULAR * shiny * np.clip((normal * half_vec).sum(-1), 0.0, None) ** SHININESS
        direct = lambert * lit
        color[idx] = albedo * (AMBIENT + (1.0 - AMBIENT) * direct[:, None]) + (spec * direct)[:, None]
    rgb = (np.clip(color, 0.0, 1.0) ** (1.0 / 2.2) * 255.0 + 0.5).astype(np.uint8)

    counts = np.bincount(instance[instance >= 0].astype(np.int64), minlength=len(scene.objects))
    for obj, c in zip(scene.objects, counts):
        obj.visible_pixels = int(c)
    return RenderResult(
        rgb=rgb.reshape(res, res, 3),
        depth=depth.reshape(res, res),
        semseg=semseg.reshape(res, res),
        instance=instance.reshape(res, res),
        normals=normals.reshape(res, res, 3).astype(np.float32),
    )


def tight_boxes(instance: np.ndarray, n_objects: int) -> list[tuple[int, int, int, int] | None]:
    """Tight pixel box of each object's visible pixels.

    Args:
        instance: (R, R) instance map from ``render_scene``.
        n_objects: number of scene objects.
    Returns:
        per object ``(x0, y0, x1, y1)`` in pixel-edge coordinates (x1, y1 exclusive), or None when
        the object has no visible pixel.
    """
    out: list[tuple[int, int, int, int] | None] = []
    for k in range(n_objects):
        mask = instance == k
        if not mask.any():
            out.append(None)
            continue
        rows = np.nonzero(mask.any(1))[0]
        cols = np.nonzero(mask.any(0))[0]
        out.append((int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1))
    return out


def object_masks(scene: Scene, res: int) -> np.ndarray:
    """Each object's own silhouette, as if the other objects were not there (occlusion, not
    the frame, removed): (K, R, R) bool. Beside ``RenderResult.instance`` it tells how much of an
    object is hidden behind others; a silhouette on the image border is cut by the frame."""
    origin, dirs, _ = camera_rays(scene, res)
    if not scene.objects:
        return np.zeros((0, res, res), bool)
    return np.stack([np.isfinite(_HIT[o.shape](origin, dirs, o)).reshape(res, res) for o in scene.objects])
