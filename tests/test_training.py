"""The training loop end to end: single process, resume equivalence, DDP and DeepSpeed ZeRO-3 with
two ranks on CPU (gloo), data splitting, config errors."""

from __future__ import annotations

import math

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from conftest import REPO, assert_usage_error, run_program

TINY = ["--set", "model.dim=64", "--set", "model.enc_layers=1", "--set", "model.dec_layers=1", "--set", "data.batch_size=8", "--set", "data.shuffle_buffer=16", "--set", "log_every=2", "--quiet"]


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_single_process_loss_falls_and_final_loads(token_dir, tmp_path):
    out = tmp_path / "run"
    proc = run_program("launch/train.py", "--config", "configs/train/tiny_encdec.yaml", "--data", str(token_dir), "--out", str(out), "--max-steps", "40", "--set", "optim.lr=0.003", "--set", "optim.warmup_steps=5", "--set", "ckpt_every=20", *TINY)
    assert proc.returncode == 0, proc.stderr
    m = _metrics(out)
    assert m[-1]["step"] == 40 and m[-1]["loss"] < 0.8 * m[0]["loss"]
    assert {"loss/rgb", "loss/depth", "loss/semseg", "loss/caption", "loss/boxes", "tokens_per_s", "lr"} <= set(m[-1])
    import fourm

    model = fourm.load_model(out / "final")
    assert model.config.arch == "encdec" and (out / "final" / "vocab.json").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000020", "step-00000040"]


def test_decoder_only_trains(token_dir, tmp_path):
    out = tmp_path / "dec"
    tiny = ["--set", "model.dim=64", "--set", "data.batch_size=8", "--set", "data.shuffle_buffer=16", "--set", "log_every=2", "--quiet"]
    proc = run_program("launch/train.py", "--config", "configs/train/tiny_decoder.yaml", "--data", str(token_dir), "--out", str(out), "--max-steps", "30", "--set", "model.n_layers=2", "--set", "optim.lr=0.003", "--set", "optim.warmup_steps=5", *tiny)
    assert proc.returncode == 0, proc.stderr
    m = _metrics(out)
    assert m[-1]["loss"] < 0.8 * m[0]["loss"]


def test_resume_is_equivalent_to_an_uninterrupted_run(token_dir, tmp_path):
    args = ["--config", "configs/train/tiny_encdec.yaml", "--data", str(token_dir), "--set", "ckpt_every=6", *TINY]
    assert run_program("launch/train.py", *args, "--out", str(tmp_path / "a"), "--max-steps", "12").returncode == 0
    assert run_program("launch/train.py", *args, "--out", str(tmp_path / "b"), "--max-steps", "6").returncode == 0
    proc = run_program("launch/train.py", *args, "--out", str(tmp_path / "b"), "--max-steps", "12", "--resume")
    assert proc.returncode == 0, proc.stderr
    a, b = load_file(str(tmp_path / "a" / "final" / "model.safetensors")), load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    ma, mb = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert [r["loss"] for r in ma] == [r["loss"] for r in mb]  # no step counted twice or skipped


def test_resume_keeps_the_model_config_the_run_started_with(token_dir, tmp_path):
    """A preset edited between a kill and --resume (a pulled change of a default, say) does not
    change the model half-way: the run resumes with its own config (model_spec.json) and says
    where the preset now differs; a model override on --resume that cannot fit the checkpoint is
    a one-line error."""
    import yaml

    import fourm

    preset = tmp_path / "preset.yaml"
    base = {**yaml.safe_load((REPO / "configs/models/decoder_tiny.yaml").read_text()), "dim": 64, "n_layers": 1}
    preset.write_text(yaml.safe_dump(base))
    out = tmp_path / "run"
    args = ["--config", "configs/train/tiny_decoder.yaml", "--data", str(token_dir), "--out", str(out), "--set", f"model_preset={preset}", "--set", "ckpt_every=2", "--set", "data.batch_size=8", "--set", "data.shuffle_buffer=16", "--quiet"]
    assert run_program("launch/train.py", *args, "--max-steps", "2").returncode == 0
    assert json.loads((out / "model_spec.json").read_text()) == base
    preset.write_text(yaml.safe_dump({**base, "n_layers": 2, "modality_softmax": False}))
    proc = run_program("launch/train.py", *args, "--max-steps", "4", "--resume")
    assert proc.returncode == 0, proc.stderr
    assert "n_layers=1 (preset now 2)" in proc.stderr and "modality_softmax=True (preset now False)" in proc.stderr
    model = fourm.load_model(out / "final")
    assert model.config.n_layers == 1 and model.config.modality_softmax
    assert [r["step"] for r in _metrics(out)][-1] == 4
    assert_usage_error(run_program("launch/train.py", *args, "--max-steps", "6", "--resume", "--set", "model.dim=32"), "does not fit the model", "step-00000004")


