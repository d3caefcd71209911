"""data_pipelines/pseudo_label.py: tiny random transformers models (built from configs, saved to
temp dirs, no downloads) label a few images into shards the raw loader reads."""

from __future__ import annotations

import json
import logging
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_usage_error, run_program
from fourm.cli import UsageError
from fourm.data.loader import LoaderConfig, build_loader
from fourm.data.pseudo_label import PseudoLabelConfig, pseudo_label

transformers = pytest.importorskip("transformers")

SEMSEG_CLASSES = ["sky", "road", "tree", "car", "person"]
BOX_LABELS = ["cat", "dog", "car"]


def _labels(names):
    return {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}


def build_tiny_models(root):
    """Randomly initialised Depth Anything, SegFormer, DETR (ResNet backbone, no timm) and BLIP, with
    their processors, saved under ``root``; returns {flag: dir}."""
    T = transformers
    torch.manual_seed(0)
    dirs = {m: root / m for m in ("depth", "semseg", "boxes", "caption")}
    dino = T.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=28, patch_size=14, out_indices=[1, 2], reshape_hidden_states=False)
    depth = T.DepthAnythingConfig(backbone_config=dino, reassemble_hidden_size=32, neck_hidden_sizes=[16, 32], fusion_hidden_size=16, head_hidden_size=8, reassemble_factors=[2, 1])
    T.AutoModelForDepthEstimation.from_config(depth).save_pretrained(dirs["depth"])
    T.DPTImageProcessor(size={"height": 28, "width": 28}, keep_aspect_ratio=False, ensure_multiple_of=14).save_pretrained(dirs["depth"])
    seg = T.SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16], num_attention_heads=[1, 1], decoder_hidden_size=16, strides=[4, 2], patch_sizes=[7, 3], mlp_ratios=[2, 2], num_labels=len(SEMSEG_CLASSES), **_labels(SEMSEG_CLASSES))
    T.AutoModelForSemanticSegmentation.from_config(seg).save_pretrained(dirs["semseg"])
    T.SegformerImageProcessor(size={"height": 32, "width": 32}).save_pretrained(dirs["semseg"])
    resnet = T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], out_features=["stage1", "stage2"])
    detr = T.DetrConfig(use_timm_backbone=False, backbone_config=resnet, use_pretrained_backbone=False, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=5, num_labels=len(BOX_LABELS), **_labels(BOX_LABELS))
    T.AutoModelForObjectDetection.from_config(detr).save_pretrained(dirs["boxes"])
    T.DetrImageProcessor(size={"shortest_edge": 32, "longest_edge": 32}).save_pretrained(dirs["boxes"])
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "cube", "on", "the", "floor", "blue", "sphere"]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    text = T.BlipTextConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, encoder_hidden_size=16, bos_token_id=2, sep_token_id=3, pad_token_id=0, max_position_embeddings=32)
    vision = T.BlipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)
    T.BlipForConditionalGeneration(T.BlipConfig(text_config=text.to_dict(), vision_config=vision.to_dict())).save_pretrained(dirs["caption"])
    T.BlipProcessor(image_processor=T.BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=T.BertTokenizer(str(root / "vocab.txt"))).save_pretrained(dirs["caption"])
    return {k: str(v) for k, v in dirs.items()}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_tiny_models(tmp_path_factory.mktemp("hf_models"))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Seven photos of different sizes and one file that is not an image."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(7):
        Image.fromarray(rng.integers(0, 255, (40 + 4 * i, 56, 3), dtype=np.uint8)).save(folder / f"photo{i}.{'png' if i % 2 else 'jpg'}")
    (folder / "broken.png").write_bytes(b"not an image")
    return folder


def _members(tar_path):
    with tarfile.open(tar_path) as tar:
        return sorted(tar.getnames())


