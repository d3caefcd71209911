"""`make demo`'s program at a tiny size: report, overview picture, and reuse of finished stages."""

from __future__ import annotations

import json

from conftest import run_program


def test_demo_end_to_end_and_reuse(tmp_path):
    out = tmp_path / "demo"
    args = ["--out", str(out), "--set", "data.train_scenes=60", "--set", "data.val_scenes=20", "--set", "data.res=32", "--set", "overview_scenes=3"]
    proc = run_program("launch/demo.py", *args)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["stages"]["data"]["train"] == {"num_samples": 60, "reused": False, "scenes_per_second": report["stages"]["data"]["train"]["scenes_per_second"]}
    ins = report["stages"]["inspect"]
    assert ins["val_samples_read"] == 20 and ins["skipped"]["total"] == 0
    assert sum(ins["boxes_per_scene"].values()) == 20
    assert 0 < ins["depth_range_m"][0] < ins["depth_range_m"][1]
    assert (out / "samples" / "data_overview.png").stat().st_size > 1000
    assert "# fourm demo report" in (out / "report.md").read_text()
    for split in ("train", "val"):
        assert (out / "data" / split / "manifest.json").exists()
    mtime = (out / "data" / "train" / "shard-000000.tar").stat().st_mtime_ns
    proc = run_program("launch/demo.py", *args)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["stages"]["data"]["train"]["reused"] and report["stages"]["data"]["val"]["reused"]
    assert (out / "data" / "train" / "shard-000000.tar").stat().st_mtime_ns == mtime
