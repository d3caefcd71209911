"""LoRA through peft and vocabulary growth: trainable parameters, a frozen base, adapter
save/load/merge/switch equivalence, the programs (train with ``lora:``, generate --adapter,
merge_lora.py) and DeepSpeed ZeRO-2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import REPO, assert_usage_error, run_program
from fourm.models.build import build_model, load_model, save_pretrained
from fourm.models.grow import check_extends, grow_model, load_for_vocab, new_token_ids
from fourm.models.lora import LoraSettings, apply_lora, load_adapters, save_adapter, trainable_parameters
from fourm.vocab import SharedVocab

TINY = {"dim": 64, "n_heads": 4, "n_kv_heads": 2}
LORA_RUN = ["--set", "data.batch_size=8", "--set", "data.shuffle_buffer=16", "--set", "data.num_workers=0", "--set", "log_every=2", "--set", "optim.warmup_steps=2", "--set", "optim.lr=0.01", "--quiet"]


def _vocabs():
    old = SharedVocab.build({"text": 120, "box_coords": 32, "rgb": 64})
    return old, old.grow({"depth": 40})


def _model(arch: str, vocab: SharedVocab, **extra):
    layers = {"enc_layers": 1, "dec_layers": 1} if arch == "encdec" else {"n_layers": 2}
    torch.manual_seed(0)
    return build_model({"arch": arch, **TINY, **layers, **extra}, vocab=vocab).eval()


def _encdec_batch(model, modality: str, b: int = 2, s: int = 6, t: int = 5) -> dict:
    g = torch.Generator().manual_seed(1)
    idx = model.config.modalities.index(modality)
    return dict(
        enc_ids=torch.randint(4, 200, (b, s), generator=g), enc_modality=torch.full((b, s), model.config.modalities.index("rgb")),
        enc_positions=torch.arange(s).expand(b, s), enc_valid=torch.ones(b, s, dtype=torch.bool),
        dec_ids=torch.full((b, t), 3), dec_modality=torch.full((b, t), idx), dec_positions=torch.arange(t).expand(b, t),
        dec_causal=torch.zeros(b, t, dtype=torch.bool), dec_valid=torch.ones(b, t, dtype=torch.bool),
    )


def _logits(model, arch: str, modality: str = "rgb") -> torch.Tensor:
    with torch.no_grad():
        if arch == "encdec":
            return model(**_encdec_batch(model, modality)).logits
        return model(torch.randint(4, 200, (2, 7), generator=torch.Generator().manual_seed(1))).logits


@pytest.mark.parametrize("arch,sort", [("encdec", False), ("decoder", False), ("encdec", True)])
def test_grown_model_keeps_old_ids_and_outputs(arch, sort):
    old, new = _vocabs()
    if sort:  # as a token manifest lists it (JSON with sorted keys): modalities in another order
        new = SharedVocab(specials=new.specials, spaces=new.spaces, modalities=dict(sorted(new.modalities.items())))
        assert list(new.modalities)[-1] != "depth"
    assert new_token_ids(old, new) == list(range(old.size, new.size))
    for space, rng in old.spaces.items():  # no id renumbered
        assert new.spaces[space] == rng
    base = _model(arch, old)
    grown = grow_model(base, old, new)
    assert grown.config.vocab_size == new.size
    a, b = _logits(base, arch), _logits(grown, arch)
    # equal up to float rounding (the output matmul is one of another width, blocked differently)
    torch.testing.assert_close(a, b[..., : old.size], atol=1e-6, rtol=0)
    if arch == "encdec":  # a new target's logits are restricted to the new modality's ids
        assert grown.config.modalities == list(new.modalities)
        logits = _logits(grown, arch, "depth")
        r = new.space_range("depth")
        assert torch.isfinite(logits[..., r.start : r.stop]).all() and torch.isinf(logits[..., : r.start]).all()
    with pytest.raises(ValueError, match="renumbered"):
        check_extends(new, SharedVocab.build({"text": 120, "box_coords": 32, "rgb": 64, "depth": 40}))


@pytest.mark.parametrize("arch", ["encdec", "decoder"])
def test_loaded_for_a_reordered_vocabulary_the_model_follows_the_data_order(arch, tmp_path):
    """A model built from a tokenizer set keeps the set's modality order; token manifests list
    modalities sorted. Loaded for such data (training's ``init_from``), an encoder-decoder's
    per-modality rows follow the data's order, and its outputs by modality name stay the same."""
    old, _ = _vocabs()
    data = SharedVocab(specials=old.specials, spaces=old.spaces, modalities=dict(sorted(old.modalities.items())))
    assert old.to_json() == data.to_json() and list(old.modalities) != list(data.modalities)
    base = _model(arch, old, **({"modality_softmax": True} if arch == "decoder" else {}))
    save_pretrained(base, tmp_path / "base", vocab=old)
    model, model_vocab = load_for_vocab(tmp_path / "base", data)
    assert list(model_vocab.modalities) == list(old.modalities)
    if arch == "decoder":  # no per-modality rows; the per-modality softmax's id ranges follow the data's order
        assert model.config.modalities == list(data.modalities) != base.config.modalities
        for name in data.modalities:
            i, j = model.config.modalities.index(name), base.config.modalities.index(name)
            assert model.spans[i] == base.spans[j] and torch.equal(model.allowed[i], base.allowed[j])
        torch.testing.assert_close(_logits(model.eval(), arch), _logits(base, arch), atol=0, rtol=0)
        return
    assert model.config.modalities == list(data.modalities) != base.config.modalities
    for name in data.modalities:
        torch.testing.assert_close(model.modality_embeddings.weight[model.modality_index(name)], base.modality_embeddings.weight[base.modality_index(name)], atol=0, rtol=0)
    for target in ("rgb", "caption"):  # _encdec_batch picks modality indices by name, each in its model's order
        torch.testing.assert_close(_logits(model.eval(), arch, target), _logits(base, arch, target), atol=1e-6, rtol=0)
    (tmp_path / "base" / "vocab.json").unlink()  # without the model's vocabulary: the same ids taken on trust, re-ordered all the same
    model, _ = load_for_vocab(tmp_path / "base", data)
    assert model.config.modalities == list(data.modalities)
    torch.testing.assert_close(_logits(model.eval(), arch, "caption"), _logits(base, arch, "caption"), atol=1e-6, rtol=0)


def test_trainable_parameters_are_adapters_and_new_rows_only():
    old, new = _vocabs()
    base = grow_model(_model("encdec", old), old, new)
    settings = LoraSettings(enabled=True, r=4, targets=["attention", "cross"], new_tokens=["lm_head"])
    base_total = sum(p.numel() for p in base.parameters())
    model = apply_lora(base, settings, new_token_ids(old, new), [len(old.modalities)])
    trainable, total = trainable_parameters(model)
    d, qkv = 64, 64 + 2 * 2 * 16  # wqkv: 4 query heads + 2 kv heads of 16
    lora = 4 * ((d + qkv) + (d + d)) * 2 + 4 * ((d + d) + (d + 2 * 32) + (d + d))  # 2 self-attn, 1 cross
    assert trainable == lora + (new.size - old.size) * d + d  # + new lm_head rows + one modality row
    assert total == base_total
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in n or "trainable_tokens_delta" in n for n in names)
    assert not any("embed.token_adapter" in n for n in names)  # lm_head only, as configured


