"""A config or model that asks for what the token shards do not hold: one line naming the modality,
the shards and the command that adds it, exit 2, nothing written (issue 36's table)."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import assert_usage_error, run_program

TINY = ["--set", "model.dim=32", "--set", "model.enc_layers=1", "--set", "model.dec_layers=1", "--set", "data.batch_size=4", "--max-steps", "2", "--quiet"]


def _train(token_dir, out, *extra):
    return run_program("launch/train.py", "--config", "configs/train/tiny_encdec.yaml", "--data", str(token_dir), "--out", str(out), *TINY, *extra)


@pytest.mark.parametrize(("sets", "needles"), [
    # a modality fourm has, absent from these shards (and derivable): where it comes from
    (["objective.masking.settings=[{name: rgb-to-count, default: 0.0, input_alphas: {rgb: 1.0}, target_alphas: {count: 1.0}}]"], ["'count'", "rgb-to-count", "add_modalities.py", "--add count", "pretokenize.py"]),
    # a mixture setting naming a modality fourm does not know
    (["objective.masking.settings=[{name: typo, default: 1.0, target_alphas: {dpeth: 1.0}}]"], ["'dpeth'", "does not know", "depth"]),
])
def test_a_modality_the_shards_lack_is_one_line_before_anything_is_written(token_dir, tmp_path, sets, needles):
    out = tmp_path / "run"
    proc = _train(token_dir, out, *[a for s in sets for a in ("--set", s)])
    assert_usage_error(proc, *needles)
    assert not out.exists()  # nothing written


def test_empty_shards_and_another_vocabulary(token_dir, tmp_path, tiny_model_dir):
    empty = tmp_path / "empty"
    shutil.copytree(token_dir, empty)
    manifest = json.loads((empty / "manifest.json").read_text())
    (empty / "manifest.json").write_text(json.dumps({**manifest, "num_samples": 0}))
    assert_usage_error(_train(empty, tmp_path / "a"), "hold no samples", str(empty))
    assert not (tmp_path / "a").exists()

    other = tmp_path / "other"
    shutil.copytree(token_dir, other)
    vocab = manifest["vocab"]
    text_start, text_size = vocab["spaces"]["text"]
    shifted = {**vocab, "spaces": {**vocab["spaces"], "text": [text_start, text_size + 1]}}  # ids renumbered
    (other / "manifest.json").write_text(json.dumps({**manifest, "vocab": shifted}))
    assert_usage_error(_train(other, tmp_path / "b", "--set", f"init_from={tiny_model_dir}"), "another vocabulary", str(other), "text")
    assert not (tmp_path / "b").exists()


def test_the_demo_shards_serve_the_demo_recipe_and_needed_modalities():
    from fourm.config import load_config
    from fourm.training.loop import TrainConfig
    from fourm.training.shard_check import needed_modalities

    cfg = load_config(TrainConfig, "configs/train/lora_count.yaml", [])
    assert needed_modalities(cfg.objective) == {"rgb": ["rgb-to-count"], "count": ["rgb-to-count"]}
    demo = load_config(TrainConfig, "configs/train/tiny_encdec.yaml", [])
    assert set(needed_modalities(demo.objective)) <= {"rgb", "caption"}  # rgb-to-all and caption-to-all inputs


def test_the_issues_lora_count_run_on_a_model_is_one_line(token_dir, tmp_path, tiny_model_dir):
    # issue 36's own command: LoRA for rgb -> count on shards without count, from a trained model
    out = tmp_path / "lora"
    proc = run_program("launch/train.py", "--config", "configs/train/lora_count.yaml", "--set", f"init_from={tiny_model_dir}", "--data", str(token_dir), "--out", str(out), "--max-steps", "20", "--quiet")
    assert_usage_error(proc, "'count'", "rgb-to-count", str(token_dir), "add_modalities.py --src RAW", "--add count", "pretokenize.py")
    assert not out.exists()


@pytest.mark.parametrize(("args", "needles"), [
    (["--targets", "count"], ["--targets asks for 'count'", "add_modalities.py", "--add count"]),  # not in the shards' vocabulary
    (["--source", "normals", "--targets", "depth"], ["--source asks for 'normals'", "--add normals"]),
    (["--targets", "dpeth"], ["does not know", "unknown modality dpeth"]),
    (["--targets", "caption", "--zero", "caption"], ["hold no 'caption'", "they hold"]),  # in the vocabulary, no samples
])
def test_condition_gap_names_what_the_shards_lack(token_dir, tmp_path, tiny_model_dir, args, needles):
    tokens = token_dir
    if "--zero" in args:  # shards whose manifest counts no samples of a modality
        i = args.index("--zero")
        tokens = tmp_path / "tokens"
        shutil.copytree(token_dir, tokens)
        manifest = json.loads((tokens / "manifest.json").read_text())
        counts = manifest.get("modality_counts") or {m: manifest["num_samples"] for m in manifest["modalities"]}
        (tokens / "manifest.json").write_text(json.dumps({**manifest, "modality_counts": {**counts, args[i + 1]: 0}}))
        args = args[:i] + args[i + 2:]
    out = tmp_path / "gap.json"
    proc = run_program("eval/condition_gap.py", "--model", str(tiny_model_dir), "--tokens", str(tokens), "--json", str(out), "--scenes", "4", *args)
    assert_usage_error(proc, *needles)
    assert not out.exists()
