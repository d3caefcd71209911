"""Scale-out (issue 34): a run resumed at another world size, resumed twice, resumed with another
batch size or gradient accumulation, and consolidated for inference; for real on CPU ranks (gloo,
DeepSpeed with DS_ACCELERATOR=cpu), with the tiniest model.

Run as a program (``python tests/test_scale_out.py resave OUT DEST --data DIR [--deepspeed JSON]``,
under torchrun for several ranks) it resumes ``OUT`` and, without training, writes the checkpoint
it loaded into ``DEST``: what a rank holds after loading, to compare with what was saved.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, assert_usage_error, run_program

SETS = ["model.dim=32", "model.enc_layers=1", "model.dec_layers=1", "data.batch_size=4", "data.shuffle_buffer=4", "data.num_workers=0", "log_every=1", "ckpt_every=2", "optim.lr=0.003", "optim.warmup_steps=2"]
CONFIG = "configs/train/tiny_encdec.yaml"
SAMPLES = 40  # token_dir: 4 shards of 10


def _args(token_dir, out, steps, *extra):
    sets = [a for s in SETS for a in ("--set", s)]
    return ["--config", CONFIG, "--data", str(token_dir), "--out", str(out), "--max-steps", str(steps), "--quiet", *sets, *extra]


def _launch(ranks: int, script: list[str], args: list[str], env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``script`` (a repo program, or this file) on ``ranks`` ranks under torchrun."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", DS_ACCELERATOR="cpu", **(env or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(29700 + os.getpid() % 200), *script, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def _train(ranks, token_dir, out, steps, *extra, log=None):
    proc = _launch(ranks, [str(REPO / "launch" / "train.py")], _args(token_dir, out, steps, *extra), {"FOURM_SAMPLE_LOG": str(log)} if log else None)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _resave(ranks, out, dest, *extra):
    """What ``ranks`` ranks hold after resuming ``out``, written as a checkpoint into ``dest``."""
    proc = _launch(ranks, [__file__, "resave"], [str(out), str(dest), *extra])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return next((dest / "checkpoints").iterdir())


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _samples(log: Path, upto: int | None = None) -> list[tuple[int, ...]]:
    """(step, source, epoch, shard, ordinal) of every sample trained on, every rank, steps <= upto."""
    rows = []
    for path in sorted(log.parent.glob(log.name + ".rank*")):
        rows += [tuple(int(v) for v in line.split()) for line in path.read_text().splitlines()]
    return sorted(r for r in rows if upto is None or r[0] <= upto)


def _max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b), set(a) ^ set(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _universal_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """A DeepSpeed checkpoint's weights and AdamW moments, whole, by parameter name (through
    DeepSpeed's universal form of it: ``fp32``, ``exp_avg``, ``exp_avg_sq``)."""
    from fourm.training.reshard import universal_checkpoint

    root = universal_checkpoint(checkpoint / "ds") / "zero"
    state = {}
    for param in sorted(p for p in root.iterdir() if p.is_dir()):
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            saved = torch.load(param / f"{key}.pt", weights_only=True)
            state[f"{param.name}.{key}"] = saved["param"] if isinstance(saved, dict) else saved
    return state


def _fp32_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint / "ds"), tag="state")


@pytest.fixture(scope="module")
def zero3_run(token_dir, tmp_path_factory):
    """ZeRO-3 at 2 ranks for 4 steps, resumed at 1 rank to step 8 and back at 2 ranks to step 12,
    every sample trained on logged; also what 1 rank holds right after loading the 2-rank step 4."""
    pytest.importorskip("deepspeed")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    root = tmp_path_factory.mktemp("zero3")
    out, log, ds = root / "run", root / "samples", ["--deepspeed", "configs/deepspeed/zero3.json", "--set", "keep_checkpoints=0"]
    _train(2, token_dir, out, 4, *ds, log=log)
    resaved = _resave(1, out, root / "resaved", *ds, "--data", str(token_dir))
    one = _train(1, token_dir, out, 8, *ds, "--resume", log=log)
    _train(2, token_dir, out, 12, *ds, "--resume", log=log)
    return out, log, resaved, one


def test_zero3_resumes_at_one_rank_and_back_at_two(zero3_run):
    """2 -> 1 -> 2 ranks through DeepSpeed's universal checkpoint: what 1 rank holds after loading
    the 2-rank checkpoint equals what was saved (weights and both AdamW moments, to 1e-6; weights
    also against DeepSpeed's own zero_to_fp32); training goes on (steps 1..12 once each) and the
    loss falls."""
    out, _, resaved, one = zero3_run
    original = out / "checkpoints" / "step-00000004"
    assert (original / "ds" / "state_universal" / "zero").is_dir()  # converted once, kept beside the original
    assert _max_diff(_universal_state(original), _universal_state(resaved)) <= 1e-6
    assert _max_diff(_fp32_weights(original), _fp32_weights(resaved)) <= 1e-6
    assert "world 2 -> 1" in one.stderr and "universal checkpoint" in one.stderr
    m = _metrics(out)
    assert [r["step"] for r in m] == list(range(1, 13))
    assert sum(r["loss"] for r in m[-3:]) < 0.97 * sum(r["loss"] for r in m[:3])
    assert m[-1]["tokens"] > m[7]["tokens"] > m[3]["tokens"]
    state = json.loads((out / "checkpoints" / "step-00000012" / "state.json").read_text())
    assert state["layout"]["world"] == 2 and state["layout"]["zero_stage"] == 3