@pytest.mark.parametrize("arch", ["encdec", "decoder"])
def test_adapter_save_load_merge_switch(arch, tmp_path):
    old, new = _vocabs()
    base = _model(arch, old)
    save_pretrained(base, tmp_path / "base", vocab=old)
    adapters = {}
    for i, name in enumerate(("one", "two")):
        model = apply_lora(grow_model(base, old, new), LoraSettings(enabled=True, r=4), new_token_ids(old, new), [len(old.modalities)] if arch == "encdec" else [])
        with torch.no_grad():  # stand-in for training: every trainable tensor moves
            g = torch.Generator().manual_seed(i)
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
        save_adapter(model, tmp_path / name, new, old.size, base=str(tmp_path / "base"))
        adapters[name] = model.eval()
    assert {"adapter_config.json", "adapter_model.safetensors", "vocab.json", "adapter.json"} <= set(os.listdir(tmp_path / "one"))
    assert not any(k.startswith("base_model.model.encoder.0.attn.wqkv.base_layer") for k in load_file(str(tmp_path / "one" / "adapter_model.safetensors")))

    loaded, vocab = load_adapters(tmp_path / "base", {"one": tmp_path / "one", "two": tmp_path / "two"})
    assert vocab.to_json() == new.to_json()
    target = "depth" if arch == "encdec" else "rgb"
    want_one, want_two = _logits(adapters["one"], arch, target), _logits(adapters["two"], arch, target)
    assert torch.equal(_logits(loaded, arch, target), want_one)
    loaded.set_adapter("two")
    assert torch.equal(_logits(loaded, arch, target), want_two)
    with loaded.disable_adapter():  # the base, grown: old ids as before
        torch.testing.assert_close(_logits(loaded, arch)[..., : old.size], _logits(base, arch), atol=1e-6, rtol=0)
    merged = load_adapters(tmp_path / "base", [tmp_path / "one"])[0].merge_and_unload()
    torch.testing.assert_close(_logits(merged, arch, target).nan_to_num(0.0, 0.0, 0.0), want_one.nan_to_num(0.0, 0.0, 0.0), atol=1e-5, rtol=0)
    other = SharedVocab.build({"text": 120, "box_coords": 32, "rgb": 64}).grow({"semseg": 8})
    (tmp_path / "two" / "vocab.json").write_text(json.dumps(other.to_json()))
    with pytest.raises(ValueError, match="different vocabularies"):
        load_adapters(tmp_path / "base", [tmp_path / "one", tmp_path / "two"])