def test_ranks_and_workers_see_disjoint_samples(token_dir):
    from fourm.objectives.mixture import ObjectiveConfig
    from fourm.training.data import DataSource, StreamConfig, TokenStream
    from fourm.vocab import SharedVocab

    manifest = json.loads((token_dir / "manifest.json").read_text())
    vocab = SharedVocab(**{k: manifest["vocab"][k] for k in ("specials", "spaces", "modalities")})
    cfg = StreamConfig(sources=[DataSource(str(token_dir))], seed=3)
    seen = []
    for rank in range(2):
        stream = TokenStream(cfg, "encdec", vocab, {}, manifest["grids"], ObjectiveConfig(), rank=rank, world=2)
        for worker in range(2):
            seen.append([key for key, *_ in stream._samples(stream.sources[0][0], epoch=0, worker=worker, workers=2)])
    flat = [k for keys in seen for k in keys]
    assert len(flat) == len(set(flat)) == 40 and all(len(k) == 10 for k in seen)


def _torchrun(args, env_extra, timeout=600):
    env = dict(os.environ, PYTHONWARNINGS="ignore", **env_extra)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(29500 + os.getpid() % 1000), str(REPO / "launch" / "train.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def test_ddp_two_ranks(token_dir, tmp_path):
    out = tmp_path / "ddp"
    proc = _torchrun(["--config", "configs/train/tiny_encdec.yaml", "--data", str(token_dir), "--out", str(out), "--max-steps", "20", "--set", "data.num_workers=0", "--set", "optim.lr=0.003", "--set", "optim.warmup_steps=5", *TINY], {})
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = _metrics(out)
    assert m[-1]["step"] == 20 and m[-1]["loss"] < m[0]["loss"]
    assert (out / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_two_ranks_consolidates(token_dir, tmp_path, stage):
    """Two ranks learn and write one consolidated model. Under ZeRO-3 with one sample per rank:
    the ranks' targets then cover different modalities, so the loss's output layer must still be
    gathered the same number of times on each (a ZeRO-3 collective; this hung before)."""
    pytest.importorskip("deepspeed")
    out = tmp_path / f"z{stage}"
    batch = ["--set", "data.batch_size=1"] if stage == 3 else []
    proc = _torchrun(["--config", "configs/train/tiny_encdec.yaml", "--data", str(token_dir), "--out", str(out), "--max-steps", "20", "--deepspeed", f"configs/deepspeed/zero{stage}.json", "--set", "data.num_workers=0", "--set", "optim.lr=0.003", "--set", "optim.warmup_steps=5", "--set", "ckpt_every=20", *TINY, *batch], {"DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = _metrics(out)
    assert m[-1]["step"] == 20 and m[-1]["loss"] < 0.9 * m[0]["loss"]
    import fourm

    final = fourm.load_model(out / "final")  # one from_pretrained directory, loadable anywhere
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sharded = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints" / "step-00000020" / "ds"), tag="state")
    ours = {k: v.detach() for k, v in final.state_dict().items()}
    assert set(sharded) <= set(ours)
    assert max(float((sharded[k].float() - ours[k].float()).abs().max()) for k in sharded) == 0.0
    summary = json.loads((out / "summary.json").read_text())
    whole = sum(p.numel() * p.element_size() for p in final.parameters())
    assert summary["parameter_bytes_whole"] == whole  # what one rank alone holds (bench.py --tiny's one-rank figure)
    if stage == 3:
        assert 0.4 < max(summary["parameter_bytes_per_rank"]) / whole < 0.75


def test_training_config_errors(token_dir, synth_dir, tmp_path):
    base = ["--config", "configs/train/tiny_encdec.yaml", "--out", str(tmp_path / "x")]
    assert_usage_error(run_program("launch/train.py", *base, "--data", str(token_dir), "--set", "optim.bogus=1"), "bogus")
    assert_usage_error(run_program("launch/train.py", *base, "--data", str(synth_dir)), "pretokenize")
    assert_usage_error(run_program("launch/train.py", *base, "--data", str(tmp_path / "none")), "no shards")
    assert_usage_error(run_program("launch/train.py", *base, "--data", str(token_dir), "--set", "objective.weights={next_token: 1.0, 5m: 1.0}"), "5m")
    assert_usage_error(run_program("launch/train.py", *base, "--data", str(token_dir), "--deepspeed", str(tmp_path / "nope.json")), "nope.json")


def test_pipe_urls_manifest_and_activation_checkpointing(token_dir, tmp_path):
    out = tmp_path / "pipe"
    url = f"pipe:cat {token_dir}/shard-{{000000..000003}}.tar"
    cfg = tmp_path / "pipe.yaml"
    cfg.write_text(f"model_preset: configs/models/encdec_tiny.yaml\nmanifest: {token_dir}/manifest.json\nactivation_checkpointing: true\ndata:\n  sources:\n    - {{path: '{url}', weight: 1.0}}\n")
    proc = run_program("launch/train.py", "--config", str(cfg), "--out", str(out), "--max-steps", "4", *TINY)
    assert proc.returncode == 0, proc.stderr
    assert _metrics(out)[-1]["step"] == 4


def test_warmup_cosine_schedule():
    from fourm.training.loop import OptimConfig, lr_at

    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg, 100) == pytest.approx(0.1) and lr_at(9, cfg, 100) == pytest.approx(1.0)
    assert lr_at(10, cfg, 100) == pytest.approx(1.0) and lr_at(55, cfg, 100) == pytest.approx(0.55)
    assert lr_at(100, cfg, 100) == pytest.approx(0.1) and lr_at(500, cfg, 100) == pytest.approx(0.1)
    values = [lr_at(s, cfg, 100) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_the_warm_up_ends_at_its_share_of_a_run_cut_short():
    """A time-capped run that makes few steps is not spent warming up: the warm-up ends after
    warmup_steps or warmup_share of the run's progress, whichever comes first."""
    from fourm.schedule import warmup_cosine

    assert warmup_cosine(9, 0.01, 1.0, 100, 0.05) == pytest.approx(0.1)  # by steps, as before
    assert warmup_cosine(9, 0.01, 1.0, 100, 0.05, warmup_share=0.05) == pytest.approx(0.2)  # progress is ahead
    assert warmup_cosine(20, 0.06, 1.0, 100, 0.05, warmup_share=0.05) == pytest.approx(0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * 0.06)))
    assert warmup_cosine(20, 0.5, 1.0, 100, 0.05) == pytest.approx(0.21)  # no share: by steps alone


@pytest.mark.parametrize("arch,mode,z,softmax", [("encdec", "token_mean", 0.0, []), ("encdec", "modality_mean", 1e-4, []), ("decoder", "token_mean", 1e-4, ["modality_softmax=false"]),
                                                ("decoder", "modality_mean", 1e-4, ["modality_softmax=true"]), ("encdec", "token_mean", 0.0, ["ordinal_sigma=1.5"]),
                                                ("decoder", "modality_mean", 0.0, ["modality_softmax=true", "ordinal_sigma=1.5"]), ("decoder", "token_mean", 0.0, ["modality_softmax=false", "ordinal_sigma=1.5"])])
def test_fast_loss_equals_full_logits(token_dir, arch, mode, z, softmax):
    """The training loop's loss path (padding skipped by every layer but attention; output layer
    only at labelled positions; for the encoder-decoder, and the decoder-only model with
    ``modality_softmax``, only over each modality's span) gives the loss, per-modality losses and
    gradients of the full-logits path."""
    from types import SimpleNamespace

    import torch

    from fourm.bench import speed
    from fourm.models.build import build_model
    from fourm.training.loop import compute_loss, model_loss

    cfg, vocab, data = speed._stream(token_dir, f"configs/train/tiny_{arch}.yaml", ["data.batch_size=6", "data.num_workers=0"])
    batch = next(data)
    labels, label_modality = batch.pop("labels"), batch.pop("label_modality")
    assert (labels == -100).any() and (labels != -100).any()
    # padding in every stack, so the loss path's unpadded layers (``Unpadded``) are what is compared
    assert all(not bool(batch[k].all()) for k in (("enc_valid", "dec_valid") if arch == "encdec" else ("attention_mask",)))
    torch.manual_seed(0)
    model = build_model(cfg.model_spec(), vocab=vocab, overrides=["dim=64", *softmax]).train()
    if hasattr(model, "spans"):
        assert any(hi - lo < vocab.size // 2 for lo, hi in model.spans)  # image modalities: a fraction of the vocabulary

    def grads():
        out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return out

    extra = {"label_modality": label_modality} if arch == "decoder" else {}  # the decoder's per-modality softmax reads it
    if model.config.ordinal_sigma:  # soft coordinate targets: box coordinates are among the labels
        lo, hi = model.config.ordinal_ranges[0]
        assert ((labels >= lo) & (labels < hi)).any()
    full, full_mod = compute_loss(model(**batch, **extra).logits, labels, label_modality, arch == "decoder", mode, z, model.config.ordinal())
    full.backward()
    g_full = grads()
    fast, fast_mod = model_loss(SimpleNamespace(forward=lambda b: model(**b)), batch, labels, label_modality, arch, mode, z)
    fast.backward()
    g_fast = grads()
    assert fast.item() == pytest.approx(full.item(), rel=1e-5)
    assert set(fast_mod) == set(full_mod) and all(fast_mod[m].item() == pytest.approx(full_mod[m].item(), rel=1e-5) for m in full_mod)
    assert set(g_fast) == set(g_full)
    for name in g_full:
        assert torch.allclose(g_fast[name], g_full[name], atol=1e-6, rtol=1e-4), name


def test_train_closes_the_process_group_it_started_and_only_that(token_dir, tmp_path, monkeypatch):
    """A group left open ends its threads in the interpreter's shutdown (a finished two-rank run
    aborted so once in CI): train() closes the group it started; one the caller started stays."""
    import torch.distributed as dist

    from fourm.config import load_config
    from fourm.training import loop
    from fourm.training.data import DataSource

    def start_group(use_deepspeed):  # what init_distributed does under torchrun, for one rank
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/owned_store", rank=0, world_size=1)
        return 0, 1

    def cfg():
        sets = ["model.dim=32", "model.enc_layers=1", "model.dec_layers=1", "data.batch_size=4", "data.num_workers=0", "max_steps=2"]
        c = load_config(loop.TrainConfig, REPO / "configs/train/tiny_encdec.yaml", sets)
        c.data.sources = [DataSource(path=str(token_dir))]
        return c

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(loop, "init_distributed", start_group)
    assert loop.train(cfg(), tmp_path / "owned", progress=False)["steps"] == 2
    assert not dist.is_initialized()

    monkeypatch.setattr(loop, "init_distributed", lambda use_deepspeed: (0, 1))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/callers_store", rank=0, world_size=1)
    try:
        assert loop.train(cfg(), tmp_path / "callers", progress=False)["steps"] == 2
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


def test_the_fused_adamw_steps_as_the_reference_adamw():
    """The loop's optimizer outside DeepSpeed is PyTorch's fused AdamW (decay on matrices only); a
    few steps leave the same weights and moments as the reference implementation, to 1e-5."""
    import torch

    from fourm.training.loop import OptimConfig, make_optimizer

    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1)
    opts = [make_optimizer(list(m.parameters()), cfg, fused=f) for m, f in zip(models, (True, False))]
    assert opts[0].defaults["fused"] and not opts[1].defaults["fused"]
    assert [g["weight_decay"] for g in opts[0].param_groups] == [0.1, 0.0] and len(opts[0].param_groups[0]["params"]) == 2  # the two weight matrices
    x, before = torch.randn(32, 8), models[0][0].weight.detach().clone()
    for _ in range(5):
        for m, opt in zip(models, opts):
            m(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(opts[0].state[a]["exp_avg_sq"], opts[1].state[b]["exp_avg_sq"], atol=1e-6, rtol=1e-5)
    assert (models[0][0].weight - before).abs().max() > 1e-2  # the steps moved the weights


def test_a_checkpoint_that_does_not_fit_is_told_by_its_tensors_not_by_error_text():
    """``first_difference`` names the first missing key, shape difference or unexpected key (what
    resume reports for a checkpoint of another model), and nothing when the tensors fit."""
    import torch

    from fourm.weights import first_difference

    model = {"a.weight": torch.zeros(4, 2), "b.weight": torch.zeros(3)}
    assert first_difference(model, {k: v.clone() for k, v in model.items()}) is None
    assert first_difference(model, {"a.weight": torch.zeros(4, 2)}) == "missing b.weight"
    assert first_difference(model, {"a.weight": torch.zeros(8, 2), "b.weight": torch.zeros(3)}) == "a.weight: shape (8, 2) in the checkpoint, (4, 2) in the model"
    assert first_difference(model, {**model, "c.bias": torch.zeros(1)}) == "unexpected c.bias"
    assert first_difference(model, {"a.weight": torch.zeros(4, 2)}, optional=("b.weight",)) is None  # a tied head, saved once


def _tiny_cfg(token_dir, *sets):
    from fourm.config import load_config
    from fourm.training import loop
    from fourm.training.data import DataSource

    base = ["model.dim=32", "model.enc_layers=1", "model.dec_layers=1", "data.batch_size=4", "data.num_workers=0", "ckpt_every=2"]
    c = load_config(loop.TrainConfig, REPO / "configs/train/tiny_encdec.yaml", [*base, *sets])
    c.data.sources = [DataSource(path=str(token_dir))]
    return c


def test_the_loop_times_its_own_step_and_a_resumed_run_keeps_the_choice(token_dir, tmp_path, monkeypatch):
    """Precision is chosen by timing the run's first batch both ways (an injected timing here), the
    choice is recorded in every checkpoint, and --resume takes it from there instead of timing again."""
    import torch

    from fourm import precision
    from fourm.training import loop

    monkeypatch.chdir(REPO)
    monkeypatch.delenv(precision.ENV, raising=False)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(precision, "_CHOICES", {})
    timed = []

    def fake_time_steps(step, rounds=4, timer=None):
        step(None, 0)  # the real probe steps run (and must leave no trace behind)
        step(torch.bfloat16, 1)
        timed.append(1)
        return 0.3, 0.1  # bf16 three times as fast

    monkeypatch.setattr(precision, "time_steps", fake_time_steps)
    seen = []
    real_forward = loop.Engine.forward
    monkeypatch.setattr(loop.Engine, "forward", lambda self, batch: seen.append(self.autocast_dtype) or real_forward(self, batch))
    loop.train(_tiny_cfg(token_dir, "max_steps=2"), tmp_path / "run", progress=False)
    assert timed == [1] and set(seen) == {torch.bfloat16}
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-00000002" / "state.json").read_text())
    assert state["autocast"] == "bfloat16"
    monkeypatch.setattr(precision, "time_steps", lambda *a, **k: pytest.fail("a resumed run keeps its precision"))
    seen.clear()
    loop.train(_tiny_cfg(token_dir, "max_steps=4"), tmp_path / "run", resume=True, progress=False)
    assert set(seen) == {torch.bfloat16}


def test_the_runs_own_steps_overturn_a_probe_that_misled(token_dir, tmp_path, monkeypatch):
    """A timed choice is tried on the run's first steps (``StepTrial``, injected step times here):
    the probe said bf16, the run's steps say fp32, and the rest of the run and its checkpoint are
    fp32; with ``precision_trial=false`` the probe's choice holds."""
    import torch

    from fourm import precision
    from fourm.training import loop

    monkeypatch.chdir(REPO)
    monkeypatch.delenv(precision.ENV, raising=False)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(precision, "_CHOICES", {})
    monkeypatch.setattr(precision, "time_steps", lambda step, rounds=8, timer=None: (0.3, 0.1))  # the probe: bf16 3x as fast

    class Trial(precision.StepTrial):  # small, and timed by the dtype alone: bf16 twice as slow a token
        def __init__(self, chosen):
            super().__init__(chosen, settle=1, block=2, blocks=2)

        def record(self, seconds, tokens):
            super().record((2.0 if self.dtype() is torch.bfloat16 else 1.0) * tokens, tokens)

    monkeypatch.setattr(loop, "StepTrial", Trial)
    seen = []
    real_forward = loop.Engine.forward
    monkeypatch.setattr(loop.Engine, "forward", lambda self, batch: seen.append(self.autocast_dtype) or real_forward(self, batch))
    loop.train(_tiny_cfg(token_dir, "max_steps=7"), tmp_path / "run", progress=False)
    bf16 = torch.bfloat16
    assert seen == [bf16, None, None, bf16, bf16, None, None]  # settle, fp32 block, bf16 block, then fp32 kept
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-00000007" / "state.json").read_text())
    assert state["autocast"] == "float32"
    seen.clear()
    monkeypatch.setattr(precision, "_CHOICES", {})
    loop.train(_tiny_cfg(token_dir, "max_steps=7", "precision_trial=false"), tmp_path / "untried", progress=False)
    assert seen == [bf16] * 7


def test_the_probe_leaves_the_run_as_it_would_have_been(token_dir, tmp_path, monkeypatch):
    """Timing the first batch both ways changes nothing: the same weights as a run told its
    precision (fp32 both)."""
    from fourm import precision
    from fourm.training import loop

    monkeypatch.chdir(REPO)
    loop.train(_tiny_cfg(token_dir, "max_steps=3"), tmp_path / "told", progress=False)  # FOURM_CPU_BF16=0 (conftest)
    monkeypatch.delenv(precision.ENV, raising=False)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(precision, "_CHOICES", {})
    monkeypatch.setattr(precision, "WORKLOAD_PAYS", float("inf"))  # timed, and fp32 chosen whatever the figures
    loop.train(_tiny_cfg(token_dir, "max_steps=3"), tmp_path / "timed", progress=False)
    a, b = load_file(str(tmp_path / "told" / "final" / "model.safetensors")), load_file(str(tmp_path / "timed" / "final" / "model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    import torch
    import yaml

    from fourm.models.build import build_model
    from fourm.training.optimizers import MuonWithAdamW, OptimConfig, make_optimizer, muon_split

    for preset in ("encdec_tiny", "decoder_tiny"):
        spec = {**yaml.safe_load((REPO / "configs/models" / f"{preset}.yaml").read_text()), "vocab_size": 300, "modalities": ["rgb", "depth", "semseg", "boxes", "caption"], "qk_norm": "layernorm", "tie_embeddings": False}
        model = build_model(spec)
        muon, adamw = muon_split(model)
        assert muon and all(n.endswith((".wqkv.weight", ".wo.weight", ".wq.weight", ".wkv.weight", ".gate.weight", ".up.weight", ".down.weight")) for n in muon), preset
        shapes = dict(model.named_parameters())
        assert all(shapes[n].dim() == 2 for n in muon)
        for name in adamw:  # embeddings, head, pixel stem, norms (q/k norms are 2-D but no matrices)
            assert name.split(".")[0] in ("embed", "lm_head", "pixel_embed", "modality_embeddings") or "norm" in name, name
        assert any("norm" in n and shapes[n].dim() == 2 for n in adamw) and "embed.weight" in adamw
        assert sorted(muon + adamw) == sorted(shapes)
        assert len(muon_split(model, min_dim=300)[0]) < len(muon) and len(muon_split(model, min_dim=10**6)[0]) == 0  # only the big ones
        opt = make_optimizer(model, OptimConfig(name="muon", muon_lr_scale=2.0), fused=False)
        assert isinstance(opt, MuonWithAdamW) and isinstance(opt.optimizers[0], torch.optim.Muon)
        assert sum(len(g["params"]) for g in opt.optimizers[0].param_groups) == len(muon)
        assert opt.param_groups[0]["lr"] == pytest.approx(2e-3) and opt.param_groups[0]["lr_scale"] == 2.0
    with pytest.raises(ValueError, match="adamw' or 'muon"):
        OptimConfig(name="sgd")


def test_muon_state_survives_a_checkpoint(tmp_path):
    """Muon + AdamW's one state dict, through the checkpoint's files, steps on exactly as the original."""
    import torch

    from fourm.training.checkpoint import optimizer_from_files, optimizer_to_files
    from fourm.training.optimizers import OptimConfig, make_optimizer

    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Embedding(10, 16), torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 8)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    cfg = OptimConfig(name="muon", lr=1e-2)
    opts = [make_optimizer(m, cfg, fused=False) for m in models]
    x = torch.randint(0, 10, (4, 3))

    def step(m, opt):
        m(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step(models[0], opts[0])
    optimizer_to_files(opts[0], tmp_path)
    models[1].load_state_dict(models[0].state_dict())
    optimizer_from_files(opts[1], tmp_path)
    for _ in range(2):
        for m, opt in zip(models, opts):
            step(m, opt)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_muon_trains(token_dir, tmp_path):
    out = tmp_path / "muon"
    proc = run_program("launch/train.py", "--config", "configs/train/tiny_encdec.yaml", "--data", str(token_dir), "--out", str(out), "--max-steps", "30", "--set", "optim.name=muon", "--set", "optim.lr=0.003", "--set", "optim.warmup_steps=5", *TINY)
    assert proc.returncode == 0, proc.stderr
    m = _metrics(out)
    assert m[-1]["loss"] < 0.8 * m[0]["loss"]


def test_deadline_minutes_only_ever_lengthen_the_run():
    from fourm.training.loop import deadline_minutes

    # 600 s left; keep 45 s + 250 steps of 0.2 s after training: 505 s more, 1 minute done
    assert deadline_minutes(5.0, 60.0, 1000.0, 1600.0, 45.0, 250.0, 0.2) == pytest.approx((60 + 505) / 60)
    assert deadline_minutes(5.0, 60.0, 1000.0, 1200.0, 45.0, 250.0, 0.2) == 5.0  # too little left: as planned
    assert deadline_minutes(5.0, 60.0, 1000.0, 1600.0, 45.0, 250.0, 2.0) == 5.0  # slow steps keep more back


def test_a_run_with_a_deadline_times_its_steps_and_trains_on(token_dir, tmp_path, monkeypatch, caplog):
    """Once its steps are timed, a run whose deadline leaves room trains past its max_minutes; one
    whose deadline does not keeps them (the step cap ends both runs here)."""
    import logging
    import time

    from fourm.training import loop

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(loop, "DEADLINE_TIMED", (1, 3))
    far = _tiny_cfg(token_dir, "bf16=false", "max_steps=4", "max_minutes=30", f"deadline={time.time() + 7200}", "after_steps=10", "after_seconds=60")
    with caplog.at_level(logging.INFO, logger="fourm.training.loop"):
        loop.train(far, tmp_path / "far", progress=False)
    assert far.max_minutes > 100 and "instead of 30.00" in caplog.text
    near = _tiny_cfg(token_dir, "bf16=false", "max_steps=4", "max_minutes=30", f"deadline={time.time() + 60}", "after_steps=10", "after_seconds=60")
    loop.train(near, tmp_path / "near", progress=False)
    assert near.max_minutes == 30
    from fourm.cli import UsageError

    with pytest.raises(UsageError, match="deadline needs a max_minutes"):
        _tiny_cfg(token_dir, f"deadline={time.time()}")
