"""The side-by-side instrument: arms on the same shards for the same minutes, a curve per run with
every key, runs reused when their settings match, the table and the picture."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from conftest import REPO, assert_usage_error, run_program

TINY = ("model.dim=32", "model.enc_layers=1", "model.dec_layers=1", "data.batch_size=4", "data.num_workers=0", "data.shuffle_buffer=8", "log_every=1")


def test_the_judge_is_loaded_for_either_caption_to_rgb_score():
    from fourm.eval.side_by_side import needs_judge

    assert needs_judge(["rgb_to_depth", "caption_to_rgb_geneval"]) and needs_judge(("caption_to_rgb",))
    assert not needs_judge(["rgb_to_depth", "rgb_to_boxes"])


def test_parse_arm():
    from fourm.eval.side_by_side import Arm, parse_arm

    assert parse_arm("base") == Arm("base")
    assert parse_arm("muon:optim.name=muon, optim.lr=0.002") == Arm("muon", ("optim.name=muon", "optim.lr=0.002"))
    for bad in ("", ":optim.lr=1", "a/b", "x:optim.lr"):
        with pytest.raises(ValueError, match="arm"):
            parse_arm(bad)


def test_two_arms_two_points_every_key(token_dir, synth_dir, tmp_path, monkeypatch):
    from fourm.eval import side_by_side as sbs

    monkeypatch.chdir(REPO)
    cfg = sbs.SideBySideConfig(train_config=str(REPO / "configs/train/tiny_encdec.yaml"), tokens=str(token_dir), val=str(synth_dir), train_raw=str(synth_dir),
                               tokenizers=str(token_dir.parent / "tok"), minutes=0.08, points=2, seeds=(0,), scenes=4,
                               directions=("rgb_to_depth", "rgb_to_caption"), base_overrides=TINY)
    arms = [sbs.Arm("base"), sbs.Arm("lr3x", ("optim.lr=0.003",))]
    result = sbs.run_side_by_side(cfg, arms, tmp_path, progress=False)
    assert set(result) >= {"machine", "minutes", "points", "seeds", "scenes", "arms"} and list(result["arms"]) == ["base", "lr3x"]
    assert result["arms"]["lr3x"]["overrides"] == ["optim.lr=0.003"]
    for arm in result["arms"].values():
        (run,) = arm["runs"]
        assert run["seed"] == 0 and run["steps"] > 0 and run["tokens"] > 0 and run["tokens_per_s"] > 0
        curve = run["curve"]
        assert len(curve) == 2  # one snapshot half-way, then the final model
        assert [p["minutes"] for p in curve] == sorted(p["minutes"] for p in curve) and curve[-1]["minutes"] == cfg.minutes
        assert 0 < curve[0]["step"] <= curve[1]["step"] == run["steps"]
        for point in curve:
            assert set(point) == {"minutes", "step", "tokens", "figures", "floor"}
            assert set(point["figures"]) == {"rgb_to_depth", "rgb_to_caption"}
            assert {"delta1", "abs_rel"} <= set(point["figures"]["rgb_to_depth"]) and {"f1", "precision"} <= set(point["figures"]["rgb_to_caption"])
    saved = json.loads((tmp_path / "side_by_side.json").read_text())
    assert saved == json.loads(json.dumps(result))
    # the arms' runs differ only by their overrides
    a, b = (json.loads((tmp_path / n / "seed-0" / "config.json").read_text()) for n in ("base", "lr3x"))
    assert a["optim"]["lr"] != b["optim"]["lr"] and {k: v for k, v in a.items() if k != "optim"} == {k: v for k, v in b.items() if k != "optim"}

    header, rows = sbs.summary_rows(result)
    assert header[:4] == ["arm", "settings", "seeds", "steps"] and "depth delta1" in header and len(rows) == 2 and rows[1][1] == "optim.lr=0.003"
    sbs.plot_curves(result, tmp_path / "curves.png")
    assert Image.open(tmp_path / "curves.png").size[0] == 2 * 260

    # asked again with the same settings: read back, nothing trained; a changed setting trains again
    monkeypatch.setattr(sbs, "train_arm", lambda *a, **k: pytest.fail("a finished run is reused"))
    assert sbs.run_side_by_side(cfg, arms, tmp_path, progress=False)["arms"] == result["arms"]
    monkeypatch.setattr(sbs, "train_arm", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("trained again")))
    with pytest.raises(RuntimeError, match="trained again"):
        sbs.run_side_by_side(sbs.SideBySideConfig(**{**cfg.__dict__, "scenes": 3}), arms, tmp_path, progress=False)


def test_seeds_spread_in_the_table():
    from fourm.eval.side_by_side import summary_rows

    def run(seed, miou):
        return {"seed": seed, "steps": 10, "curve": [{"minutes": 1.0, "figures": {"rgb_to_semseg": {"miou": miou, "pixel_acc": 0.9}}}]}

    header, rows = summary_rows({"arms": {"a": {"overrides": [], "runs": [run(0, 0.50), run(1, 0.56)]}}})
    assert rows[0][header.index("semseg miou")] == "0.530 ± 0.030"


def test_bad_usage_is_one_line(tmp_path):
    assert_usage_error(run_program("eval/side_by_side.py", "--demo", str(tmp_path), "--arm", "a:optim.lr", "--out", str(tmp_path / "o")), "optim.lr")
    assert_usage_error(run_program("eval/side_by_side.py", "--demo", str(tmp_path), "--arm", "a", "--arm", "a", "--out", str(tmp_path / "o")), "own name")
    assert_usage_error(run_program("eval/side_by_side.py", "--demo", str(tmp_path), "--arm", "a", "--out", str(tmp_path / "o")), "make demo")