@pytest.fixture(scope="module")
def base_run(token_dir, tmp_path_factory):
    """A tiny encoder-decoder trained for a few steps: the base the LoRA runs adapt."""
    out = tmp_path_factory.mktemp("lora") / "base"
    proc = run_program("launch/train.py", "--config", "configs/train/tiny_encdec.yaml", "--data", str(token_dir), "--out", str(out), "--max-steps", "4",
                       "--set", "model.dim=64", "--set", "model.enc_layers=1", "--set", "model.dec_layers=1", *LORA_RUN)
    assert proc.returncode == 0, proc.stderr
    return out / "final"


def test_lora_run_trains_adapter_only_and_programs_use_it(base_run, token_dir, synth_dir, tmp_path):
    out = tmp_path / "lora"
    base_bytes = (base_run / "model.safetensors").read_bytes()
    proc = run_program("launch/train.py", "--config", "configs/train/lora_rgb_to_depth.yaml", "--data", str(token_dir), "--out", str(out), "--max-steps", "16",
                       "--set", f"init_from={base_run}", "--set", "ckpt_every=8", *LORA_RUN)
    assert proc.returncode == 0, proc.stderr
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 16 and all(m["loss"] == m["loss"] for m in metrics)
    summary = json.loads((out / "summary.json").read_text())
    assert 0 < summary["trainable_parameters"] <= 0.05 * summary["base_parameters"]
    # the base on disk and the frozen weights inside the last checkpoint are bit-identical to it
    assert (base_run / "model.safetensors").read_bytes() == base_bytes
    base = load_file(str(base_run / "model.safetensors"))
    ckpt = load_file(str(out / "checkpoints" / "step-00000016" / "model.safetensors"))
    frozen = {k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in ckpt.items() if "lora_" not in k}
    assert base.keys() <= frozen.keys() and all(torch.equal(base[k], frozen[k]) for k in base)
    assert json.loads((out / "final" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    adapter = load_file(str(out / "final" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter) and any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)

    rgb = next(p for p in sorted(synth_dir.rglob("*")) if p.suffix == ".tar")  # any input image
    import tarfile

    with tarfile.open(rgb) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("rgb.png"))
        (tmp_path / "in.png").write_bytes(tar.extractfile(member).read())
    proc = run_program("launch/generate.py", "--model", str(base_run), "--adapter", str(out / "final"), "--from", f"rgb={tmp_path / 'in.png'}", "--to", "depth", "--out", str(tmp_path / "gen"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "gen" / "depth.npy").is_file()

    proc = run_program("launch/merge_lora.py", "--model", str(base_run), "--adapter", str(out / "final"), "--out", str(tmp_path / "merged"))
    assert proc.returncode == 0, proc.stderr
    merged, adapted = load_model(tmp_path / "merged"), load_adapters(base_run, [out / "final"])[0]
    batch = _encdec_batch(merged, "depth")
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits.nan_to_num(0.0, 0.0, 0.0), adapted(**batch).logits.nan_to_num(0.0, 0.0, 0.0), atol=1e-5, rtol=0)
    assert_usage_error(run_program("launch/merge_lora.py", "--model", str(base_run), "--adapter", str(tmp_path), "--out", str(tmp_path / "m2")), "not a fourm adapter")
    assert not (tmp_path / "m2").exists()
    assert_usage_error(run_program("launch/merge_lora.py", "--model", str(base_run), "--adapter", str(out / "final"), "--out", str(tmp_path / "merged")), "not an empty directory")
    assert_usage_error(run_program("launch/train.py", "--config", "configs/train/lora_rgb_to_depth.yaml", "--data", str(token_dir), "--out", str(tmp_path / "x")), "init_from")


def test_lora_under_deepspeed_zero2(base_run, token_dir, tmp_path):
    out = tmp_path / "ds"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531", str(REPO / "launch/train.py"),
           "--config", "configs/train/lora_rgb_to_depth.yaml", "--data", str(token_dir), "--out", str(out), "--max-steps", "6",
           "--deepspeed", "configs/deepspeed/zero2.json", "--set", f"init_from={base_run}", "--set", "ckpt_every=6", *LORA_RUN]
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world"] == 2 and summary["engine"] == "deepspeed"
    model, _ = load_adapters(base_run, [out / "final"])
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())  # B starts at zero: it trained


def test_lora_config_is_checked():
    with pytest.raises(ValueError, match="lora.r"):
        LoraSettings(r=0)
    with pytest.raises(ValueError, match="new_tokens"):
        LoraSettings(new_tokens=["head"])
    assert "cross.wq" not in LoraSettings().target_modules("decoder")
    spec = yaml.safe_load((REPO / "configs/train/lora_rgb_to_depth.yaml").read_text())
    assert spec["lora"]["enabled"] is True
