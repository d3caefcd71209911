"""Reliability and safety: kill -9 and resume (single process and ZeRO-3), kills during a checkpoint
write, corrupt token shards and raw samples, non-finite steps, untrusted files and config paths,
an unwritable or full output directory."""

from __future__ import annotations

import io
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch

from conftest import REPO, assert_usage_error, rewrite_tar, run_program

TINY = ["--set", "model.dim=64", "--set", "model.enc_layers=1", "--set", "model.dec_layers=1", "--set", "data.batch_size=8", "--set", "data.shuffle_buffer=16", "--set", "log_every=1", "--quiet"]


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _train(token_dir, out, steps, *extra, env=None):
    env = {"OMP_NUM_THREADS": "1", **(env or {})}  # one thread: faster on a small shared CPU
    return run_program("launch/train.py", "--config", "configs/train/tiny_encdec.yaml", "--data", str(token_dir), "--out", str(out), "--max-steps", str(steps), *TINY, *extra, env=env)


# -- kill at any moment ---------------------------------------------------------------------------
def _kill_resume(token_dir, tmp_path, *args, env=None):
    report = tmp_path / "report.json"
    proc = run_program("eval/kill_resume.py", "--tokens", str(token_dir), "--out", str(tmp_path / "kr"), "--json", str(report), *args, timeout=900, env=env)
    assert report.is_file(), proc.stderr[-3000:]
    return proc, json.loads(report.read_text())


