"""Surface normals: from depth (analytic planes, rendered scenes against the renderer's exact
normals), their PNG encoding, the angular metrics on hand cases, the normals tokenizer; count.txt."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fourm.data.codecs import CorruptMember, decode_member
from fourm.data.normals import decode_normals, encode_normals_png, normals_from_depth, normals_to_uint8
from fourm.data.synth.render import render_scene
from fourm.data.synth.scene import sample_scene
from fourm.metrics import normal_angle_metrics
from fourm.tokenizers.image import ImageTokenizer, ImageTokenizerConfig


def _angles(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Degrees between (..., 3) unit vectors."""
    return np.degrees(np.arccos(np.clip((a.astype(np.float64) * b).sum(-1), -1.0, 1.0)))


def _plane_depth(normal, offset: float, h: int, w: int, fov_deg: float) -> np.ndarray:
    """z-depth of the plane n . P = offset seen by a pinhole camera with vertical ``fov_deg``."""
    f = (h / 2) / math.tan(math.radians(fov_deg) / 2)
    x = (np.arange(w) + 0.5 - w / 2) / f
    y = (np.arange(h) + 0.5 - h / 2) / f
    n = np.asarray(normal, float)
    return (offset / (n[0] * x[None, :] + n[1] * y[:, None] + n[2])).astype(np.float32)


# unit normals facing the camera (n . P < 0 for points in front): frontal, tilted, ground-like
PLANES = [((0.0, 0.0, -1.0), -5.0), ((0.3, -0.2, -0.93), -4.0), ((0.0, -0.85, -0.53), -3.0), ((-0.6, 0.1, -0.79), -6.0)]


@pytest.mark.parametrize("normal,offset", PLANES)
@pytest.mark.parametrize("h,w", [(32, 32), (24, 40)])
def test_planes_give_their_normal_everywhere(normal, offset, h, w):
    n = np.asarray(normal) / np.linalg.norm(normal)
    depth = _plane_depth(n, offset * np.linalg.norm(normal), h, w, 40.0)
    assert (depth > 0).all()
    est = normals_from_depth(depth, 40.0)
    assert est.shape == (h, w, 3) and est.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(est, axis=-1), 1.0, atol=1e-5)
    assert _angles(est, n[None, None]).max() < 0.05  # borders included
    if n[0] or n[1]:  # a tilted plane read with another field of view looks tilted otherwise
        assert _angles(normals_from_depth(depth, 60.0), n[None, None]).mean() > 2.0
    if h != w and n[0]:  # the field of view is the vertical one, not the horizontal
        horizontal_as_vertical = math.degrees(2 * math.atan(math.tan(math.radians(20.0)) * h / w))
        assert _angles(normals_from_depth(depth, horizontal_as_vertical), n[None, None]).mean() > 2.0


def test_rendered_scenes_match_the_renderer_normals():
    medians, means = [], []
    for i in range(6):
        scene = sample_scene(np.random.default_rng([5, i]))
        view = render_scene(scene, 64)
        hit = view.instance > -2
        exact = view.normals
        np.testing.assert_allclose(np.linalg.norm(exact, axis=-1), 1.0, atol=1e-5)
        assert (exact[~hit] == (0, 0, -1)).all()
        est = normals_from_depth(view.depth, scene.camera.fov_deg)
        err = _angles(est, exact)[hit]
        medians.append(np.median(err))
        means.append(err.mean())
        objects = view.instance >= 0
        if objects.any():
            assert np.median(_angles(est, exact)[objects]) < 5.0
    assert max(medians) < 3.0 and np.mean(means) < 5.0, (medians, means)


def test_invalid_depth_faces_the_camera():
    depth = np.full((8, 8), 4.0, np.float32)
    depth[2, 3] = 0.0
    depth[5, 5] = np.nan
    est = normals_from_depth(depth, 50.0)
    assert np.isfinite(est).all()
    np.testing.assert_allclose(np.linalg.norm(est, axis=-1), 1.0, atol=1e-5)
    assert est[2, 3, 2] < -0.9 and est[5, 5, 2] < -0.9  # along the viewing ray, towards the camera
    with pytest.raises(ValueError, match="fov"):
        normals_from_depth(depth, 0.0)


