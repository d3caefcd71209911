"""Surface normals from metric depth, and their shard encoding (``normals.png``).

Camera frame: x right, y down, z forward (pixel (row, col) looks along ``((col + 0.5 - W/2) / f,
(row + 0.5 - H/2) / f, 1)`` with ``f = (H / 2) / tan(fov / 2)``, the vertical field of view, as the
embedded renderer's pinhole camera). Normals are unit vectors pointing towards the camera, stored
as ``round((n + 1) * 127.5)`` in an RGB PNG.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fourm.data.codecs import encode_png

# a one-sided difference whose depth step is this many times the other side's is an occlusion edge
EDGE_RATIO = 3.0


def back_project(depth: np.ndarray, fov_deg: float) -> np.ndarray:
    """(H, W) z-depth in metres -> (H, W, 3) float64 camera-frame points (pinhole, vertical ``fov_deg``)."""
    h, w = depth.shape
    f = (h / 2.0) / math.tan(math.radians(fov_deg) / 2.0)
    x = (np.arange(w) + 0.5 - w / 2.0) / f
    y = (np.arange(h) + 0.5 - h / 2.0) / f
    z = depth.astype(np.float64)
    return np.stack([x[None, :] * z, y[:, None] * z, z], -1)


def _derivative(points: np.ndarray, axis: int) -> np.ndarray:
    """(H, W, 3) points -> (H, W, 3) derivative along ``axis`` (0 rows, 1 columns): the central
    difference, one-sided at the image border and across an occlusion edge (the side whose depth
    step is much the smaller)."""
    step = np.diff(points, axis=axis)  # (H-1, W, 3) or (H, W-1, 3)
    first = [slice(None)] * 3
    first[axis] = slice(0, 1)
    last = [slice(None)] * 3
    last[axis] = slice(-1, None)
    forward = np.concatenate([step, step[tuple(last)]], axis)  # p[i+1] - p[i]; the last copies its neighbour
    backward = np.concatenate([step[tuple(first)], step], axis)  # p[i] - p[i-1]
    dz_f, dz_b = np.abs(forward[..., 2:]), np.abs(backward[..., 2:])
    central = (forward + backward) / 2.0
    out = np.where(dz_f > EDGE_RATIO * dz_b + 1e-9, backward, central)
    return np.where(dz_b > EDGE_RATIO * dz_f + 1e-9, forward, out)


def normals_from_depth(depth: np.ndarray, fov_deg: float) -> np.ndarray:
    """Unit surface normals of a depth map.

    Args:
        depth: (H, W) float z-depth in metres (along the camera axis).
        fov_deg: the camera's vertical field of view in degrees.
    Returns:
        (H, W, 3) float32 unit normals in the camera frame (x right, y down, z forward), pointing
        towards the camera: the cross product of the back-projected points' derivatives along rows
        and columns (central differences, see ``_derivative``). Pixels without a valid depth (not
        finite or <= 0) or a degenerate neighbourhood face the camera along their viewing ray.
    """
    if depth.ndim != 2:
        raise ValueError(f"depth must be (H, W), got shape {depth.shape}")
    if not 0.0 < fov_deg < 180.0:
        raise ValueError(f"fov_deg must be in (0, 180), got {fov_deg}")
    valid = np.isfinite(depth) & (depth > 0)
    points = back_project(np.where(valid, depth, 1.0), fov_deg)
    n = np.cross(_derivative(points, 0), _derivative(points, 1))  # rows (down) x cols (right): towards the camera
    n = np.where((n * points).sum(-1, keepdims=True) > 0, -n, n)
    norm = np.linalg.norm(n, axis=-1, keepdims=True)
    ray = -points / np.linalg.norm(points, axis=-1, keepdims=True)
    good = valid[..., None] & (norm > 1e-12) & np.isfinite(norm)
    return np.where(good, n / np.where(good, norm, 1.0), ray).astype(np.float32)


def normals_to_uint8(normals: np.ndarray) -> np.ndarray:
    """(H, W, 3) unit normals -> (H, W, 3) uint8 ``round((n + 1) * 127.5)``."""
    return np.clip(np.round((normals.astype(np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def encode_normals_png(normals: np.ndarray) -> bytes:
    """(H, W, 3) unit normals -> ``normals.png`` bytes."""
    return encode_png(normals_to_uint8(normals))


def decode_normals(encoded: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) uint8 as the loader gives ``normals.png`` -> float32 unit vectors, same shape.

    Float input is taken as vectors already and only renormalised."""
    x = encoded.float() / 127.5 - 1.0 if encoded.dtype == torch.uint8 else encoded.float()
    return torch.nn.functional.normalize(x, dim=-3, eps=1e-8)
