"""The renderer: determinism and geometric consistency of RGB, depth, segmentation, boxes, captions."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from fourm.data.codecs import decode_image, decode_npy
from fourm.data.synth import CLASSES, COLORS, SHAPES, make_caption, render_scene, sample_scene
from fourm.data.synth.generate import render_sample
from fourm.data.synth.render import FAR, tight_boxes
from fourm.data.synth.scene import SIZES


def _scenes(n: int, seed: int = 0):
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        yield rng, sample_scene(rng)


def test_same_seed_same_bytes_and_other_seed_differs():
    a = render_sample(7, 5, 64)
    b = render_sample(7, 5, 64)
    c = render_sample(8, 5, 64)
    assert a == b
    assert a["rgb.png"] != c["rgb.png"]


def test_scene_sampling_covers_the_vocabulary():
    shapes, colors, sizes, counts = set(), set(), set(), set()
    for _, scene in _scenes(300):
        counts.add(len(scene.objects))
        for o in scene.objects:
            shapes.add(o.shape)
            colors.add(o.color)
            sizes.add(o.size)
    assert shapes == set(SHAPES) and len(SHAPES) >= 3
    assert colors == set(COLORS) and len(COLORS) >= 6
    assert sizes == set(SIZES) == {"small", "large"}
    assert counts == {1, 2, 3, 4, 5}


def test_objects_do_not_overlap():
    for _, scene in _scenes(200):
        objs = scene.objects
        for i in range(len(objs)):
            for j in range(i + 1, len(objs)):
                d = np.hypot(objs[i].position[0] - objs[j].position[0], objs[i].position[1] - objs[j].position[1])
                assert d > objs[i].footprint_radius + objs[j].footprint_radius


@pytest.mark.parametrize("res", [64, 128, 256])
def test_modalities_are_consistent(res):
    for _, scene in _scenes(6 if res < 256 else 2, seed=res):
        view = render_scene(scene, res)
        assert view.rgb.shape == (res, res, 3) and view.rgb.dtype == np.uint8
        assert view.depth.shape == (res, res) and view.depth.dtype == np.float32
        assert np.isfinite(view.depth).all() and (view.depth > 0).all()
        # semseg is the class of the instance under each pixel
        assert (view.semseg[view.instance == -2] == CLASSES.index("background")).all()
        assert (view.semseg[view.instance == -1] == CLASSES.index("ground")).all()
        assert (view.depth[view.instance == -2] == FAR).all()
        assert (view.depth[view.instance != -2] < FAR).all()
        for k, obj in enumerate(scene.objects):
            assert (view.semseg[view.instance == k] == CLASSES.index(obj.shape)).all()
            assert obj.visible_pixels == int((view.instance == k).sum())


def _without_objects(scene, res):
    empty = copy.deepcopy(scene)
    empty.objects = []
    return render_scene(empty, res)


def test_objects_are_nearer_than_the_ground_behind_them():
    """Depth and occlusion are physical: removing the objects reveals ground (or sky) farther away."""
    checked = 0
    for _, scene in _scenes(20, seed=11):
        view = render_scene(scene, 64)
        ground_only = _without_objects(scene, 64)
        obj = view.instance >= 0
        assert (view.depth[obj] < ground_only.depth[obj]).all()
        # where no object is, the two renders agree exactly
        assert np.array_equal(view.depth[~obj], ground_only.depth[~obj])
        checked += int(obj.sum())
    assert checked > 1000


def test_objects_are_shaded_and_cast_shadows():
    darker = 0
    for _, scene in _scenes(20, seed=2):
        view = render_scene(scene, 64)
        ground_only = _without_objects(scene, 64)
        ground = view.instance == -1
        # shadows: some ground pixels are darker with the objects present than without
        darker += int((view.rgb[ground].sum(-1) + 30 < ground_only.rgb[ground].sum(-1)).sum())
        for k in range(len(scene.objects)):
            pix = view.rgb[view.instance == k].astype(int).sum(-1)
            if len(pix) > 40:  # shading: an object is not one flat colour
                assert pix.max() - pix.min() > 20
    assert darker > 0


def test_boxes_are_tight_boxes_of_object_pixels():
    for i in range(30):
        members = render_sample(4, i, 64)
        scene = json.loads(members["scene.json"])
        boxes = json.loads(members["boxes.json"])
        semseg = decode_image(members["semseg.png"], "semseg.png", "L")
        visible = [o for o in scene["objects"] if o["visible_pixels"] > 0]
        assert [b["label"] for b in boxes] == [o["label"] for o in visible]
        for b in boxes:
            x0, y0, x1, y1 = (int(v) for v in b["bbox"])
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            label = b["label"]
            assert label == label.lower() and label.split()[-1] in SHAPES
            cls = CLASSES.index(label.split()[-1])
            inside = semseg[y0:y1, x0:x1] == cls
            # the object's class touches every edge of its box
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()


def test_tight_boxes_match_instance_map_exactly():
    for rng, scene in _scenes(20, seed=5):
        view = render_scene(scene, 64)
        for k, box in enumerate(tight_boxes(view.instance, len(scene.objects))):
            mask = view.instance == k
            if box is None:
                assert not mask.any()
                continue
            x0, y0, x1, y1 = box
            assert mask[y0:y1, x0:x1].sum() == mask.sum()
            assert mask[y0].any() and mask[y1 - 1].any() and mask[:, x0].any() and mask[:, x1 - 1].any()


def test_hidden_objects_have_no_box_and_no_caption_mention():
    found_hidden = 0
    for i in range(400):
        rng = np.random.default_rng([9, i])
        scene = sample_scene(rng)
        view = render_scene(scene, 64)
        boxes = tight_boxes(view.instance, len(scene.objects))
        for obj, box in zip(scene.objects, boxes):
            if obj.visible_pixels == 0:
                found_hidden += 1
                assert box is None
    assert found_hidden > 0  # objects out of frame or fully occluded do occur


def test_captions_name_every_visible_object_with_a_relation():
    wordings = set()
    for i in range(60):
        members = render_sample(6, i, 64)
        caption = members["caption.txt"].decode()
        scene = json.loads(members["scene.json"])
        visible = [o for o in scene["objects"] if o["visible_pixels"] > 0]
        for o in visible:
            assert o["label"] in caption, (o["label"], caption)
        if len(visible) >= 2:
            assert any(r in caption for r in ("left of", "right of", "in front of", "closer than", "behind", "farther away than"))
        wordings.add(caption.split(" a ")[0] if caption.count(" a ") else caption[:10])
    assert len(wordings) >= 3  # varied openings


def test_caption_relation_follows_camera():
    rng = np.random.default_rng(0)
    scene = sample_scene(rng)
    from fourm.data.synth.caption import relation
    from fourm.data.synth.scene import SceneObject

    right, _, forward = scene.camera.basis()
    base = np.array([0.0, 0.0])
    a = SceneObject("sphere", "red", "small", tuple(base), 0.0)
    b = SceneObject("cube", "blue", "small", tuple(base + 2.0 * right[[0, 2]] / np.linalg.norm(right[[0, 2]])), 0.0)
    assert relation(a, b, scene) == "left" and relation(b, a, scene) == "right"
    c = SceneObject("cube", "blue", "small", tuple(base + 2.0 * forward[[0, 2]] / np.linalg.norm(forward[[0, 2]])), 0.0)
    assert relation(a, c, scene) == "front" and relation(c, a, scene) == "behind"
    view = render_scene(scene, 32)
    assert isinstance(make_caption(scene, rng), str) and view.rgb.shape == (32, 32, 3)


def test_depth_member_is_metric_float32():
    members = render_sample(1, 0, 64)
    depth = decode_npy(members["depth.npy"], "depth.npy")
    assert depth.dtype == np.float32 and depth.shape == (64, 64)
    scene = json.loads(members["scene.json"])
    cam = np.array(scene["camera"]["position"])
    # the nearest ground/object point cannot be nearer than the camera height allows along any ray
    assert depth.min() > 1.0 and depth.min() < np.linalg.norm(cam)
