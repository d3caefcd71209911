"""`make demo`'s program at a tiny size: every stage runs, the report has every key, and a second
run reuses every finished stage."""

from __future__ import annotations

import json

from conftest import run_program


def test_demo_end_to_end_and_reuse(tmp_path):
    out = tmp_path / "demo"
    args = [
        "--out", str(out), "--set", "data.train_scenes=48", "--set", "data.val_scenes=16", "--set", "data.shard_size=16",
        "--set", "overview_scenes=3", "--set", "sample_scenes=3", "--set", "eval.scenes=6", "--set", "eval.steps=2", "--set", "eval.judge_steps=3",
        "--set", "tokenizers.max_steps=3", "--set", "tokenizers.batch_size=4", "--set", "train.max_steps=4",
        "--set", "train.overrides=[data.batch_size=4,data.shuffle_buffer=8,log_every=2,ckpt_every=2]",
    ]
    proc = run_program("launch/demo.py", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    stages = report["stages"]
    assert set(stages) == {"data", "inspect", "tokenizers", "pretokenize", "judge", "train", "evaluate", "samples"}
    # the judge trains before the model, so that the minutes it does not use go to the model
    assert not stages["judge"]["reused"] and (out / "judge" / "segmenter.safetensors").stat().st_mtime_ns < (out / "model" / "model.safetensors").stat().st_mtime_ns
    assert stages["data"]["train"]["num_samples"] == 48 and not stages["data"]["train"]["reused"]
    ins = stages["inspect"]
    assert ins["val_samples_read"] == 16 and ins["skipped"]["total"] == 0 and sum(ins["boxes_per_scene"].values()) == 16
    assert 0 < ins["depth_range_m"][0] < ins["depth_range_m"][1]
    assert stages["tokenizers"]["rgb"]["steps"] == 3 and "psnr" in stages["tokenizers"]["rgb"]["val"] and stages["tokenizers"]["depth"]["batch_size"] == 4
    assert json.loads((out / "tokenizers" / "boxes" / "config.json").read_text())["bins"] == 64  # one bin a pixel at data.res 64
    assert stages["pretokenize"]["train"]["samples"] == 48
    assert stages["train"]["steps"] == 4
    ev = stages["evaluate"]
    for part in ("model", "ceiling", "floor"):
        assert {"rgb_to_depth", "rgb_to_semseg", "rgb_to_boxes", "rgb_to_caption", "caption_to_rgb"} <= set(ev[part]), part
    assert {"abs_rel", "rmse", "delta1", "delta2", "delta3"} <= set(ev["model"]["rgb_to_depth"]) and 0 <= ev["model"]["rgb_to_semseg"]["miou"] <= 1
    assert {"map", "map50"} <= set(ev["model"]["rgb_to_boxes"]) and {"precision", "recall", "f1"} <= set(ev["model"]["rgb_to_caption"])
    assert {"accuracy", "objects", "count", "relations"} <= set(ev["model"]["caption_to_rgb"]) <= set(ev["ceiling"]["caption_to_rgb_true_images"])
    assert ev["ceiling"]["rgb_to_caption"]["f1"] == 1.0 and ev["floor"]["rgb_to_boxes"]["map50"] == 0.0
    assert set(ev["targets"]) == set(ev["model"]) - {"training_scenes"}
    assert "| rgb → depth | delta1 |" in (out / "report.md").read_text()
    for path in ("samples/data_overview.png", "samples/rgb_to_all.png", "samples/caption_to_rgb.png", "model/model.safetensors", "tokenizers/vocab.json", "tokens/val/manifest.json", "data/val/manifest.json", "report.md"):
        assert (out / path).is_file(), path
    assert "## Samples on held-out scenes" in (out / "report.md").read_text()
    mtime = (out / "data" / "train" / "shard-000000.tar").stat().st_mtime_ns
    proc = run_program("launch/demo.py", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stages = json.loads((out / "report.json").read_text())["stages"]
    assert stages["data"]["train"]["reused"] and stages["train"]["reused"] and stages["pretokenize"]["train"]["reused"] and stages["evaluate"]["reused"] and stages["judge"]["reused"]
    assert all(rec["reused"] for rec in stages["tokenizers"].values())
    assert (out / "data" / "train" / "shard-000000.tar").stat().st_mtime_ns == mtime


def test_demo_decoder_variant_and_stage_selection(tmp_path):
    out = tmp_path / "d"
    proc = run_program("launch/demo.py", "--out", str(out), "--set", "model=decoder", "--set", "stages=[data,inspect]", "--set", "data.train_scenes=20", "--set", "data.val_scenes=8")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert set(json.loads((out / "report.json").read_text())["stages"]) == {"data", "inspect"}
    # an output directory holding the other architecture's model is refused, not reused or overwritten
    (out / "model").mkdir()
    (out / "model" / "config.json").write_text(json.dumps({"arch": "encdec"}))
    proc = run_program("launch/demo.py", "--out", str(out), "--set", "model=decoder", "--set", "stages=[data]", "--set", "data.train_scenes=20", "--set", "data.val_scenes=8")
    assert proc.returncode == 2 and "holds a model of arch 'encdec', not 'decoder'" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert (out / "model" / "config.json").read_text() == json.dumps({"arch": "encdec"})


def test_demo_budget_scales_stages_both_ways():
    from fourm.demo import DemoConfig, scale_to_budget

    base = DemoConfig()
    same = scale_to_budget(DemoConfig(), 30)
    assert (same.train.minutes, same.data.train_scenes, same.train.max_steps) == (base.train.minutes, base.data.train_scenes, base.train.max_steps)
    short = scale_to_budget(DemoConfig(), 15)
    assert short.budget_minutes == 15 and short.data.train_scenes == base.data.train_scenes // 2
    assert short.train.max_steps == base.train.max_steps  # a cap, not a target: unchanged below 30 minutes
    long = scale_to_budget(DemoConfig(), 90)
    assert long.budget_minutes == 90 and long.tokenizers.minutes == {k: 3 * m for k, m in base.tokenizers.minutes.items()}
    assert long.eval.judge_minutes == 3 * base.eval.judge_minutes and long.data.train_scenes == 3 * base.data.train_scenes
    assert (long.train.max_steps, long.tokenizers.max_steps, long.eval.judge_steps) == (3 * base.train.max_steps, 3 * base.tokenizers.max_steps, 3 * base.eval.judge_steps)
    assert long.data.val_scenes == base.data.val_scenes


def test_the_model_gets_what_the_budget_leaves():
    from fourm.demo import DemoConfig, model_minutes

    cfg = DemoConfig()  # 30 minutes; judge 3.5, evaluation 3
    assert model_minutes(cfg, 10 * 60, judge_trained=False) == 13.5
    assert model_minutes(cfg, 10 * 60, judge_trained=True) == 17.0  # a judge already there costs nothing
    assert model_minutes(cfg, 29 * 60, judge_trained=False) == cfg.train.min_minutes  # overran: the least
    cfg.train.minutes = 5.0
    assert model_minutes(cfg, 10 * 60, judge_trained=False) == 5.0  # set: as given