def test_no_sample_twice_none_left_out_across_world_sizes(zero3_run):
    """The samples trained on at 2, then 1, then 2 ranks (80 in all, two epochs' worth): every
    sample of the first epoch exactly once, and no sample of a later one twice."""
    _, log, _, _ = zero3_run
    rows = _samples(log)
    assert len(rows) == 4 * 8 + 4 * 4 + 4 * 8
    by_epoch: dict[int, list] = {}
    for _, source, epoch, shard, ordinal in rows:
        by_epoch.setdefault(epoch, []).append((source, shard, ordinal))
    assert len(by_epoch[0]) == len(set(by_epoch[0])) == SAMPLES
    assert all(len(ids) == len(set(ids)) for ids in by_epoch.values())


@pytest.mark.parametrize("engine", ["zero2", "ddp"])
def test_zero2_and_ddp_resume_at_one_rank_with_their_state(engine, token_dir, tmp_path):
    """ZeRO-2 (universal checkpoint) and DDP (the project's own whole-model files) saved at 2
    ranks: 1 rank holds the same weights and AdamW moments after loading (to 1e-6)."""
    ds = ["--deepspeed", "configs/deepspeed/zero2.json"] if engine == "zero2" else []
    if ds:
        pytest.importorskip("deepspeed")
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    out = tmp_path / "run"
    _train(2, token_dir, out, 2, *ds)
    resaved = _resave(1, out, tmp_path / "resaved", *ds, "--data", str(token_dir))
    original = out / "checkpoints" / "step-00000002"
    if ds:
        assert _max_diff(_universal_state(original), _universal_state(resaved)) <= 1e-6
    else:
        for name in ("model.safetensors", "optimizer.safetensors"):
            assert _max_diff(load_file(str(original / name)), load_file(str(resaved / name))) == 0.0
        assert json.loads((original / "optimizer.json").read_text()) == json.loads((resaved / "optimizer.json").read_text())


def _loop_cfg(token_dir, *sets):
    from fourm.config import load_config
    from fourm.training.data import DataSource
    from fourm.training.loop import TrainConfig

    cfg = load_config(TrainConfig, REPO / CONFIG, [*SETS, *sets])
    cfg.data.sources = [DataSource(path=str(token_dir))]
    return cfg


class _Killed(Exception):
    pass


def _kill_after(monkeypatch, real, step: int) -> None:
    """The loop stops dead after optimizer step ``step`` (what kill -9 leaves: no checkpoint of it);
    ``real``: the loop's own ``_save_due``."""
    from fourm.training import loop

    def save_due(run, done, *args):
        result = real(run, done, *args)
        if done.step == step:
            raise _Killed(step)
        return result

    monkeypatch.setattr(loop, "_save_due", save_due)


def test_resume_twice_equals_an_uninterrupted_run(token_dir, tmp_path, monkeypatch):
    """Killed after step 5 (checkpoint 4), resumed, killed after step 9 (checkpoint 8), resumed to
    12: the same weights as 12 steps uninterrupted, bit for bit, and the same samples in the same
    steps (the data position after the second resume is where the uninterrupted run was)."""
    from fourm.training.loop import _save_due as save_due
    from fourm.training.loop import train

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("FOURM_SAMPLE_LOG", str(tmp_path / "a.samples"))
    train(_loop_cfg(token_dir, "max_steps=12"), tmp_path / "a", progress=False)
    logs = []
    for i, (steps, kept) in enumerate(((5, 4), (9, 8), (12, 12))):
        logs.append(tmp_path / f"b{i}.samples")
        monkeypatch.setenv("FOURM_SAMPLE_LOG", str(logs[-1]))
        _kill_after(monkeypatch, save_due, steps if steps != kept else -1)
        try:
            train(_loop_cfg(token_dir, "max_steps=12"), tmp_path / "b", resume=i > 0, progress=False)
        except _Killed:
            assert steps != kept
    a, b = load_file(str(tmp_path / "a" / "final" / "model.safetensors")), load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    assert _max_diff(a, b) == 0.0
    resumed = _samples(logs[0], 4) + _samples(logs[1], 8) + _samples(logs[2])
    assert resumed == _samples(tmp_path / "a.samples")
    assert [r["step"] for r in _metrics(tmp_path / "b")] == list(range(1, 13))
    final = [tmp_path / x / "checkpoints" / "step-00000012" for x in ("a", "b")]
    assert _max_diff(*(load_file(str(f / "data_position.safetensors")) for f in final)) == 0.0


