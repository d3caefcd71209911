"""tokenizers/train.py, tokenizers/evaluate.py and data_pipelines/pretokenize.py end to end, tiny."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import numpy as np
import pytest
import webdataset as wds

from conftest import assert_usage_error, run_program
from fourm.tokenizers.image import ImageTokenizerConfig
from fourm.tokenizers.train_image import ImageTokenizerTrainingConfig, ImageTrainConfig, train_image_tokenizer
from fourm.vocab import SharedVocab

TINY = ["--set", "tokenizer.channels=[8,16,16]", "--set", "tokenizer.stem_patch=1", "--set", "tokenizer.res_blocks=1", "--set", "train.batch_size=8", "--set", "train.val_every=20", "--set", "train.val_samples=16", "--set", "train.warmup_steps=5"]


def test_image_tokenizer_training_loss_falls(synth_dir):
    cfg = ImageTokenizerTrainingConfig(
        tokenizer=ImageTokenizerConfig(modality="semseg", channels=[8, 16, 16]),
        train=ImageTrainConfig(batch_size=8, max_steps=60, warmup_steps=5, lr=3e-3, num_workers=0),
    )
    _, history = train_image_tokenizer(cfg, synth_dir, progress=False)
    losses = history["loss"]
    assert history["steps"] == 60
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:5])


@pytest.fixture(scope="module")
def tokset(tmp_path_factory, synth_dir):
    out = tmp_path_factory.mktemp("tokset") / "set"
    proc = run_program("tokenizers/train.py", "--config", "configs/tokenizers/text.yaml", "--data", str(synth_dir), "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    for modality in ("rgb", "semseg"):
        proc = run_program("tokenizers/train.py", "--config", f"configs/tokenizers/{modality}.yaml", "--data", str(synth_dir), "--val", str(synth_dir), "--out", str(out), "--max-steps", "20", "--quiet", *TINY)
        assert proc.returncode == 0, proc.stderr
    return out


def test_train_writes_a_tokenizer_set(tokset):
    assert (tokset / "text" / "tokenizer.json").is_file()
    assert (tokset / "rgb" / "model.safetensors").is_file() and (tokset / "semseg" / "model.safetensors").is_file()
    assert json.loads((tokset / "boxes" / "config.json").read_text())["bins"] == 1000
    vocab = SharedVocab.load(tokset / "vocab.json")
    assert set(vocab.modalities) == {"rgb", "semseg", "boxes", "caption"}
    history = json.loads((tokset / "rgb" / "train_history.json").read_text())
    assert history["steps"] == 20 and history["val"] and "psnr" in history["val"][-1]
    assert json.loads((tokset / "rgb" / "train_config.json").read_text())["tokenizer"]["channels"] == [8, 16, 16]


def test_text_config_sets_the_box_bins(synth_dir, tmp_path):
    from fourm.tokenizers.tokenizer_set import TokenizerSet

    out = tmp_path / "set"
    proc = run_program("tokenizers/train.py", "--config", "configs/tokenizers/text.yaml", "--data", str(synth_dir), "--out", str(out), "--set", "boxes.bins=64", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "boxes" / "config.json").read_text())["bins"] == 64
    tset = TokenizerSet.from_pretrained(out)
    assert len(tset.vocab.space_range("box_coords")) == 64
    box = {"bbox": [3.0, 10.0, 40.0, 63.0], "label": "large red sphere"}
    back = tset.decode("boxes", tset.encode("boxes", [[box]], image_size=(64, 64)), image_size=(64, 64))[0]
    assert back[0]["label"] == box["label"] and max(abs(a - b) for a, b in zip(back[0]["bbox"], box["bbox"])) <= 0.51
    assert_usage_error(run_program("tokenizers/train.py", "--config", "configs/tokenizers/text.yaml", "--data", str(synth_dir), "--out", str(tmp_path / "o"), "--set", "boxes.bins=1"), "bins")


def test_evaluate_reports_every_modality(tokset, synth_dir, tmp_path):
    out = tmp_path / "metrics.json"
    proc = run_program("tokenizers/evaluate.py", "--tokenizer", str(tokset), "--data", str(synth_dir), "--json", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    m = json.loads(out.read_text())
    assert m["samples"] == 40
    assert m["caption"]["exact_round_trip"] == 1.0
    assert m["boxes"]["mean_iou"] >= 0.99
    assert 0 < m["rgb"]["psnr"] < 60 and 0 < m["rgb"]["ssim"] <= 1 and 0 < m["rgb"]["codebook_usage"] <= 1
    assert 0 <= m["semseg"]["miou"] <= 1 and m["semseg"]["tokens_per_image"] == 64
    assert "| caption | exact_round_trip | 1.0000 |" in proc.stdout


def _drop_member(path, name):
    with tarfile.open(path) as src:
        members = [(m, src.extractfile(m).read()) for m in src.getmembers()]
    with tarfile.open(path, "w") as dst:
        for m, data in members:
            if m.name != name:
                dst.addfile(m, io.BytesIO(data))


def test_pretokenize_writes_token_shards(tokset, synth_dir, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(synth_dir, raw)
    _drop_member(raw / "shard-000000.tar", "00000003.caption.txt")
    out = tmp_path / "tokens"
    proc = run_program("data_pipelines/pretokenize.py", "--tokenizers", str(tokset), "--data", str(raw), "--out", str(out), "--shard-size", "16", "--quiet")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == 40 and len(manifest["shards"]) == 3
    assert manifest["modality_counts"] == {"rgb": 40, "semseg": 40, "boxes": 40, "caption": 39}
    vocab = SharedVocab(**{k: manifest["vocab"][k] for k in ("specials", "spaces", "modalities")})
    samples = {s["__key__"]: s for s in wds.WebDataset(str(out / "shard-{000000..000002}.tar"), shardshuffle=False)}
    s = samples["00000000"]
    rgb = np.load(io.BytesIO(s["rgb.tokens.npy"]))
    assert rgb.shape == (64,) and rgb.dtype == np.int32
    assert all(vocab.space_of(int(i)) == "rgb" for i in rgb)
    cap = np.load(io.BytesIO(s["caption.tokens.npy"]))
    assert all(vocab.space_of(int(i)) == "text" for i in cap)
    assert json.loads(s["meta.json"])["image_size"] == [64, 64]
    assert "caption.tokens.npy" not in samples["00000003"] and "rgb.tokens.npy" in samples["00000003"]


def test_program_errors(tokset, synth_dir, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: audio\n")
    assert_usage_error(run_program("tokenizers/train.py", "--config", str(bad), "--data", str(synth_dir), "--out", str(tmp_path / "o")), "kind")
    assert_usage_error(run_program("tokenizers/train.py", "--config", "configs/tokenizers/rgb.yaml", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o")), "--data")
    assert_usage_error(run_program("tokenizers/train.py", "--config", "configs/tokenizers/rgb.yaml", "--data", str(synth_dir), "--out", str(tmp_path / "o"), "--set", "tokenizer.quantizer=pq"), "quantizer")
    assert_usage_error(run_program("tokenizers/train.py", "--config", "configs/tokenizers/rgb.yaml", "--data", str(synth_dir), "--out", str(tmp_path / "o"), "--set", "tokenizer.resolution=60"), "divisible")
    assert not (tmp_path / "o").exists()
    assert_usage_error(run_program("tokenizers/evaluate.py", "--tokenizer", str(tmp_path), "--data", str(synth_dir)), "vocab.json")
    assert_usage_error(run_program("data_pipelines/pretokenize.py", "--tokenizers", str(tmp_path), "--data", str(synth_dir), "--out", str(tmp_path / "t")), "vocab.json")
    assert_usage_error(run_program("data_pipelines/pretokenize.py", "--tokenizers", str(tokset), "--data", str(tmp_path / "none"), "--out", str(tmp_path / "t")), "--data")


def test_wrong_image_size_is_a_usage_error(tokset, tmp_path):
    from fourm.data.synth.generate import generate_dataset

    generate_dataset(tmp_path / "raw32", 4, res=32, seed=0, workers=1, progress=False)
    proc = run_program("data_pipelines/pretokenize.py", "--tokenizers", str(tokset), "--data", str(tmp_path / "raw32"), "--out", str(tmp_path / "t"), "--quiet")
    assert_usage_error(proc, "expects 64x64")
    assert not (tmp_path / "t" / "manifest.json").exists() and not list((tmp_path / "t").glob(".staging-*"))
    assert_usage_error(run_program("tokenizers/evaluate.py", "--tokenizer", str(tokset), "--data", str(tmp_path / "raw32"), "--quiet"), "expects 64x64")