def test_png_encoding_round_trip():
    rng = np.random.default_rng(0)
    n = rng.normal(size=(16, 16, 3))
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    u8 = normals_to_uint8(n)
    assert u8.dtype == np.uint8 and u8[0, 0].tolist() == [round((v + 1) * 127.5) for v in n[0, 0]]
    loaded = decode_member("normals", encode_normals_png(n))
    assert loaded.dtype == torch.uint8 and loaded.shape == (3, 16, 16)
    assert torch.equal(loaded, torch.from_numpy(u8).permute(2, 0, 1))
    back = decode_normals(loaded).permute(1, 2, 0).numpy()
    assert _angles(back, n).max() < 0.6  # 8-bit quantisation


def test_count_member_decodes_to_an_int():
    assert decode_member("count", b"3\n") == 3
    for bad in (b"three", b"-1", b"2.5", "²".encode()):
        with pytest.raises(CorruptMember, match="count.txt"):
            decode_member("count", bad)


def _tilted(degrees: list[float]) -> torch.Tensor:
    """(1, 3, 1, N) unit vectors at the given angles from +z."""
    a = torch.tensor(degrees, dtype=torch.float64).deg2rad()
    return torch.stack([a.sin(), torch.zeros_like(a), a.cos()])[None, :, None, :]


def test_normal_angle_metrics_hand_cases():
    true = _tilted([0.0, 0.0, 0.0, 0.0])
    pred = _tilted([0.0, 10.0, 20.0, 40.0]) * 3.0  # length does not matter
    m = normal_angle_metrics(pred, true)
    assert m["mean_deg"] == pytest.approx(17.5, abs=1e-6) and m["median_deg"] == pytest.approx(15.0, abs=1e-6)
    assert (m["within_11_25"], m["within_22_5"], m["within_30"]) == (0.5, 0.75, 0.75)
    odd = normal_angle_metrics(_tilted([5.0, 25.0, 90.0]), _tilted([0.0, 0.0, 0.0]))
    assert odd["median_deg"] == pytest.approx(25.0, abs=1e-6) and odd["mean_deg"] == pytest.approx(40.0, abs=1e-6)
    opposite = normal_angle_metrics(-true, true)
    assert opposite["mean_deg"] == pytest.approx(180.0) and opposite["within_30"] == 0.0
    valid = torch.tensor([[[True, True, False, False]]])
    assert normal_angle_metrics(pred, true, valid)["mean_deg"] == pytest.approx(5.0, abs=1e-6)
    assert math.isnan(normal_angle_metrics(pred, true, torch.zeros(1, 1, 4, dtype=torch.bool))["median_deg"])
    with pytest.raises(ValueError, match="normals"):
        normal_angle_metrics(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))


def test_normals_tokenizer_shapes_loss_and_unit_output():
    torch.manual_seed(0)
    tok = ImageTokenizer(ImageTokenizerConfig(modality="normals", channels=[8, 16, 16])).eval()
    assert tok.config.in_channels == tok.config.out_channels == 3
    raw = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    out = tok(raw)
    x, _ = tok.preprocess(raw)
    assert x.min() >= -1 and x.max() <= 1
    assert torch.isfinite(out.loss) and out.recon_loss >= torch.nn.functional.mse_loss(out.recon, x)  # + (1 - cos) >= 0
    ids, scale = tok.encode(raw)
    assert ids.shape == (2, 64) and scale is None
    dec = tok.decode(ids)
    assert dec.shape == (2, 3, 64, 64) and dec.dtype == torch.float32
    torch.testing.assert_close(dec.norm(dim=1), torch.ones(2, 64, 64), atol=1e-4, rtol=0)
    same = tok.preprocess(decode_normals(raw))[0]  # float unit vectors are taken as they are
    torch.testing.assert_close(same, torch.nn.functional.normalize(x, dim=1), atol=1e-6, rtol=0)
