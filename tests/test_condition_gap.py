"""The condition gap: the loss of a target given the scene's own source against another scene's."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from conftest import assert_usage_error, run_program

from fourm.eval.condition_gap import condition_gap, read_token_samples
from fourm.models.build import build_model, load_model
from fourm.training.data import manifest_context


@pytest.fixture(scope="module")
def context(token_dir):
    vocab, grids, kinds = manifest_context(json.loads((token_dir / "manifest.json").read_text()))
    return vocab, grids, kinds, read_token_samples(token_dir, vocab, kinds, grids, 12)


@pytest.mark.parametrize("arch", ["encdec", "decoder"])
@pytest.mark.parametrize("target", ["caption", "depth"])
def test_gap_reads_the_condition_and_vanishes_when_all_conditions_are_one(context, arch, target):
    from conftest import REPO

    vocab, grids, kinds, samples = context
    assert len(samples) == 12
    torch.manual_seed(0)
    model = build_model(REPO / f"configs/models/{arch}_tiny.yaml", vocab=vocab, overrides=["dim=64"]).eval()
    # an untrained model's output still depends on its input: another scene's rgb changes the loss
    # (over a few shifts: the mean of 12 signed differences can all but cancel for one, as it did,
    # 1.6e-5, for the encoder-decoder with the conv pixel stem at shift 1; shifts 2 and 3: 3e-3)
    rs = [condition_gap(model, samples, vocab, grids, kinds, "rgb", target, shift=k, batch_size=5) for k in (1, 2, 3)]
    assert all(r["samples"] == 12 and r["gap"] == pytest.approx(r["other"] - r["own"]) for r in rs)
    assert max(abs(r["gap"]) for r in rs) > 1e-4, rs
    # the same rgb for every scene: "another scene's" condition is the scene's own
    assert all("rgb.pixels" in s for s in samples)  # the shards keep the images (read by the encoder-decoder preset)
    same = [dict(s, rgb=samples[0]["rgb"], **{"rgb.pixels": samples[0]["rgb.pixels"]}) for s in samples]
    r = condition_gap(model, same, vocab, grids, kinds, "rgb", target, batch_size=5)
    assert abs(r["gap"]) < 1e-5, r
    with pytest.raises(ValueError, match="at least 2 samples"):
        condition_gap(model, samples[:1], vocab, grids, kinds, "rgb", target)
    if arch == "encdec":  # a model whose modality indices are not the data's is refused, not misread
        other = dataclasses.replace(vocab, modalities=dict(reversed(vocab.modalities.items())))
        with pytest.raises(ValueError, match="load_for_vocab"):
            condition_gap(build_model(REPO / "configs/models/encdec_tiny.yaml", vocab=other, overrides=["dim=64"]), samples, vocab, grids, kinds, "rgb", target)


def test_condition_gap_program(tmp_path, tiny_model_dir, token_dir):
    out = tmp_path / "gap.json"
    proc = run_program("eval/condition_gap.py", "--model", str(tiny_model_dir), "--tokens", str(token_dir), "--json", str(out), "--targets", "caption,semseg", "--scenes", "6")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert set(report["targets"]) == {"caption", "semseg"} and report["targets"]["caption"]["samples"] == 6
    # this model keeps its tokenizer set's modality order, the token manifest lists them sorted
    assert all(math.isfinite(r[k]) for r in report["targets"].values() for k in ("own", "other")), report
    assert "| caption |" in proc.stdout
    assert load_model(tiny_model_dir).config.arch == "encdec"
    assert_usage_error(run_program("eval/condition_gap.py", "--model", str(tiny_model_dir), "--tokens", str(token_dir), "--json", str(out), "--targets", "sound"), "unknown modality sound")
    assert_usage_error(run_program("eval/condition_gap.py", "--model", str(tiny_model_dir), "--tokens", str(token_dir), "--json", str(out), "--targets", "rgb"), "other than the source")
    assert_usage_error(run_program("eval/condition_gap.py", "--model", str(tmp_path / "none"), "--tokens", str(token_dir), "--json", str(out)), "no model")
