"""The encoder's dense auxiliary loss (``EncDecConfig.aux_labels``): token shards keep the semseg
class maps, examples carry each rgb input token's patch of them, the model's head predicts them,
the training loop adds the loss and logs it."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import assert_usage_error, run_program
from fourm.models.encdec import EncDecConfig, EncoderDecoder
from fourm.objectives.builders import collate_encdec, encdec_example, image_patches
from fourm.objectives.masking import MaskingConfig, plan_masking
from fourm.sequence import IGNORE_INDEX
from fourm.vocab import SharedVocab

VOCAB = SharedVocab.build({"text": 120, "box_coords": 50, "rgb": 64, "depth": 64, "semseg": 64})
KINDS = {"rgb": "image", "depth": "image", "semseg": "image", "caption": "sequence", "boxes": "sequence"}
GRIDS = {"rgb": 4, "depth": 4, "semseg": 4}
SENTINELS = [VOCAB.sentinel_id(i) for i in range(VOCAB.num_sentinels)]


def _tokens(rng):
    t = {m: np.asarray(VOCAB.to_global(m, torch.as_tensor(rng.integers(0, 64, 16)))) for m in ("rgb", "depth", "semseg")}
    t["caption"] = np.asarray(VOCAB.to_global("text", torch.as_tensor(rng.integers(0, 120, 6))))
    return t


def test_examples_carry_each_rgb_input_tokens_label_patch():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 5, (16, 16)).astype(np.uint8)  # 4x4 patches on the 4x4 rgb grid
    patches = image_patches(labels[None], 4)  # (16, 16)
    seen_rgb = 0
    for _ in range(20):
        toks = _tokens(rng)
        plans, _ = plan_masking(rng, toks, KINDS, MaskingConfig(input_budget=24, target_budget=24), SENTINELS)
        ex = encdec_example(toks, plans, VOCAB, GRIDS, dense_labels=labels)
        assert ex.enc_dense_labels.shape == (len(ex.enc_ids), 16)
        rgb = ex.enc_modality == list(VOCAB.modalities).index("rgb")
        plan = next(p for p in plans if p.name == "rgb")
        np.testing.assert_array_equal(ex.enc_dense_labels[rgb], patches[plan.input_idx])
        assert (ex.enc_dense_labels[~rgb] == IGNORE_INDEX).all()
        seen_rgb += int(rgb.sum())
        # a sample without a map: no field
        assert encdec_example(toks, plans, VOCAB, GRIDS).enc_dense_labels is None
    assert seen_rgb > 0
    without = encdec_example(toks, plans, VOCAB, GRIDS)
    batch = collate_encdec([ex, encdec_example(toks, plans, VOCAB, GRIDS, dense_labels=labels, drop_condition=True), without])
    assert batch["enc_dense_labels"].shape == (3, batch["enc_ids"].shape[1], 16)
    assert (batch["enc_dense_labels"][1] == IGNORE_INDEX).all()  # dropped condition: no rgb inputs
    assert (batch["enc_dense_labels"][2] == IGNORE_INDEX).all()  # no map: beside those with one, all -100
    assert "enc_dense_labels" not in collate_encdec([without, without])  # no map in the batch: no field (the model's loss is 0)


def _model(**kw) -> EncoderDecoder:
    from fourm.models.build import config_from_vocab

    torch.manual_seed(0)
    return EncoderDecoder(EncDecConfig(arch="encdec", dim=32, n_heads=2, n_kv_heads=2, enc_layers=1, dec_layers=1, pixel_patch=4, **config_from_vocab(VOCAB), **kw))


def test_the_head_predicts_every_pixel_and_the_loss_is_its_cross_entropy():
    model = _model(aux_labels="semseg", aux_classes=5, aux_weight=2.0)
    enc = torch.randn(2, 3, 32)
    labels = torch.full((2, 3, 16), IGNORE_INDEX)
    labels[0, 1] = torch.arange(16) % 5
    labels[1, 2, :8] = 4  # half a patch labelled
    want = F.cross_entropy(model.aux_head(torch.stack([enc[0, 1], enc[1, 2]])).view(2, 16, 5).reshape(-1, 5), labels[[0, 1], [1, 2]].reshape(-1), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(model.dense_aux_loss(enc, labels), want)
    torch.testing.assert_close(model._aux(enc, labels)["aux_loss"], 2.0 * want)
    assert float(model.train()._aux(enc, None)["aux_loss"]) == 0.0 and model.eval()._aux(enc, None) == {}  # a batch without maps
    none = model.dense_aux_loss(enc, torch.full((2, 3, 16), IGNORE_INDEX))
    none.backward()
    assert float(none) == 0.0 and model.aux_head.weight.grad is not None
    with pytest.raises(ValueError, match="outside this model's 5 aux_classes"):
        model.dense_aux_loss(enc, torch.full((2, 3, 16), 5))
    with pytest.raises(ValueError, match="head reads 16 \(4x4 patches\)"):
        model.dense_aux_loss(enc, torch.zeros(2, 3, 9, dtype=torch.long))
    assert _model().aux_head is None
    for bad in ({"aux_labels": "semseg"}, {"aux_classes": 5}, {"aux_labels": "semseg", "aux_classes": 5, "aux_weight": -1.0}):
        with pytest.raises(ValueError, match="aux_labels and aux_classes go together"):
            EncDecConfig(arch="encdec", **bad)


def test_the_stem_head_reads_the_pixel_features_the_encoder_adds():
    model = _model(aux_labels="semseg", aux_classes=5, aux_weight=1.0, rgb_pixels=True, aux_stem_weight=3.0).train()
    rng = np.random.default_rng(0)
    b, s = 2, 3
    ids = torch.as_tensor(VOCAB.to_global("rgb", torch.as_tensor(rng.integers(0, 64, (b, s)))))
    modality = torch.full((b, s), list(VOCAB.modalities).index("rgb"))
    positions = torch.zeros(b, s, 2, dtype=torch.long)
    pixels = torch.as_tensor(rng.integers(0, 256, (b, s, 48)), dtype=torch.uint8)
    labels = torch.full((b, s, 16), IGNORE_INDEX)
    labels[0, 1] = torch.arange(16) % 5
    stem: list = []
    enc = model.encode(ids, modality, positions, torch.ones(b, s, dtype=torch.bool), pixels=pixels, stem_out=stem)
    features = model.pixel_features(pixels, torch.ones(b, s, dtype=torch.bool), positions)
    torch.testing.assert_close(stem[0], features)
    want = model._class_loss(enc[0, 1:2], labels[0, 1:2]) + 3.0 * F.cross_entropy(model.aux_stem_head(features[0, 1]).view(16, 5), labels[0, 1])
    got = model._aux(enc, labels, stem)["aux_loss"]
    torch.testing.assert_close(got, want)
    got.backward()
    assert model.aux_stem_head.weight.grad.abs().sum() > 0 and model.pixel_embed.weight.grad.abs().sum() > 0
    # no patches in the batch: the head still gets a (zero) gradient, for DDP
    model.zero_grad()
    model._aux(enc.detach(), labels, [])["aux_loss"].backward()
    assert model.aux_stem_head.weight.grad is not None and float(model.aux_stem_head.weight.grad.abs().sum()) == 0.0
    assert _model(aux_labels="semseg", aux_classes=5).aux_stem_head is None
    for bad in ({"aux_labels": "semseg", "aux_classes": 5, "aux_stem_weight": 1.0}, {"rgb_pixels": True, "aux_stem_weight": 1.0}, {"aux_labels": "semseg", "aux_classes": 5, "rgb_pixels": True, "aux_stem_weight": -1.0}):
        with pytest.raises(ValueError, match="aux_stem_weight needs aux_labels and rgb_pixels"):
            EncDecConfig(arch="encdec", **bad)


def test_token_shards_keep_the_semseg_maps(token_dir, synth_dir):
    from fourm.data.codecs import decode_member

    manifest = json.loads((token_dir / "manifest.json").read_text())
    assert manifest["labels"] == {"semseg": manifest["pixels"]["rgb"], "objects": manifest["pixels"]["rgb"]}
    shard = sorted(token_dir.glob("*.tar"))[0]
    with tarfile.open(shard) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    key = sorted(n for n in members if n.endswith(".semseg.labels.npy"))[0].split(".")[0]
    labels = np.load(io.BytesIO(members[f"{key}.semseg.labels.npy"]))
    raw = {}
    for raw_shard in sorted(synth_dir.glob("*.tar")):
        with tarfile.open(raw_shard) as tar:
            for m in tar.getmembers():
                if m.name == f"{key}.semseg.png":
                    raw = decode_member("semseg", tar.extractfile(m).read())
    assert labels.dtype == np.uint8 and np.array_equal(labels, np.asarray(raw))


def test_training_with_the_aux_loss_logs_it_and_it_falls(token_dir, tmp_path):
    out = tmp_path / "aux"
    tiny = ["--set", "model.dim=64", "--set", "model.enc_layers=1", "--set", "model.dec_layers=1", "--set", "data.batch_size=8", "--set", "data.shuffle_buffer=16", "--set", "log_every=5", "--quiet"]
    proc = run_program("launch/train.py", "--config", "configs/train/tiny_encdec.yaml", "--data", str(token_dir), "--out", str(out), "--max-steps", "40", "--set", "optim.lr=0.003", "--set", "optim.warmup_steps=5", "--set", "model.aux_labels=semseg", "--set", "model.aux_classes=5", *tiny)
    assert proc.returncode == 0, proc.stderr
    m = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert m[-1]["loss/aux"] < 0.7 * m[0]["loss/aux"]
    # shards made before they kept the maps: a one-line error naming the fix
    old = tmp_path / "old"
    old.mkdir()
    manifest = json.loads((token_dir / "manifest.json").read_text())
    manifest.pop("labels")
    (old / "manifest.json").write_text(json.dumps(manifest))
    for shard in token_dir.glob("*.tar"):
        (old / shard.name).write_bytes(shard.read_bytes())
    proc = run_program("launch/train.py", "--config", "configs/train/tiny_encdec.yaml", "--data", str(old), "--out", str(tmp_path / "o"), "--max-steps", "2", "--set", "model.aux_labels=semseg", "--set", "model.aux_classes=5", *tiny)
    assert_usage_error(proc, "hold none: pretokenize them again")


def test_the_object_label_map_gives_object_pixels_their_box_labels_class():
    from fourm.data.object_labels import object_classes, object_label_map

    classes = object_classes({"classes": ["sky", "ground", "ball"], "box_labels": ["red ball", "blue ball"]})
    assert classes == ["sky", "ground", "ball", "red ball", "blue ball"]
    assert object_classes({"classes": ["sky"]}) is None and object_classes({"box_labels": ["a"]}) is None
    semseg = np.array([[0, 2, 2], [1, 2, 1], [1, 1, 2]])
    instance = np.array([[0, 1, 1], [0, 2, 0], [0, 0, 3]])
    boxes = [{"bbox": [1, 0, 3, 1], "label": "blue ball"}, {"bbox": [1, 1, 2, 2], "label": "red ball"}, {"bbox": [2, 2, 3, 3], "label": "green ball"}]
    got = object_label_map(semseg, instance, boxes, classes, stuff=3)
    # box 1 blue -> 4, box 2 red -> 3, box 3's label is not a class: its semseg class stays
    np.testing.assert_array_equal(got, [[0, 4, 4], [1, 3, 1], [1, 1, 2]])
    assert got.dtype == np.uint8
    with pytest.raises(ValueError, match="names box 3 of a sample with 2"):
        object_label_map(semseg, instance, boxes[:2], classes, stuff=3)
    with pytest.raises(ValueError, match="differ in size"):
        object_label_map(semseg[:2], instance, boxes, classes, stuff=3)
    with pytest.raises(ValueError, match="more than 256"):
        object_classes({"classes": ["a"] * 200, "box_labels": ["b"] * 57})


def test_rendered_instance_maps_agree_with_the_boxes_and_the_semseg(synth_dir):
    from fourm.data.codecs import decode_member
    from fourm.data.synth.scene import BOX_LABELS, CLASSES

    manifest = json.loads((synth_dir / "manifest.json").read_text())
    assert manifest["box_labels"] == list(BOX_LABELS) and len(BOX_LABELS) == 48
    seen = 0
    with tarfile.open(sorted(synth_dir.glob("*.tar"))[0]) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    for key in sorted({n.split(".")[0] for n in members}):
        inst = decode_member("instance", members[f"{key}.instance.png"]).numpy()
        semseg = decode_member("semseg", members[f"{key}.semseg.png"]).numpy()
        boxes = decode_member("boxes", members[f"{key}.boxes.json"])
        assert int(inst.max()) == len(boxes) and ((inst > 0) == (semseg >= 2)).all()
        for k, box in enumerate(boxes, start=1):
            rows, cols = np.nonzero((inst == k).any(1))[0], np.nonzero((inst == k).any(0))[0]
            assert [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1] == box["bbox"]
            assert {CLASSES[c] for c in np.unique(semseg[inst == k])} == {box["label"].split()[-1]}
            seen += 1
    assert seen > 10


def test_token_shards_keep_the_object_label_maps_and_the_model_trains_on_them(token_dir, tmp_path):
    manifest = json.loads((token_dir / "manifest.json").read_text())
    classes = manifest["object_classes"]
    assert classes[:5] == ["background", "ground", "sphere", "cube", "cylinder"] and len(classes) == 53
    with tarfile.open(sorted(token_dir.glob("*.tar"))[0]) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    objects = [n for n in members if n.endswith(".objects.labels.npy")]
    assert objects
    for name in objects:
        key = name.split(".")[0]
        o, s = np.load(io.BytesIO(members[name])), np.load(io.BytesIO(members[f"{key}.semseg.labels.npy"]))
        np.testing.assert_array_equal(o[s < 2], s[s < 2])  # sky and ground keep their class
        # every object pixel names a label of its own shape
        assert all(classes[c].split()[-1] == classes[v] for c, v in zip(o[s >= 2], s[s >= 2]))
    tiny = ["--set", "model.dim=64", "--set", "model.enc_layers=1", "--set", "model.dec_layers=1", "--set", "data.batch_size=8", "--set", "data.shuffle_buffer=16", "--set", "log_every=2", "--quiet"]
    proc = run_program("launch/train.py", "--config", "configs/train/tiny_encdec.yaml", "--data", str(token_dir), "--out", str(tmp_path / "o"), "--max-steps", "4", "--set", "model.aux_labels=objects", "--set", "model.aux_classes=53", *tiny)
    assert proc.returncode == 0, proc.stderr
    assert all("loss/aux" in json.loads(line) for line in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines())
    proc = run_program("launch/train.py", "--config", "configs/train/tiny_encdec.yaml", "--data", str(token_dir), "--out", str(tmp_path / "p"), "--max-steps", "2", "--set", "model.aux_labels=objects", "--set", "model.aux_classes=5", *tiny)
    assert_usage_error(proc, "have 53 classes but the model's aux head predicts 5: --set model.aux_classes=53")


def test_object_extents_give_every_object_pixel_its_objects_box():
    from fourm.data.object_labels import object_extents

    labels = np.array([[0, 0, 0, 0], [0, 5, 5, 1], [0, 5, 6, 1], [1, 1, 6, 1]], np.uint8)
    got = object_extents(labels, first=5)
    assert got.shape == (4, 4, 4) and got.dtype == np.int16
    assert (got[:, labels < 5] == IGNORE_INDEX).all()
    np.testing.assert_array_equal(got[:, 1, 1], [1, 1, 3, 3])  # class 5: columns 1-2, rows 1-2
    np.testing.assert_array_equal(got[:, 2, 1], [1, 1, 3, 3])
    np.testing.assert_array_equal(got[:, 3, 2], [2, 2, 3, 4])  # class 6: column 2, rows 2-3
    assert (object_extents(labels, first=7) == IGNORE_INDEX).all()


def test_the_box_head_regresses_each_object_pixels_box_in_patch_units():
    from fourm.data.object_labels import object_extents

    model = _model(aux_labels="objects", aux_classes=8, aux_weight=2.0, aux_box_from=5, aux_box_weight=0.5)
    classes = np.zeros((16, 16), np.uint8)
    classes[2:7, 3:12] = 6
    stack = np.concatenate([classes[None].astype(np.int16), object_extents(classes, 5)])
    toks = _tokens(np.random.default_rng(0))
    plans, _ = plan_masking(np.random.default_rng(1), toks, KINDS, MaskingConfig(input_budget=24, target_budget=24), SENTINELS)
    ex = encdec_example(toks, plans, VOCAB, GRIDS, dense_labels=stack)
    assert ex.enc_dense_labels.shape == (len(ex.enc_ids), 5 * 16)
    rgb = ex.enc_modality == list(VOCAB.modalities).index("rgb")
    np.testing.assert_array_equal(ex.enc_dense_labels[rgb], image_patches(stack, 4)[next(p for p in plans if p.name == "rgb").input_idx])
    labels = torch.full((1, 2, 80), IGNORE_INDEX)
    labels[0, 0] = torch.as_tensor(image_patches(stack, 4)[1])  # token 1 of the grid: an object in part of it
    enc = torch.randn(1, 2, 32)
    pred = model.aux_box_head(enc[0, 0]).view(4, 16)
    box = torch.as_tensor(image_patches(stack, 4)[1][16:].reshape(4, 16)).float()
    keep = box != IGNORE_INDEX
    want = F.smooth_l1_loss(pred[keep], box[keep] / 4)
    assert int(keep.sum()) == 4 * 8 and torch.equal(box[:, keep[0]][:, 0], torch.tensor([3.0, 2.0, 12.0, 7.0]))
    torch.testing.assert_close(model.dense_box_loss(enc, labels), want)
    torch.testing.assert_close(model._aux(enc, labels)["aux_loss"], 2.0 * model.dense_aux_loss(enc, labels) + 0.5 * want)
    with pytest.raises(ValueError, match="head reads 80"):
        model.dense_aux_loss(enc, labels[..., :16])
    for bad in ({"aux_box_from": 5}, {"aux_labels": "objects", "aux_classes": 5, "aux_box_from": 5}, {"aux_labels": "objects", "aux_classes": 8, "aux_box_from": 5, "aux_box_weight": -1.0}):
        with pytest.raises(ValueError, match="aux_box_from needs aux_labels"):
            EncDecConfig(arch="encdec", **bad)


def test_training_with_the_box_term_reads_the_object_maps(token_dir, tmp_path):
    tiny = ["--set", "model.dim=64", "--set", "model.enc_layers=1", "--set", "model.dec_layers=1", "--set", "data.batch_size=8", "--set", "data.shuffle_buffer=16", "--set", "log_every=5", "--quiet"]
    aux = ["--set", "model.aux_classes=53", "--set", "model.aux_box_from=5", "--set", "model.aux_weight=0"]
    proc = run_program("launch/train.py", "--config", "configs/train/tiny_encdec.yaml", "--data", str(token_dir), "--out", str(tmp_path / "o"), "--max-steps", "40", "--set", "optim.lr=0.003", "--set", "optim.warmup_steps=5", "--set", "model.aux_labels=objects", *aux, *tiny)
    assert proc.returncode == 0, proc.stderr
    m = [json.loads(line) for line in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert m[-1]["loss/aux"] < 0.7 * m[0]["loss/aux"]  # the box term alone (class weight 0) falls
    proc = run_program("launch/train.py", "--config", "configs/train/tiny_encdec.yaml", "--data", str(token_dir), "--out", str(tmp_path / "p"), "--max-steps", "2", "--set", "model.aux_labels=semseg", *aux, *tiny)
    assert_usage_error(proc, "reads object boxes from the object label maps, not 'semseg' maps")
