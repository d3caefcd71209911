"""Every program: bad input is one line on stderr, exit 2, no traceback, nothing written."""

from __future__ import annotations

import json

import pytest

from conftest import assert_usage_error, run_program

SYNTH = "data_pipelines/synth_scenes.py"


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--num", "3"], "--out"),
        (["--out", "{out}", "--num", "0"], "--num"),
        (["--out", "{out}", "--num", "x"], "--num"),
        (["--out", "{out}", "--num", "3", "--res", "5"], "--res"),
        (["--out", "{out}", "--num", "3", "--res", "-64"], "--res"),
        (["--out", "{out}", "--num", "3", "--shard-size", "0"], "--shard-size"),
        (["--out", "{out}", "--num", "3", "--seed", "-1"], "--seed"),
        (["--out", "{out}", "--num", "3", "--bogus"], "--bogus"),
    ],
)
def test_synth_scenes_bad_arguments(tmp_path, args, needle):
    out = tmp_path / "out"
    proc = run_program(SYNTH, *[a.format(out=out) for a in args])
    assert_usage_error(proc, needle)
    assert not out.exists() or not any(out.iterdir())


def test_synth_scenes_out_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("keep me")
    assert_usage_error(run_program(SYNTH, "--out", str(f), "--num", "2"), "not a directory")
    assert f.read_text() == "keep me"


def test_synth_scenes_runs_and_refuses_to_clobber(tmp_path):
    out = tmp_path / "out"
    proc = run_program(SYNTH, "--out", str(out), "--num", "12", "--res", "32", "--shard-size", "5", "--seed", "4", "--quiet")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == 12 and [s["num_samples"] for s in manifest["shards"]] == [5, 5, 2]
    before = (out / "shard-000000.tar").read_bytes()
    assert_usage_error(run_program(SYNTH, "--out", str(out), "--num", "3"), "--overwrite")
    assert (out / "shard-000000.tar").read_bytes() == before


def test_demo_bad_arguments(tmp_path):
    assert_usage_error(run_program("launch/demo.py", "--out", str(tmp_path / "d"), "--minutes", "-1"), "--minutes")
    assert_usage_error(run_program("launch/demo.py", "--out", str(tmp_path / "d"), "--set", "data.nonsense=1"), "nonsense")
    assert_usage_error(run_program("launch/demo.py", "--out", str(tmp_path / "d"), "--set", "data.res=abc"), "res")
    assert_usage_error(run_program("launch/demo.py", "--out", str(tmp_path / "d"), "--config", str(tmp_path / "none.yaml")), "none.yaml")
    assert not (tmp_path / "d").exists()


def test_import_folder_bad_arguments(tmp_path):
    assert_usage_error(run_program("data_pipelines/import_folder.py", "--out", str(tmp_path)), "--src")
    assert_usage_error(run_program("data_pipelines/import_folder.py", "--src", str(tmp_path), "--out", str(tmp_path / "o"), "--res", "0"), "--res")


def test_demo_rejects_impossible_sizes(tmp_path):
    for bad in ("data.res=-3", "data.train_scenes=0", "overview_scenes=-1", "model=rnn", "stages=[data,fly]"):
        assert_usage_error(run_program("launch/demo.py", "--out", str(tmp_path / "d"), "--set", bad), bad.split("=")[0])
    assert not (tmp_path / "d").exists()