def test_end_to_end_all_models(models, photos, tmp_path):
    out = tmp_path / "out"
    args = ["--src", str(photos), "--out", str(out), "--res", "32", "--shard-size", "3", "--batch-size", "2", "--score-threshold", "0", "--quiet"]
    proc = run_program("data_pipelines/pseudo_label.py", *args, *[a for m, d in models.items() for a in (f"--{m}", d)])
    assert proc.returncode == 0, proc.stderr
    assert "broken.png" in proc.stderr and "images/s" in proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == 7 and [s["num_samples"] for s in manifest["shards"]] == [2, 3, 2]  # broken.png sorts first
    assert manifest["modalities"] == ["rgb", "depth", "semseg", "boxes", "caption"]
    assert manifest["classes"] == SEMSEG_CLASSES and manifest["boxes"]["labels"] == BOX_LABELS
    assert manifest["depth"]["kind"] == "relative" and manifest["depth"]["unit"] is None  # Depth Anything's config says relative
    assert manifest["resolution"] == 32 and manifest["skipped_files"][0]["path"].endswith("broken.png")
    assert manifest["pseudo_labels"]["models"]["boxes"]["architecture"] == "DetrForObjectDetection"
    assert _members(out / "shard-000000.tar") == sorted(f"photo0.{m}" for m in ("rgb.png", "depth.npy", "semseg.png", "boxes.json", "caption.txt")) + sorted(f"photo1.{m}" for m in ("rgb.png", "depth.npy", "semseg.png", "boxes.json", "caption.txt"))
    loader, skipped = build_loader(out, LoaderConfig(batch_size=7, shuffle=0, num_workers=0))
    (batch,) = list(loader)
    assert skipped.as_dict()["total"] == 0
    assert batch["rgb"].shape == (7, 3, 32, 32) and batch["rgb"].dtype == torch.uint8
    assert batch["depth"].shape == (7, 1, 32, 32) and batch["depth"].dtype == torch.float32 and batch["depth"].std() > 0
    assert batch["semseg"].shape == (7, 32, 32) and int(batch["semseg"].max()) < len(SEMSEG_CLASSES)
    assert all(b and all(x["label"] in BOX_LABELS and 0 <= x["bbox"][0] < x["bbox"][2] <= 32 for x in b) for b in batch["boxes"])
    assert all(isinstance(c, str) and c for c in batch["caption"])


def test_resume_skips_finished_shards_and_split_is_disjoint(models, photos, tmp_path, caplog):
    cfg = PseudoLabelConfig(semseg=models["semseg"], depth=models["depth"], depth_kind="metric", shard_size=2, batch_size=4)
    out = tmp_path / "out"
    first = pseudo_label(photos, out, cfg, shard_index=1, num_shards=2, progress=False)
    assert first["manifest"] is None and not (out / "manifest.json").exists()  # shards 0 and 2 are still to do
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000001.tar", "shard-000003.tar"]
    keys_b = {n.split(".")[0] for p in out.glob("shard-*.tar") for n in _members(p)}
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}
    with caplog.at_level(logging.INFO, logger="fourm.data.pseudo_label"):
        second = pseudo_label(photos, out, cfg, shard_index=0, num_shards=2, progress=False)
    keys_a = {n.split(".")[0] for p in out.glob("shard-*.tar") if p.name not in mtimes for n in _members(p)}
    assert keys_a.isdisjoint(keys_b) and keys_a | keys_b == {f"photo{i}" for i in range(7)}
    manifest = second["manifest"]
    assert manifest["num_samples"] == 7 and manifest["modality_counts"]["semseg"] == 7 and "boxes" not in manifest["modality_counts"]
    assert manifest["depth"] == {**manifest["depth"], "unit": "m", "kind": "metric"}  # --depth-kind overrides the config
    with caplog.at_level(logging.INFO, logger="fourm.data.pseudo_label"):
        again = pseudo_label(photos, out, cfg, progress=False)  # one machine, everything done: nothing relabelled
    assert again["done"] == 0 and again["skipped_shards"] == 4
    assert "skipping 4 of 4 shards already done" in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar") if p.name in mtimes} == mtimes
    (out / "shard-000002.tar").unlink()  # a lost shard is redone, the others are not
    redo = pseudo_label(photos, out, cfg, progress=False)
    assert redo["done"] == 1 and redo["images"] == 2 and (out / "shard-000002.tar").is_file()
    other = PseudoLabelConfig(semseg=models["semseg"], shard_size=2)
    with pytest.raises(UsageError, match="other settings"):
        pseudo_label(photos, out, other, progress=False)