def test_kill_9_and_resume_single_process(token_dir, tmp_path):
    proc, r = _kill_resume(token_dir, tmp_path, "--kills", "2", "--steps", "8", "--seed", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert sum(k["killed"] for k in r["kills"]) >= 1 and {k["kind"] for k in r["kills"]} == {"checkpoint", "step"}
    assert r["max_weight_diff"] <= 1e-6 and r["max_loss_diff"] == 0.0 and r["tokens_equal"]
    assert r["steps_logged_once"] and r["steps_logged"] == 8  # no step counted twice or skipped
    assert r["resumed_from_steps"] and r["passed"]


def test_kill_9_during_checkpoint_write_and_resume_under_zero3(token_dir, tmp_path):
    """Two ranks, DeepSpeed ZeRO-3 on CPU; killed while a checkpoint is being written, resumed (the
    DeepSpeed files load with weights_only=True); also a NaN step, which DeepSpeed must skip."""
    pytest.importorskip("deepspeed")
    env = {"FOURM_FAULT_NAN_STEPS": "3"}
    proc, r = _kill_resume(token_dir, tmp_path, "--engine", "zero3", "--kills", "1", "--steps", "6", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert r["kills"][0]["kind"] == "checkpoint" and r["kills"][0]["killed"], r["kills"]
    assert r["kills"][0]["half_written_checkpoint_left"]  # and --resume passed over it
    assert r["max_weight_diff"] <= 1e-6 and r["steps_logged_once"] and r["resumed_from_steps"], r
    for run in ("reference", "killed"):
        m = _metrics(tmp_path / "kr" / run)
        assert m[2]["loss"] is None and m[-1]["bad_steps"] == 1  # step 3 skipped, counted
        assert all(x["loss"] is not None and np.isfinite(x["loss"]) for x in m[3:])  # weights stayed finite


def test_half_written_checkpoints_are_never_picked(tmp_path):
    from fourm.training import checkpoint as ckpt
    from fourm.training.engine import Engine

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    engine = Engine(model, torch.optim.AdamW(model.parameters()), "single", bf16=False)
    engine.module(torch.ones(1, 4)).sum().backward()
    engine.optimizer.step()

    def save(step):
        tmp = ckpt.temp_dir(tmp_path, step)
        tmp.mkdir(parents=True)
        engine.save(tmp)
        ckpt.save_rng(tmp)
        ckpt.write_state(tmp, {"step": step})
        return tmp

    ckpt.publish(save(2), ckpt.checkpoint_dir(tmp_path, 2), keep=5)
    good = {k: v.clone() for k, v in engine.module.state_dict().items()}
    ckpt.publish(save(6), ckpt.checkpoint_dir(tmp_path, 6), keep=5)
    (ckpt.checkpoint_dir(tmp_path, 6) / "state.json").unlink()  # no completion record
    ckpt.publish(save(8), ckpt.checkpoint_dir(tmp_path, 8), keep=5)
    weights = ckpt.checkpoint_dir(tmp_path, 8) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a torn file
    save(12)  # killed before the rename: only the temp folder, complete or not
    assert not ckpt.is_complete(ckpt.checkpoint_dir(tmp_path, 8)) and ckpt.is_complete(ckpt.checkpoint_dir(tmp_path, 2))
    assert ckpt.latest_checkpoint(tmp_path) == ckpt.checkpoint_dir(tmp_path, 2)
    with torch.no_grad():
        engine.module.weight.zero_()
    engine.load(ckpt.latest_checkpoint(tmp_path))  # the previous checkpoint stays loadable
    assert all(torch.equal(good[k], v) for k, v in engine.module.state_dict().items())
    ckpt.publish(save(10), ckpt.checkpoint_dir(tmp_path, 10), keep=2)  # keeps 2 complete ones, clears the rest
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-00000002", "step-00000010"] and ckpt.latest_checkpoint(tmp_path).name == "step-00000010"


def test_rewind_metrics_drops_later_and_torn_records(tmp_path):
    from fourm.training.run_dir import rewind_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    assert rewind_metrics(path, 4) == 2
    assert [r["step"] for r in map(json.loads, path.read_text().splitlines())] == [1, 2, 3, 4]
    path.write_text('{"step": 1}')  # whole but unterminated: terminated, so the next record starts a line
    assert rewind_metrics(path, 1) == 0 and path.read_text() == '{"step": 1}\n'


# -- corrupt data -----------------------------------------------------------------------------------
def _npy(array, allow_pickle=False):
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=allow_pickle)
    return buf.getvalue()


@pytest.fixture()
def corrupt_tokens(tmp_path, token_dir):
    bad = tmp_path / "tokens"
    shutil.copytree(token_dir, bad)

    def edit(name, data):
        key, member = name.split(".", 1)
        edits = {
            ("00000010", "rgb.tokens.npy"): b"garbage",
            ("00000011", "depth.tokens.npy"): _npy(np.array([{"a": 1}], dtype=object), allow_pickle=True),  # a pickle
            ("00000012", "caption.tokens.npy"): _npy(np.ones(5, np.float32)),
            ("00000013", "semseg.tokens.npy"): _npy(np.full(64, 10**6, np.int32)),  # outside the vocabulary
            ("00000014", "rgb.tokens.npy"): _npy(np.full(10, 1500, np.int32)),  # not the 8x8 grid
            ("00000015", "caption.tokens.npy"): _npy(np.zeros(0, np.int32)),  # empty: modality dropped
        }
        if key == "00000016":
            return data if member == "meta.json" else None  # no token member left
        return edits.get((key, member), data)

    rewrite_tar(bad / "shard-000001.tar", edit)
    data = (bad / "shard-000002.tar").read_bytes()
    (bad / "shard-000002.tar").write_bytes(data[: len(data) // 2 + 700])  # truncated
    (bad / "shard-000003.tar").write_bytes(b"not a tar at all " * 64)
    return bad


def test_corrupt_token_shards_are_skipped_by_rule_and_counted(corrupt_tokens):
    from fourm.objectives.mixture import ObjectiveConfig
    from fourm.training.data import DataSource, StreamConfig, TokenStream, manifest_context

    vocab, grids, kinds = manifest_context(json.loads((corrupt_tokens / "manifest.json").read_text()))
    stream = TokenStream(StreamConfig(sources=[DataSource(str(corrupt_tokens))]), "encdec", vocab, kinds, grids, ObjectiveConfig())
    seen = {key: tokens for key, tokens, *_ in stream._samples(stream.sources[0][0], epoch=0, worker=0, workers=1)}
    assert {f"{i:08d}" for i in range(10)} <= set(seen)  # the intact shard is whole
    assert not set(seen) & {f"{i:08d}" for i in (10, 11, 12, 13, 14, 16)}
    assert "caption" not in seen["00000015"] and "rgb" in seen["00000015"]  # repaired, kept
    assert {f"{i:08d}" for i in range(17, 20)} <= set(seen) and not set(seen) & {f"{i:08d}" for i in range(30, 40)}
    counts = stream.skipped.as_dict()
    assert counts["corrupt_member"] == 4 and counts["inconsistent_sample"] == 1
    assert counts["truncated_shard"] == 1 and counts["unreadable_shard"] == 1 and counts["other"] == 0
    assert counts["missing_modality"] >= 1  # no token member (+ perhaps the sample cut by the truncation)
    assert stream.skipped.repairs()["empty_modality_dropped"] == 1


def test_training_on_corrupt_shards_never_crashes_and_reports(corrupt_tokens, tmp_path):
    out = tmp_path / "run"
    proc = _train(corrupt_tokens, out, 4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = _metrics(out)[-1]
    for reason in ("corrupt_member", "inconsistent_sample", "truncated_shard", "unreadable_shard", "missing_modality"):
        assert last[f"skipped/{reason}"] >= 1, (reason, last)
    assert last["repaired/empty_modality_dropped"] >= 1 and last["skipped/total"] >= 8
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped"]["total"] == last["skipped/total"] and summary["bad_steps"] == 0
    assert "skipped samples: " in proc.stderr and "corrupt_member" in proc.stderr


def test_raw_loader_rules_for_empty_captions_and_boxes_outside(tmp_path, synth_dir):
    from fourm.data.loader import LoaderConfig, build_loader

    shutil.copy(synth_dir / "shard-000000.tar", tmp_path / "shard-000000.tar")

    def edit(name, data):
        if name == "00000000.caption.txt":
            return b"  \n"
        if name == "00000001.boxes.json":
            return json.dumps([{"bbox": [-5, -5, 30, 30], "label": "a"}, {"bbox": [70, 70, 90, 90], "label": "b"}, {"bbox": [1, 2, float("nan"), 9], "label": "c"}]).encode()
        return None if name == "00000002.depth.npy" else data

    rewrite_tar(tmp_path / "shard-000000.tar", edit)

    def read(cfg):
        loader, counter = build_loader(tmp_path, cfg)
        return {k: (b, i) for b in loader for i, k in enumerate(b["__key__"])}, counter

    got, counter = read(LoaderConfig(modalities=("rgb", "boxes", "caption"), optional=("depth",), batch_size=1, shuffle=0, num_workers=0))
    assert "00000000" not in got and counter.as_dict()["missing_modality"] == 1  # empty caption = no caption
    b, i = got["00000001"]
    assert b["boxes"][i] == [{"bbox": [0.0, 0.0, 30.0, 30.0], "label": "a"}] and counter.repairs()["boxes_clipped"] == 1
    assert got["00000002"][0]["depth"][0] is None and counter.as_dict()["total"] == 1  # optional depth absent: kept
    got, counter = read(LoaderConfig(modalities=("rgb",), optional=("caption",), batch_size=1, shuffle=0, num_workers=0))
    assert got["00000000"][0]["caption"][0] is None and counter.repairs()["empty_modality_dropped"] == 1


# -- numerical faults -------------------------------------------------------------------------------
def test_a_non_finite_step_is_skipped_and_counted(token_dir, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "nan"
    proc = _train(token_dir, out, 4, "--set", "ckpt_every=1", "--set", "keep_checkpoints=5", env={"FOURM_FAULT_NAN_STEPS": "3"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = _metrics(out)
    assert [r["bad_steps"] for r in m] == [0, 0, 1, 1] and m[2]["loss"] is None and m[3]["loss"] is not None
    assert "step 3: non-finite loss or gradient; optimizer step skipped" in proc.stderr
    before, after = (out / "checkpoints" / f"step-0000000{s}" for s in (2, 3))
    for name in ("model.safetensors", "optimizer.safetensors"):  # no update at step 3, none to AdamW's moments
        a, b = load_file(str(before / name)), load_file(str(after / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert json.loads((out / "summary.json").read_text())["bad_steps"] == 1


def test_non_finite_steps_in_a_row_stop_with_a_checkpoint(token_dir, tmp_path):
    out = tmp_path / "boom"
    proc = _train(token_dir, out, 20, "--set", "optim.lr=1e30", "--set", "optim.warmup_steps=1", "--set", "max_bad_steps=3", "--set", "ckpt_every=100")
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("train.py: stopped: 3 steps in a row (max_bad_steps) had a non-finite loss or gradient"), line
    m = _metrics(out)
    stop = m[-1]["step"]
    assert m[-1]["bad_steps"] == 3 and stop < 20 and (out / "checkpoints" / f"step-{stop:08d}").is_dir() and not (out / "final").exists()
    from fourm.training.checkpoint import latest_checkpoint, read_state

    state = read_state(latest_checkpoint(out))
    assert state["step"] == stop and state["bad_in_row"] == 3


# -- untrusted files, configs and paths -------------------------------------------------------------
def test_no_pickle_anywhere_in_the_shipped_code():
    bad = {
        "pickle module": re.compile(r"^\s*(import pickle|from pickle |import cPickle|import dill)|\bpickle\.loads?\(", re.M),
        "torch.load without weights_only=True": re.compile(r"torch\.load\((?![^)]*weights_only=True)[^)]*\)"),
        "allow_pickle=True": re.compile(r"allow_pickle\s*=\s*True"),
        "yaml.load without SafeLoader": re.compile(r"yaml\.(unsafe_load|load)\((?![^)]*SafeLoader)"),
    }
    found = []
    for folder in ("fourm", "launch", "eval", "data_pipelines"):
        for path in (REPO / folder).rglob("*.py"):
            text = path.read_text()
            found += [f"{path.relative_to(REPO)}: {what}" for what, pattern in bad.items() if pattern.search(text)]
    assert not found, found


def test_training_config_unknown_keys_wrong_types_and_escaping_paths(tmp_path):
    from fourm.cli import UsageError
    from fourm.config import load_config
    from fourm.training.engine import load_deepspeed_config
    from fourm.training.loop import TrainConfig

    with pytest.raises(UsageError, match="lr_typo"):
        load_config(TrainConfig, {"optim": {"lr_typo": 1.0}})
    with pytest.raises(UsageError, match="max_steps"):
        load_config(TrainConfig, None, ["max_steps=many"])
    with pytest.raises(UsageError, match="max_bad_steps"):
        load_config(TrainConfig, None, ["max_bad_steps=-1"])
    for value in ("/tmp/elsewhere", "../../elsewhere", "logs/../../x"):
        ds = tmp_path / "ds.json"
        ds.write_text(json.dumps({"zero_optimization": {"stage": 3}, "tensorboard": {"enabled": True, "output_path": value}}))
        with pytest.raises(UsageError, match="must be relative to the run directory"):
            load_deepspeed_config(str(ds), 4, 1, 1.0, run_dir=tmp_path / "run")
    ds.write_text(json.dumps({"csv_monitor": {"enabled": True, "output_path": "logs"}, "tensorboard": {"enabled": True}}))
    cfg = load_deepspeed_config(str(ds), 4, 1, 1.0, run_dir=tmp_path / "run")
    assert cfg["csv_monitor"]["output_path"] == str(tmp_path / "run" / "logs")
    assert cfg["tensorboard"]["output_path"] == str(tmp_path / "run" / "deepspeed")  # not DeepSpeed's default, the working directory


# -- unwritable or full output directory ------------------------------------------------------------
def test_unwritable_output_is_an_error_before_training(token_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    proc = _train(token_dir, blocker / "run", 5)
    assert_usage_error(proc, "not writable", str(blocker / "run"))
    assert blocker.read_text() == "keep me" and "parameters per rank" not in proc.stderr  # before the model is built


def test_read_only_output_dir_is_an_error(tmp_path):
    from fourm.training.run_dir import check_writable

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: chmod does not stop writes (the path-under-a-file case covers the check)")
        with pytest.raises(ValueError, match="not writable"):
            check_writable(ro / "run")
    finally:
        ro.chmod(0o755)


def test_too_little_free_space_is_an_error(tmp_path):
    from fourm.training.run_dir import bytes_needed, check_free_space, checkpoint_bytes

    model = torch.nn.Linear(10, 10)  # 110 parameters
    assert checkpoint_bytes(model) == 4 * 110 * 3
    model.bias.requires_grad_(False)
    assert checkpoint_bytes(model) == 4 * (110 + 2 * 100)
    assert bytes_needed(tmp_path, 100, kept=2, final=40) == 340  # 2 kept + 1 being written + the final model
    (tmp_path / "checkpoints" / "step-00000002").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-00000002" / "model.safetensors").write_bytes(bytes(150))
    assert bytes_needed(tmp_path, 100, kept=2, final=40) == 190  # a resumed run's checkpoints are replaced
    check_free_space(tmp_path, 1)
    with pytest.raises(ValueError, match="MiB free under .* needs about"):
        check_free_space(tmp_path, shutil.disk_usage(tmp_path).free + 2**40)


def test_model_spec_of_a_resumed_run(tmp_path, caplog):
    from fourm.training.run_dir import MODEL_SPEC, model_spec

    current = {"arch": "decoder", "dim": 64, "n_layers": 2}
    assert model_spec(tmp_path, current, {}, resuming=False) is current  # fresh: the preset
    assert model_spec(tmp_path, current, {}, resuming=True) is current  # a run of before model_spec.json
    assert "missing" in caplog.text
    (tmp_path / MODEL_SPEC).write_text(json.dumps({"arch": "decoder", "dim": 64, "n_layers": 1, "qk_norm": "rms"}))
    assert model_spec(tmp_path, current, {"dim": 32}, resuming=True) == {"arch": "decoder", "dim": 32, "n_layers": 1, "qk_norm": "rms"}
    assert "n_layers=1 (preset now 2)" in caplog.text and "qk_norm='rms' (preset now None)" in caplog.text
    for bad in ("{torn", "[1, 2]"):
        (tmp_path / MODEL_SPEC).write_text(bad)
        with pytest.raises(ValueError, match="model_spec.json is (unreadable|not a JSON object)"):
            model_spec(tmp_path, current, {}, resuming=True)


def test_kill_resume_program_bad_arguments(tmp_path):
    assert_usage_error(run_program("eval/kill_resume.py", "--tokens", str(tmp_path), "--out", str(tmp_path / "o")), "manifest.json")
    assert_usage_error(run_program("eval/kill_resume.py", "--tokens", str(tmp_path), "--out", str(tmp_path / "o"), "--kills", "-1"), "--kills")
    assert not (tmp_path / "o").exists()
