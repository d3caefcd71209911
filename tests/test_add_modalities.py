"""normals and count end to end: data_pipelines/add_modalities.py on rendered scenes, growing a
tokenizer set without moving an id (tokenizers/train.py --grow, --add-text-modality), pretokenize,
one training batch, and the evaluation suite's rgb -> normals / rgb -> count directions."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch
import webdataset as wds

from conftest import assert_usage_error, run_program
from fourm.data.loader import LoaderConfig, build_loader
from fourm.data.normals import normals_from_depth, normals_to_uint8
from fourm.data.shards import ShardSink
from fourm.data.synth.scene import visible_objects
from fourm.models.grow import check_extends
from fourm.tokenizers.tokenizer_set import TokenizerSet
from fourm.vocab import SharedVocab

TINY = ["--set", "tokenizer.channels=[8,16,16]", "--set", "tokenizer.stem_patch=1", "--set", "tokenizer.res_blocks=1", "--set", "train.batch_size=8", "--set", "train.val_samples=8", "--set", "train.warmup_steps=1", "--set", "train.num_workers=0"]


def _samples(directory) -> dict[str, dict]:
    return {s["__key__"]: s for s in wds.WebDataset(sorted(str(p) for p in directory.glob("shard-*.tar")), shardshuffle=False)}


@pytest.fixture(scope="module")
def plus_dir(tmp_path_factory, synth_dir):
    out = tmp_path_factory.mktemp("plus") / "data"
    proc = run_program("data_pipelines/add_modalities.py", "--src", str(synth_dir), "--out", str(out), "--add", "normals,count", "--quiet")
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def sets(tmp_path_factory, synth_dir, plus_dir):
    """(base set, the same grown with a tiny normals tokenizer and count)."""
    from fourm.bench.speed import untrained_tokenizer_set

    root = tmp_path_factory.mktemp("sets")
    untrained_tokenizer_set(synth_dir).save_pretrained(root / "base")
    shutil.copytree(root / "base", root / "grown")
    proc = run_program("tokenizers/train.py", "--config", "configs/tokenizers/normals.yaml", "--data", str(plus_dir), "--val", str(plus_dir), "--out", str(root / "grown"), "--grow", "--max-steps", "3", "--quiet", *TINY)
    assert proc.returncode == 0, proc.stderr
    proc = run_program("tokenizers/train.py", "--add-text-modality", "count", "--out", str(root / "grown"))
    assert proc.returncode == 0, proc.stderr
    return root / "base", root / "grown"


def test_program_adds_normals_and_count(plus_dir, synth_dir):
    old_manifest = json.loads((synth_dir / "manifest.json").read_text())
    manifest = json.loads((plus_dir / "manifest.json").read_text())
    assert manifest["modalities"] == old_manifest["modalities"] + ["normals", "count"]
    assert manifest["members"]["normals"] == "normals.png" and manifest["members"]["count"] == "count.txt"
    assert manifest["num_samples"] == 40 and [s["num_samples"] for s in manifest["shards"]] == [10, 10, 10, 10]
    assert manifest["modality_counts"] == {"normals": 40, "count": 40} and manifest["added"]["skipped"] == []
    assert not list(plus_dir.glob(".staging-*")) and not list(plus_dir.glob("*.tmp"))
    old, new = _samples(synth_dir), _samples(plus_dir)
    assert set(old) == set(new)
    for key, sample in old.items():
        members = {k for k in sample if not k.startswith("__")}
        assert {k for k in new[key] if not k.startswith("__")} == members | {"normals.png", "count.txt"}
        assert all(new[key][m] == sample[m] for m in members)  # every old member byte for byte
    loader, skipped = build_loader(plus_dir, LoaderConfig(modalities=("depth", "boxes", "caption", "scene", "normals", "count"), batch_size=40, shuffle=0, num_workers=0))
    batch = next(iter(loader))
    assert skipped.as_dict()["total"] == 0 and batch["normals"].shape == (40, 3, 64, 64) and batch["normals"].dtype == torch.uint8
    for i in range(40):
        scene = batch["scene"][i]
        assert batch["count"][i] == len(visible_objects(scene)) == len(batch["boxes"][i]) >= 1
        expected = normals_to_uint8(normals_from_depth(batch["depth"][i, 0].numpy(), scene["camera"]["fov_deg"]))
        assert torch.equal(batch["normals"][i], torch.from_numpy(expected).permute(2, 0, 1))
    assert len(set(batch["count"])) > 1  # not a constant


def _without_scene(synth_dir, out):
    """``synth_dir`` as a dataset without scene.json (like an imported folder)."""
    with ShardSink(out, 20) as sink:
        for key, sample in sorted(_samples(synth_dir).items()):
            sink.write({"__key__": key, **{k: v for k, v in sample.items() if not k.startswith("__") and k != "scene.json"}})
        sink.finish({"generator": "test", "modalities": ["rgb", "depth", "semseg", "boxes", "caption"]})
    return out


def test_bad_input_and_sources_without_scene(tmp_path, synth_dir, plus_dir):
    prog = "data_pipelines/add_modalities.py"
    assert_usage_error(run_program(prog, "--src", str(tmp_path / "none"), "--out", str(tmp_path / "o"), "--add", "count"), "manifest")
    assert_usage_error(run_program(prog, "--src", str(synth_dir), "--out", str(tmp_path / "o"), "--add", "caption"), "cannot add 'caption'")
    assert_usage_error(run_program(prog, "--src", str(synth_dir), "--out", str(tmp_path / "o"), "--add", "colour"), "unknown modality")
    assert_usage_error(run_program(prog, "--src", str(synth_dir), "--out", str(plus_dir), "--add", "count"), "--overwrite")
    assert not (tmp_path / "o").exists()
    bare = _without_scene(synth_dir, tmp_path / "bare")
    assert_usage_error(run_program(prog, "--src", str(bare), "--out", str(tmp_path / "o"), "--add", "normals,count"), "count needs scene.json")
    assert_usage_error(run_program(prog, "--src", str(bare), "--out", str(tmp_path / "o"), "--add", "normals"), "--fov")
    assert not (tmp_path / "o" / "manifest.json").exists()

    from fourm.data.add_modalities import add_modalities

    manifest = add_modalities(bare, tmp_path / "o", ("normals",), fov_deg=38.0, progress=False)
    assert manifest["modality_counts"]["normals"] == 40 and manifest["added"]["normals"]["fov_deg"] == 38.0
    assert [s["num_samples"] for s in manifest["shards"]] == [20, 20]


def test_grown_set_keeps_every_old_id(sets, synth_dir, plus_dir, tmp_path):
    base_dir, grown_dir = sets
    base, grown = TokenizerSet.from_pretrained(base_dir), TokenizerSet.from_pretrained(grown_dir)
    check_extends(base.vocab, grown.vocab)
    assert grown.vocab.size == base.vocab.size + 1000 + 4
    assert grown.modalities == base.modalities + ["normals", "count"] and grown.grids["normals"] == 8
    history = json.loads((grown_dir / "normals" / "train_history.json").read_text())
    assert history["steps"] == 3 and 0 <= history["val"][-1]["within_11_25"] <= 1 and history["val"][-1]["median_deg"] > 0
    loader, _ = build_loader(plus_dir, LoaderConfig(modalities=("rgb", "caption", "normals", "count"), batch_size=4, shuffle=0, num_workers=0))
    batch = next(iter(loader))
    for m in ("rgb", "caption"):
        assert [t.tolist() for t in grown.encode(m, batch[m])] == [t.tolist() for t in base.encode(m, batch[m])]
    normals = torch.stack(grown.encode("normals", batch["normals"]))
    assert normals.shape == (4, 64) and {grown.vocab.space_of(int(i)) for i in normals.flatten()} == {"normals"}
    decoded = torch.stack(grown.decode("normals", normals))
    assert decoded.shape == (4, 3, 64, 64) and torch.allclose(decoded.norm(dim=1), torch.ones(4, 64, 64), atol=1e-4)
    counts = grown.encode("count", batch["count"])
    assert grown.decode("count", counts) == [str(c) for c in batch["count"]]
    assert all(grown.vocab.space_of(int(i)) == "text" for t in counts for i in t)
    # replacing a tokenizer or adding a non-text modality is refused; --grow needs an existing set
    copy = tmp_path / "copy"
    shutil.copytree(grown_dir, copy)
    assert_usage_error(run_program("tokenizers/train.py", "--config", "configs/tokenizers/rgb.yaml", "--data", str(synth_dir), "--out", str(copy), "--grow", "--max-steps", "1", *TINY), "has a rgb tokenizer already")
    assert_usage_error(run_program("tokenizers/train.py", "--add-text-modality", "rgb", "--out", str(copy)), "not a text modality")
    assert_usage_error(run_program("tokenizers/train.py", "--config", "configs/tokenizers/normals.yaml", "--data", str(plus_dir), "--out", str(tmp_path / "none"), "--grow"), "no tokenizer set to grow")
    assert SharedVocab.load(copy / "vocab.json").to_json() == grown.vocab.to_json()


def test_pretokenize_and_a_training_batch(sets, plus_dir, tmp_path):
    from fourm.models.build import build_model
    from fourm.objectives.mixture import ObjectiveConfig
    from fourm.training.data import DataSource, StreamConfig, TokenStream, manifest_context
    from fourm.training.loop import compute_loss

    _, grown_dir = sets
    out = tmp_path / "tokens"
    proc = run_program("data_pipelines/pretokenize.py", "--tokenizers", str(grown_dir), "--data", str(plus_dir), "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["modalities"] == ["rgb", "depth", "semseg", "boxes", "caption", "normals", "count"]
    assert manifest["modality_counts"]["normals"] == manifest["modality_counts"]["count"] == 40 and manifest["grids"]["normals"] == 8
    vocab, grids, kinds = manifest_context(manifest)
    assert kinds["normals"] == "image" and kinds["count"] == "sequence" and grids["normals"] == 8
    tset = TokenizerSet.from_pretrained(grown_dir)
    truth = _samples(plus_dir)
    for key, s in _samples(out).items():
        normals = np.load(io.BytesIO(s["normals.tokens.npy"]))
        assert normals.shape == (64,) and normals.dtype == np.int32 and {vocab.space_of(int(i)) for i in normals} == {"normals"}
        count = np.load(io.BytesIO(s["count.tokens.npy"]))
        assert tset.decode("count", [torch.from_numpy(count.astype(np.int64))]) == [truth[key]["count.txt"].decode()]
    # the training stream treats them generically: one 4M batch through a fresh tiny model
    torch.manual_seed(0)
    model = build_model("configs/models/encdec_tiny.yaml", vocab=vocab, overrides=["dim=64"])
    stream = TokenStream(StreamConfig(sources=[DataSource(str(out))], batch_size=8, shuffle_buffer=8, num_workers=0), "encdec", vocab, kinds, grids, ObjectiveConfig(weights={"4m": 1.0}))
    batch = next(iter(stream))
    assert int(batch["enc_ids"].max()) < vocab.size and int(batch["dec_ids"].max()) < vocab.size
    out_ = model(**{k: v for k, v in batch.items() if k not in ("labels", "label_modality")})
    loss, _ = compute_loss(out_.logits, batch["labels"], batch["label_modality"], False, "token_mean", 0.0)
    assert torch.isfinite(loss)


def test_suite_rgb_to_normals_and_count(sets, plus_dir):
    from collections import Counter

    from fourm.eval.suite import DIRECTIONS, EvalConfig, evaluate, markdown_report
    from fourm.models.build import build_model

    base_dir, grown_dir = sets
    tset = TokenizerSet.from_pretrained(grown_dir)
    torch.manual_seed(0)
    model = build_model("configs/models/encdec_tiny.yaml", vocab=tset.vocab, overrides=["dim=64"]).eval()
    assert EvalConfig().directions == DIRECTIONS
    config = EvalConfig(scenes=6, batch_size=6, steps=2, max_len=4, baseline_scenes=40, directions=("rgb_to_normals", "rgb_to_count"))
    report, outputs = evaluate(model, tset, plus_dir, config, train_dir=plus_dir, progress=False)
    for part in ("model", "ceiling", "floor"):
        assert set(report[part]) >= {"rgb_to_normals", "rgb_to_count"}, part
        assert set(report[part]["rgb_to_normals"]) == {"mean_deg", "median_deg", "within_11_25", "within_22_5", "within_30"}
    assert len(outputs["predictions"]["normals"]) == 6 and outputs["predictions"]["normals"][0].shape == (3, 64, 64)
    assert report["ceiling"]["rgb_to_count"] == {"accuracy": 1.0, "parsed": 1.0}  # text round trip is exact
    assert 0 <= report["ceiling"]["rgb_to_normals"]["median_deg"] < 180
    loader, _ = build_loader(plus_dir, LoaderConfig(modalities=("count",), batch_size=40, shuffle=0, num_workers=0))
    counts = next(iter(loader))["count"]
    common = Counter(counts).most_common(1)[0][0]
    assert report["floor"]["rgb_to_count"]["accuracy"] == pytest.approx(sum(c == common for c in counts[:6]) / 6)
    assert "| rgb → count | accuracy |" in markdown_report(report) and "| rgb → normals | median_deg |" in markdown_report(report)
    old_model = build_model("configs/models/encdec_tiny.yaml", vocab=TokenizerSet.from_pretrained(base_dir).vocab, overrides=["dim=64"]).eval()
    with pytest.raises(ValueError, match="needs a model"):
        evaluate(old_model, tset, plus_dir, config, progress=False)
    with pytest.raises(ValueError, match="unknown direction"):
        EvalConfig(directions=("rgb_to_colour",))


@pytest.fixture(scope="module")
def grown_tokens(sets, plus_dir, tmp_path_factory):
    """Token shards of the scenes + normals + count, made with the grown set."""
    _, grown_dir = sets
    out = tmp_path_factory.mktemp("grown_tokens") / "train"
    proc = run_program("data_pipelines/pretokenize.py", "--tokenizers", str(grown_dir), "--data", str(plus_dir), "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    return out


def test_lora_on_a_new_modality_grows_the_base_and_learns(sets, plus_dir, grown_tokens, tmp_path):
    """A base trained on the old vocabulary, LoRA on rgb -> normals (new ids): the base is grown,
    the loss falls, and generate.py --adapter writes normals.png from an rgb image."""
    from fourm.models.build import build_model, save_pretrained
    from fourm.models.lora import load_adapters

    base_dir, grown_dir = sets
    old_vocab = TokenizerSet.from_pretrained(base_dir).vocab
    torch.manual_seed(0)
    base = build_model("configs/models/encdec_tiny.yaml", vocab=old_vocab, overrides=["dim=64", "enc_layers=1", "dec_layers=1"])
    save_pretrained(base, tmp_path / "base", vocab=old_vocab)
    out = tmp_path / "lora"
    proc = run_program("launch/train.py", "--config", "configs/train/lora_normals.yaml", "--data", str(grown_tokens), "--out", str(out), "--max-steps", "30",
                       "--set", f"init_from={tmp_path / 'base'}", "--set", "data.batch_size=8", "--set", "data.shuffle_buffer=16", "--set", "data.num_workers=0",
                       "--set", "log_every=1", "--set", "optim.warmup_steps=2", "--set", "optim.lr=0.01", "--set", "ckpt_every=30", "--quiet")
    assert proc.returncode == 0, proc.stderr
    m = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = np.mean([r["loss"] for r in m[:5]]), np.mean([r["loss"] for r in m[-5:]])
    assert m[-1]["step"] == 30 and last < 0.9 * first, (first, last)
    summary = json.loads((out / "summary.json").read_text())
    assert 0 < summary["trainable_parameters"] < summary["base_parameters"]
    model, vocab = load_adapters(tmp_path / "base", [out / "final"])
    assert vocab.to_json() == TokenizerSet.from_pretrained(grown_dir).vocab.to_json()
    assert "normals" in model.get_base_model().config.modalities
    sample = next(iter(_samples(plus_dir).values()))
    (tmp_path / "in.png").write_bytes(sample["rgb.png"])
    proc = run_program("launch/generate.py", "--model", str(tmp_path / "base"), "--adapter", str(out / "final"), "--from", f"rgb={tmp_path / 'in.png'}",
                       "--to", "normals", "--out", str(tmp_path / "gen"), "--steps", "2")
    assert proc.returncode == 0, proc.stderr
    from PIL import Image

    normals = np.asarray(Image.open(tmp_path / "gen" / "normals.png"))
    assert normals.shape == (64, 64, 3) and normals.dtype == np.uint8
    # the base alone has no normals: a clear usage error, not a traceback
    proc = run_program("launch/generate.py", "--model", str(tmp_path / "base"), "--tokenizers", str(grown_dir), "--from", f"rgb={tmp_path / 'in.png'}", "--to", "normals", "--out", str(tmp_path / "gen2"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