def test_raw_shards_source_keeps_members_and_replaces_labels(models, synth_dir, tmp_path):
    cfg = PseudoLabelConfig(boxes=models["boxes"], caption=models["caption"], score_threshold=0.0, batch_size=10)
    src = tmp_path / "src"
    src.mkdir()
    for name in ("manifest.json", "shard-000000.tar"):
        (src / name).write_bytes((synth_dir / name).read_bytes())
    manifest = pseudo_label(src, tmp_path / "out", cfg, progress=False)["manifest"]
    assert manifest["num_samples"] == 10 and len(manifest["shards"]) == 1
    assert manifest["classes"] == json.loads((synth_dir / "manifest.json").read_text())["classes"]  # semseg not relabelled: kept
    assert manifest["boxes"]["labels"] == BOX_LABELS and manifest["depth"]["kind"] == "metric"
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar, tarfile.open(synth_dir / "shard-000000.tar") as old:
        key = old.getnames()[0].split(".")[0]
        assert tar.extractfile(f"{key}.depth.npy").read() == old.extractfile(f"{key}.depth.npy").read()
        assert tar.extractfile(f"{key}.scene.json").read() == old.extractfile(f"{key}.scene.json").read()
        labels = {b["label"] for b in json.loads(tar.extractfile(f"{key}.boxes.json").read())}
        assert labels <= set(BOX_LABELS)


def test_usage_errors(models, photos, tmp_path):
    out = tmp_path / "out"
    missing = run_program("data_pipelines/pseudo_label.py", "--src", str(photos), "--out", str(out), "--depth", str(tmp_path / "nope"))
    assert_usage_error(missing, "--depth", "no such directory")
    (tmp_path / "empty").mkdir()
    cases = [
        (photos, PseudoLabelConfig(depth=models["semseg"]), {}, "'segformer' model is not a depth estimator"),
        (photos, PseudoLabelConfig(caption=str(tmp_path / "empty")), {}, "no config.json"),
        (tmp_path / "empty", PseudoLabelConfig(depth=models["depth"]), {}, "no images"),
        (photos, PseudoLabelConfig(depth=models["depth"]), {"shard_index": 2, "num_shards": 2}, "--shard-index must be in 0..1"),
        (photos, PseudoLabelConfig(), {}, "at least one model"),
    ]
    if not torch.cuda.is_available():
        cases.append((photos, PseudoLabelConfig(depth=models["depth"], device="cuda"), {}, "CUDA is not available"))
    for src, cfg, kwargs, needle in cases:
        with pytest.raises(UsageError, match=needle):
            pseudo_label(src, out, cfg, progress=False, **kwargs)
    assert not out.exists()  # nothing written for bad input


def test_mask2former_semseg_through_its_processor(tmp_path):
    """A universal (mask-classification) segmenter labels semseg too, at the image's own size."""
    from fourm.data.codecs import decode_member
    from fourm.data.labellers import SemsegLabeller

    T = transformers
    swin = T.SwinConfig(image_size=64, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=2, out_features=["stage1", "stage2", "stage3", "stage4"])
    config = T.Mask2FormerConfig(backbone_config=swin, use_timm_backbone=False, feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=32, dim_feedforward=32, encoder_layers=1, decoder_layers=2, num_attention_heads=2, num_queries=4, num_labels=3, **_labels(BOX_LABELS))
    T.AutoModelForUniversalSegmentation.from_config(config).save_pretrained(tmp_path)
    T.Mask2FormerImageProcessor(size={"height": 64, "width": 64}).save_pretrained(tmp_path)
    labeller = SemsegLabeller(str(tmp_path), "cpu")
    with torch.no_grad():
        maps = [decode_member("semseg", m) for m in labeller([Image.new("RGB", (50, 40), (200, 30, 30)), Image.new("RGB", (50, 40))])]
    assert labeller.classes == BOX_LABELS and labeller.info["architecture"] == "Mask2FormerForUniversalSegmentation"
    assert [tuple(m.shape) for m in maps] == [(40, 50), (40, 50)] and all(int(m.max()) < 3 for m in maps)
