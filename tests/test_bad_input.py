"""Every program, given input that does not exist, is empty or has the wrong type: one line on
stderr, exit 2, no traceback, and nothing left at the output path."""

from __future__ import annotations

import pytest

from conftest import assert_usage_error, run_program

# (program, arguments; {missing}: a path that does not exist, {empty}: an empty directory, {out}: the output)
CASES = [
    ("data_pipelines/synth_scenes.py", "--out {out} --num 0", "--num"),
    ("data_pipelines/import_folder.py", "--src {missing} --out {out}", "missing"),
    ("data_pipelines/import_folder.py", "--src {empty} --out {out}", "empty"),
    ("data_pipelines/add_modalities.py", "--src {missing} --out {out} --add normals", "missing"),
    ("data_pipelines/add_modalities.py", "--src {empty} --out {out} --add normals", "empty"),
    ("data_pipelines/pretokenize.py", "--tokenizers {missing} --data {empty} --out {out}", "missing"),
    ("launch/train.py", "--config {missing}.yaml --data {empty} --out {out}", "missing"),
    ("launch/train.py", "--config configs/train/tiny_encdec.yaml --data {empty} --out {out}", "empty"),
    ("launch/demo.py", "--out {out} --started-at 12", "--started-at 12: expected seconds since the epoch"),
    ("launch/generate.py", "--model {missing} --from rgb={missing}.png --to depth --out {out}", "missing"),
    ("launch/merge_lora.py", "--model {missing} --adapter {empty} --out {out}", "empty"),
    ("launch/export_hf.py", "--model {missing} --out {out}", "missing"),
    ("launch/plan.py", "--config {missing}.yaml --gpus 8", "missing"),
    ("launch/playground.py", "--model {missing} --port 0", "missing"),
    ("launch/playground.py", "--model {empty} --port 0", "empty"),
    ("eval/evaluate.py", "--model {missing} --data {empty} --json {out}/r.json", "empty"),
    ("eval/evaluate.py", "--model {missing} --data {empty} --json {out}/r.json --rgb-top-k -1", "--rgb-top-k: expected a non-negative integer"),
    ("eval/compare.py", "--demo {missing} --json {out}/r.json", "missing"),
    ("eval/bench.py", "--sections nonsense --json {out}/r.json", "nonsense"),
    ("eval/playground_latency.py", "--url http://127.0.0.1:1/ --json {out}/r.json", "no playground answers"),
    ("eval/kill_resume.py", "--tokens {missing} --out {out}", "missing"),
    ("eval/lora_vs_full.py", "--base {missing} --tokens {empty} --val {empty} --train {empty} --tokenizers {empty} --json {out}/r.json", "missing"),
    ("tokenizers/train.py", "--config {missing}.yaml --data {empty} --out {out}", "missing"),
    ("tokenizers/train.py", "--config configs/tokenizers/rgb.yaml --data {empty} --out {out}", "empty"),
    ("tokenizers/evaluate.py", "--tokenizer {missing} --data {empty}", "missing"),
]


@pytest.mark.parametrize("program,args,needle", CASES, ids=[f"{p.split('/')[-1]}:{n}" for p, _, n in CASES])
def test_bad_input_is_one_line_and_exit_2(program, args, needle, tmp_path):
    (tmp_path / "empty").mkdir()
    paths = {"missing": str(tmp_path / "missing"), "empty": str(tmp_path / "empty"), "out": str(tmp_path / "out")}
    proc = run_program(program, *args.format(**paths).split())
    assert_usage_error(proc, paths.get(needle, needle))
    assert not (tmp_path / "out").exists(), sorted(p.name for p in (tmp_path / "out").rglob("*"))
