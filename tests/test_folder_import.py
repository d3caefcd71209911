"""Folder import: rgb/depth/semseg/boxes/COCO/captions into raw shards."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import assert_usage_error, run_program
from fourm.data.loader import LoaderConfig, build_loader


def _make_src(root, n=4, h=48, w=64):
    rng = np.random.default_rng(0)
    for sub in ("rgb", "depth", "semseg", "boxes"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rgb = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(root / "rgb" / (f"img{i}.jpg" if i % 2 else f"img{i}.png"))
        if i == 0:
            np.save(root / "depth" / "img0.npy", np.full((h, w), 2.5, np.float32))
        else:
            Image.fromarray(np.full((h, w), 1500 + i, np.uint16)).save(root / "depth" / f"img{i}.png")
        Image.fromarray(np.full((h, w), i, np.uint8)).save(root / "semseg" / f"img{i}.png")
    json.dump([{"bbox": [1, 2, 30, 40], "label": "cat"}], open(root / "boxes" / "img2.json", "w"))
    coco = {
        "images": [{"id": 7, "file_name": "img0.png", "width": w, "height": h}, {"id": 8, "file_name": "img1.jpg", "width": w, "height": h}],
        "annotations": [
            {"id": 1, "image_id": 7, "bbox": [10, 5, 20, 8], "category_id": 3, "iscrowd": 0},
            {"id": 2, "image_id": 7, "bbox": [0, 0, 4, 4], "category_id": 5, "iscrowd": 0},
        ],
        "categories": [{"id": 3, "name": "dog"}, {"id": 5, "name": "traffic light"}],
    }
    (root / "annotations").mkdir(exist_ok=True)
    json.dump(coco, open(root / "annotations" / "instances_val.json", "w"))
    (root / "captions.jsonl").write_text('{"id": "img0", "text": "a dog"}\n{"id": "img3", "text": "noise"}\nthis line is broken\n')
    (root / "classes.txt").write_text("a\nb\nc\nd\n")
    return root


def _read(out):
    loader, skipped = build_loader(out, LoaderConfig(modalities=("rgb",), batch_size=1, shuffle=0, num_workers=0))
    return list(loader), skipped


def test_import_folder_with_coco(tmp_path):
    src = _make_src(tmp_path / "src")
    (src / "rgb" / "broken.png").write_bytes(b"not an image")
    proc = run_program("data_pipelines/import_folder.py", "--src", str(src), "--out", str(tmp_path / "out"), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "broken.png" in proc.stderr  # reported by name
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["num_samples"] == 4
    assert manifest["modality_counts"] == {"rgb": 4, "depth": 4, "semseg": 4, "boxes": 3, "caption": 2}
    assert manifest["classes"] == ["a", "b", "c", "d"]
    assert manifest["coco"].endswith("instances_val.json")
    assert {s["path"].rsplit("/", 1)[-1] for s in manifest["skipped_files"]} == {"broken.png", "captions.jsonl:3"}

    import webdataset as wds

    samples = {s["__key__"]: s for s in wds.WebDataset(str(tmp_path / "out" / "shard-000000.tar"), shardshuffle=False)}
    assert sorted(samples) == ["img0", "img1", "img2", "img3"]
    boxes0 = json.loads(samples["img0"]["boxes.json"])
    assert boxes0 == [{"bbox": [10.0, 5.0, 30.0, 13.0], "label": "dog"}, {"bbox": [0.0, 0.0, 4.0, 4.0], "label": "traffic light"}]
    assert json.loads(samples["img1"]["boxes.json"]) == []  # a COCO image without annotations
    assert json.loads(samples["img2"]["boxes.json"])[0]["label"] == "cat"
    assert "boxes.json" not in samples["img3"]
    assert samples["img0"]["caption.txt"] == b"a dog"
    from fourm.data.codecs import decode_member

    assert float(decode_member("depth", samples["img0"]["depth.npy"]).mean()) == pytest.approx(2.5)
    assert float(decode_member("depth", samples["img1"]["depth.npy"]).mean()) == pytest.approx(1.501)  # mm -> m
    assert decode_member("rgb", samples["img3"]["rgb.png"]).shape == (3, 48, 64)
    assert int(decode_member("semseg", samples["img3"]["semseg.png"]).max()) == 3
    batches, counter = _read(tmp_path / "out")
    skipped = counter.as_dict()
    assert len(batches) == 4 and skipped["total"] == 0


def test_import_with_resize(tmp_path):
    src = _make_src(tmp_path / "src")
    proc = run_program("data_pipelines/import_folder.py", "--src", str(src), "--out", str(tmp_path / "out"), "--res", "32", "--quiet")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["resolution"] == 32
    loader, _ = build_loader(tmp_path / "out", LoaderConfig(modalities=("rgb", "depth", "semseg"), batch_size=2, shuffle=0, num_workers=0))
    batch = next(iter(loader))
    assert batch["rgb"].shape == (2, 3, 32, 32) and batch["depth"].shape == (2, 1, 32, 32)
    import webdataset as wds

    s0 = next(iter(wds.WebDataset(str(tmp_path / "out" / "shard-000000.tar"), shardshuffle=False)))
    # 64x48 -> centre crop 48x48 (left offset 8) -> scale 32/48
    box = json.loads(s0["boxes.json"])[0]["bbox"]
    assert box == pytest.approx([(10 - 8) * 32 / 48, 5 * 32 / 48, (30 - 8) * 32 / 48, 13 * 32 / 48], abs=1e-3)


def test_mismatched_size_is_an_error_naming_the_file(tmp_path):
    src = _make_src(tmp_path / "src")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(src / "semseg" / "img2.png")
    proc = run_program("data_pipelines/import_folder.py", "--src", str(src), "--out", str(tmp_path / "out"), "--quiet")
    assert_usage_error(proc, "img2.png")
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert not list((tmp_path / "out").glob("shard-*")) and not list((tmp_path / "out").glob(".staging-*"))


def test_bad_coco_file_and_missing_images(tmp_path):
    src = _make_src(tmp_path / "src")
    (src / "annotations" / "instances_val.json").write_text("{not json")
    assert_usage_error(run_program("data_pipelines/import_folder.py", "--src", str(src), "--out", str(tmp_path / "o1")), "instances_val.json")
    empty = tmp_path / "empty"
    (empty / "rgb").mkdir(parents=True)
    assert_usage_error(run_program("data_pipelines/import_folder.py", "--src", str(empty), "--out", str(tmp_path / "o2")), "no images")
    assert_usage_error(run_program("data_pipelines/import_folder.py", "--src", str(tmp_path / "missing"), "--out", str(tmp_path / "o3")), "missing")
    assert_usage_error(run_program("data_pipelines/import_folder.py", "--src", str(src), "--out", str(tmp_path / "o4"), "--coco", str(tmp_path / "nope.json")), "nope.json")