def test_resume_with_another_batch_size_and_accumulation(token_dir, tmp_path, monkeypatch, caplog):
    """Batch 4 for 4 steps, then batch 2 with accumulation 2 (the same samples a step) to step 14:
    allowed, the choice logged; steps go on from 5, the learning rate is the schedule's at each step, tokens
    keep counting, and the resharded stream trains no sample of the epoch twice."""
    import logging

    from fourm.training.loop import _save_due as save_due
    from fourm.training.loop import lr_at, train

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("FOURM_SAMPLE_LOG", str(tmp_path / "samples"))
    _kill_after(monkeypatch, save_due, 4)  # stopped at its step-4 checkpoint, in a run of 14 steps
    with pytest.raises(_Killed):
        train(_loop_cfg(token_dir, "max_steps=14"), tmp_path / "run", progress=False)
    _kill_after(monkeypatch, save_due, -1)
    with caplog.at_level(logging.INFO):
        cfg = _loop_cfg(token_dir, "max_steps=14", "data.batch_size=2", "optim.grad_accum=2")
        train(cfg, tmp_path / "run", resume=True, progress=False)
    text = caplog.text
    assert "batch_size 4 -> 2" in text and "grad_accum 1 -> 2" in text and "learning-rate schedule goes on by step" in text and "resharded" in text
    m = _metrics(tmp_path / "run")
    assert [r["step"] for r in m] == list(range(1, 15))
    assert all(r["lr"] == pytest.approx(lr_at(r["step"] - 1, cfg.optim, cfg.max_steps)) for r in m)
    assert all(b["tokens"] > a["tokens"] for a, b in zip(m, m[1:]))
    rows = _samples(tmp_path / "samples")
    assert len(rows) == 4 * 4 + 10 * 4
    epoch0 = [r[1:] for r in rows if r[2] == 0]
    assert len(epoch0) == len(set(epoch0)) == SAMPLES


def test_changes_that_cannot_be_honoured_are_one_line(zero3_run, token_dir, tmp_path):
    """A ZeRO-3 checkpoint resumed without DeepSpeed, or under ZeRO-2: one line, exit 2."""
    import shutil

    out, _, _, _ = zero3_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("state_universal", "final"))
    assert_usage_error(run_program("launch/train.py", *_args(token_dir, copy, 14), "--resume"), "ZeRO-3", "--deepspeed configs/deepspeed/zero3.json")
    assert_usage_error(run_program("launch/train.py", *_args(token_dir, copy, 14), "--resume", "--deepspeed", "configs/deepspeed/zero2.json", env={"DS_ACCELERATOR": "cpu"}), "ZeRO-3", "ZeRO-2")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_consolidate_a_zero3_checkpoint_for_inference(zero3_run, tmp_path, dtype):
    """launch/consolidate.py: a ZeRO-3 checkpoint (of any world size) -> a from_pretrained directory
    holding DeepSpeed's own consolidation of it (zero_to_fp32), in fp32 or rounded to bf16."""
    import fourm

    out, _, _, _ = zero3_run
    checkpoint = out / "checkpoints" / "step-00000012"
    proc = run_program("launch/consolidate.py", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "model"), "--dtype", dtype, env={"DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0, proc.stderr
    weights = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert {v.dtype for v in weights.values()} == {torch.float32 if dtype == "fp32" else torch.bfloat16}
    reference = _fp32_weights(checkpoint)
    assert _max_diff({k: weights[k] for k in reference}, {k: v.to(weights[k].dtype) for k, v in reference.items()}) == 0.0
    model = fourm.load_model(tmp_path / "model")
    assert model.config.arch == "encdec" and (tmp_path / "model" / "tokenizers.json").is_file()
    assert_usage_error(run_program("launch/consolidate.py", "--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m2")), "nowhere")
    assert_usage_error(run_program("launch/consolidate.py", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "model")), "not empty")


def _resave_main(argv: list[str]) -> int:
    """``resave OUT DEST --data DIR [--deepspeed JSON] [--set KEY=VALUE ...]``: resume OUT on this world size and write the
    loaded state as a checkpoint under DEST, without a step."""
    import argparse
    import dataclasses

    from fourm.cli import setup_logging
    from fourm.config import load_config
    from fourm.training import loop
    from fourm.training.data import DataSource
    from fourm.training.engine import end_distributed

    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["resave"])
    p.add_argument("out")
    p.add_argument("dest")
    p.add_argument("--deepspeed", default=None)
    p.add_argument("--data", required=True)
    p.add_argument("--set", dest="sets", action="append", default=[])
    args = p.parse_args(argv)
    setup_logging()
    os.chdir(REPO)
    cfg = load_config(loop.TrainConfig, REPO / CONFIG, [*SETS, *args.sets])
    cfg.data.sources = [DataSource(path=args.data)]
    run, done = loop._set_up(cfg, Path(args.out), args.deepspeed, resume=True)
    loop._save_checkpoint(dataclasses.replace(run, out=Path(args.dest)), done)
    end_distributed(True, args.deepspeed is not None)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(_resave_main(sys.argv[1:]))
