"""Modality tokenizers: text backends, boxes, image-like autoencoders with FSQ/VQ, the tokenizer set."""

from __future__ import annotations

import json

import pytest
import torch

from fourm.data.loader import LoaderConfig, build_loader
from fourm.metrics import matched_box_iou
from fourm.tokenizers.boxes import BoxTokenizer, BoxTokenizerConfig, order_boxes
from fourm.tokenizers.image import ImageTokenizer, ImageTokenizerConfig, class_balanced_weights
from fourm.tokenizers.quantizers import FSQ, VectorQuantizer
from fourm.tokenizers.text import TextTokenizer, TextTokenizerConfig
from fourm.tokenizers.tokenizer_set import TokenizerSet

TINY = dict(channels=[8, 16, 16], resolution=64)


@pytest.fixture(scope="module")
def batch(synth_dir):
    loader, _ = build_loader(synth_dir, LoaderConfig(modalities=("rgb", "depth", "semseg", "boxes", "caption"), batch_size=40, shuffle=0, num_workers=0))
    return next(iter(loader))


@pytest.fixture(scope="module")
def captions(batch):
    return batch["caption"] + [b["label"] for boxes in batch["boxes"] for b in boxes]


@pytest.mark.parametrize("backend", ["bpe", "sentencepiece-unigram", "sentencepiece-bpe"])
def test_text_round_trip_is_exact(backend, captions, tmp_path):
    tok = TextTokenizer.train(captions, TextTokenizerConfig(backend=backend, vocab_size=200, min_frequency=1))
    for c in captions:
        ids = tok.encode(c)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == c
    path = tok.save(tmp_path)
    assert path.name == ("spm.model" if backend.startswith("sentence") else "tokenizer.json")
    again = TextTokenizer.from_file(path)  # a user's own file loads the same way
    assert again.encode(captions[0]) == tok.encode(captions[0])
    assert again.vocab_size == tok.vocab_size


def test_wordpiece_backend_decodes_words(captions, tmp_path):
    tok = TextTokenizer.train(captions, TextTokenizerConfig(backend="wordpiece", vocab_size=200, min_frequency=1))
    c = captions[0]
    assert tok.decode(tok.encode(c)).replace(" ", "") == c.replace(" ", "")
    assert TextTokenizer.load(tmp_path if tok.save(tmp_path) else tmp_path).backend == "wordpiece"


def test_text_config_errors():
    with pytest.raises(ValueError, match="backend"):
        TextTokenizerConfig(backend="char")
    with pytest.raises(ValueError, match="no text"):
        TextTokenizer.train([], TextTokenizerConfig())


def test_box_order_and_quantisation():
    boxes = [{"bbox": [40, 30, 60, 50], "label": "b"}, {"bbox": [5, 30, 10, 35], "label": "a"}, {"bbox": [0, 2, 64, 20], "label": "c"}]
    assert [b["label"] for b in order_boxes(boxes, "raster")] == ["c", "a", "b"]
    assert [b["label"] for b in order_boxes(boxes, "area")] == ["c", "b", "a"]
    tok = BoxTokenizer(BoxTokenizerConfig(bins=1000))
    items = tok.to_bins(boxes, (64, 64))
    assert items[0] == ([0, round(2 / 64 * 999), 999, round(20 / 64 * 999)], "c")
    back = tok.from_bins(items, (64, 64))
    for b, o in zip(back, order_boxes(boxes, "raster")):
        assert b["bbox"] == pytest.approx(o["bbox"], abs=64 / 999)
    assert len(BoxTokenizer(BoxTokenizerConfig(max_boxes=2)).to_bins(boxes, (64, 64))) == 2
    with pytest.raises(ValueError):
        BoxTokenizerConfig(order="random")


def test_fsq_indices_and_lookup_agree():
    q = FSQ([8, 5, 5, 5])
    assert q.codebook_size == 1000 and q.dim == 4
    out = q(torch.randn(3, 4, 5, 5) * 4)
    assert out.indices.min() >= 0 and out.indices.max() < 1000
    assert torch.allclose(q.lookup(out.indices), out.z_q, atol=1e-6)
    # every index has its own latent: the code space is a bijection
    z = q.lookup(torch.arange(1000).view(1, 10, 100))
    assert len(torch.unique(z.flatten(2).transpose(1, 2).reshape(-1, 4), dim=0)) == 1000
    # large inputs saturate to the extreme levels, both ends reached
    sat = q(torch.full((1, 4, 1, 1), 50.0)).indices.item(), q(torch.full((1, 4, 1, 1), -50.0)).indices.item()
    assert sat == (999, 0)


def test_vq_ema_and_dead_code_restart():
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 4, decay=0.5, dead_threshold=0.5)
    vq.train()
    target = torch.nn.functional.normalize(torch.tensor([1.0, 1.0, 0.0, 0.0]), dim=0)
    z = target.view(1, 4, 1, 1).expand(2, 4, 4, 4).contiguous()
    for _ in range(10):
        out = vq(z)
    assert vq.restarts > 0  # codes nobody uses were restarted from encoder outputs
    assert torch.allclose(vq.embed[out.indices[0, 0, 0]], target, atol=1e-4)
    assert out.loss.item() < 1e-6


@pytest.mark.parametrize("modality", ["rgb", "depth", "semseg"])
@pytest.mark.parametrize("quantizer", ["fsq", "vq"])
def test_image_tokenizer_shapes_and_ranges(modality, quantizer, batch):
    tok = ImageTokenizer(ImageTokenizerConfig(modality=modality, quantizer=quantizer, vq_codebook_size=64, vq_dim=8, **TINY)).eval()
    raw = batch[modality][:4]
    ids, scale = tok.encode(raw)
    assert ids.shape == (4, 64) and ids.dtype == torch.long  # 64x64 / 8 = 8x8 tokens
    assert 0 <= int(ids.min()) and int(ids.max()) < tok.codebook_size
    out = tok.decode(ids, scale)
    if modality == "rgb":
        assert out.shape == (4, 3, 64, 64) and out.dtype == torch.uint8
    elif modality == "depth":
        assert out.shape == (4, 1, 64, 64) and (out > 0).all()
    else:
        assert out.shape == (4, 64, 64) and int(out.max()) < 5


def test_class_balanced_weights_give_each_class_an_equal_share():
    labels = torch.tensor([[[0, 0], [0, 1]], [[2, 2], [2, 2]]])  # image 0: 3 + 1 pixels; image 1: one class
    w = class_balanced_weights(labels)
    torch.testing.assert_close(w[0], torch.tensor([[2 / 3, 2 / 3], [2 / 3, 2.0]]))
    torch.testing.assert_close(w[1], torch.ones(2, 2))
    half = class_balanced_weights(labels, power=0.5)[0]  # 3 ** -0.5 : 1, mean 1
    assert half[1, 1] / half[0, 0] == pytest.approx(3**0.5) and float(half.mean()) == pytest.approx(1.0)
    torch.testing.assert_close(class_balanced_weights(labels, power=0.0), torch.ones(2, 2, 2))


def test_weighted_reconstruction_loss_weighs_pixels(batch):
    tok = ImageTokenizer(ImageTokenizerConfig(modality="rgb", **TINY))
    raw = batch["rgb"][:2]
    out = tok(raw)
    assert float(tok(raw, torch.ones(2, 64, 64)).loss) == pytest.approx(float(out.loss), rel=1e-5)
    x, _ = tok.preprocess(raw)
    only_first = torch.zeros(2, 64, 64)
    only_first[:, :, :32] = 2.0  # all the weight on the left half
    left = tok.reconstruction_loss(out.recon, raw, x, only_first)
    assert float(left) == pytest.approx(float(tok.reconstruction_loss(out.recon[..., :32], raw[..., :32], x[..., :32])), rel=1e-5)


def test_a_tokenizer_trains_with_class_balanced_losses(synth_dir):
    from fourm.tokenizers.train_image import ImageTokenizerTrainingConfig, ImageTrainConfig, train_image_tokenizer

    cfg = ImageTokenizerTrainingConfig(tokenizer=ImageTokenizerConfig(modality="rgb", **TINY), train=ImageTrainConfig(batch_size=4, max_steps=3, val_every=3, val_samples=8, num_workers=0, bf16=False, balance_by="semseg"))
    model, history = train_image_tokenizer(cfg, synth_dir, synth_dir, progress=False)
    assert history["steps"] == 3 and all(torch.isfinite(torch.tensor(history["loss"]))) and history["val"][0]["psnr"] > 0
    cfg.train.balance_by = "rgb"
    with pytest.raises(ValueError, match="own modality"):
        train_image_tokenizer(cfg, synth_dir, progress=False)
    with pytest.raises(ValueError, match="balance_power"):
        ImageTrainConfig(balance_power=-1)


def test_depth_normalisation_round_trips_metres():
    d = torch.tensor([0.5, 1.0, 7.3, 40.0]).view(1, 1, 2, 2).expand(2, 1, 2, 2)
    for norm in ("log", "affine"):
        tok = ImageTokenizer(ImageTokenizerConfig(modality="depth", depth_norm=norm, resolution=16, channels=[8]))
        x, scale = tok.preprocess(torch.nn.functional.interpolate(d, size=16))
        assert x.min() >= -1 and x.max() <= 1
        back = tok.postprocess(x, scale)
        assert torch.allclose(back, torch.nn.functional.interpolate(d, size=16), rtol=1e-5)


def test_image_tokenizer_errors(batch):
    tok = ImageTokenizer(ImageTokenizerConfig(modality="semseg", **TINY))
    with pytest.raises(ValueError, match="expects 64x64"):
        tok.encode(torch.zeros(1, 32, 32, dtype=torch.long))
    with pytest.raises(ValueError, match="class ids"):
        tok.encode(torch.full((1, 64, 64), 9))
    with pytest.raises(ValueError, match="local ids"):
        tok.decode(torch.full((1, 64), 10**6))
    with pytest.raises(ValueError, match="shape"):
        tok.decode(torch.zeros(1, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible"):
        ImageTokenizerConfig(resolution=60)


@pytest.fixture(scope="module")
def tset(captions):
    text = TextTokenizer.train(captions, TextTokenizerConfig(min_frequency=1))
    images = {m: ImageTokenizer(ImageTokenizerConfig(modality=m, **TINY)).eval() for m in ("rgb", "depth", "semseg")}
    return TokenizerSet(text=text, images=images)


def test_tokenizer_set_round_trips_and_disjoint_ranges(tset, batch):
    assert set(tset.modalities) == {"rgb", "depth", "semseg", "boxes", "caption"}
    v = tset.vocab
    caps = tset.encode("caption", batch["caption"])
    assert tset.decode("caption", caps) == batch["caption"]
    assert all(v.space_of(int(i)) == "text" for s in caps for i in s)
    box_ids = tset.encode("boxes", batch["boxes"], image_size=(64, 64))
    back = tset.decode("boxes", box_ids, image_size=(64, 64))
    ious = [iou for b, o in zip(back, batch["boxes"]) for iou in matched_box_iou(b, o)]
    assert len(ious) == sum(len(b) for b in batch["boxes"]) and min(ious) >= 0.85 and sum(ious) / len(ious) >= 0.99
    seen = {}
    for m in ("rgb", "depth", "semseg"):
        ids = tset.encode(m, batch[m][:2])
        assert len(ids) == 2 and ids[0].shape == (64,)
        spaces = {v.space_of(int(i)) for i in torch.cat(ids)}
        assert spaces == {m}
        seen[m] = ids
        assert len(tset.decode(m, ids)) == 2
    with pytest.raises(ValueError, match="not a 'depth' id"):
        tset.decode("depth", seen["rgb"])
    with pytest.raises(ValueError, match="not a boxes id"):
        tset.decode("boxes", [seen["rgb"][0]], image_size=(64, 64))
    with pytest.raises(KeyError, match="has no tokenizer for 'normals'"):
        tset.encode("normals", [])


def test_box_decode_tolerates_eos_and_truncation(tset):
    boxes = [{"bbox": [1, 2, 30, 40], "label": "large red cube"}, {"bbox": [3, 4, 5, 6], "label": "small gray sphere"}]
    ids = tset.encode("boxes", [boxes], image_size=(64, 64))[0]
    with_eos = torch.cat([ids, torch.tensor([tset.vocab.eos_id, int(ids[0])])])
    assert [b["label"] for b in tset.decode("boxes", [with_eos], image_size=(64, 64))[0]] == ["large red cube", "small gray sphere"]
    cut = ids[: len(ids) - 3 - len(tset.text.encode("small gray sphere"))]  # second box has 1 coordinate only
    assert [b["label"] for b in tset.decode("boxes", [cut], image_size=(64, 64))[0]] == ["large red cube"]


def test_box_scores_are_the_geometric_mean_of_their_tokens(tset):
    boxes = [{"bbox": [1, 2, 30, 40], "label": "large red cube"}, {"bbox": [3, 4, 5, 6], "label": "small gray sphere"}]
    ids = tset.encode("boxes", [boxes], image_size=(64, 64))[0]
    first = 4 + len(tset.text.encode("large red cube"))
    probs = torch.full((len(ids),), 0.25)
    probs[:first] = torch.linspace(0.2, 0.9, first)
    # [BOS]/[PAD] inside and [EOS] at the end are skipped with their probabilities
    seq = torch.cat([torch.tensor([tset.vocab.bos_id]), ids[:first], torch.tensor([tset.vocab.pad_id]), ids[first:], torch.tensor([tset.vocab.eos_id])])
    p = torch.cat([torch.tensor([1e-9]), probs[:first], torch.tensor([1e-9]), probs[first:], torch.tensor([1e-9])])
    out = tset.decode("boxes", [seq], image_size=(64, 64), probs=[p])[0]
    assert [b["label"] for b in out] == ["large red cube", "small gray sphere"]
    assert out[0]["score"] == pytest.approx(float(probs[:first].log().mean().exp()), rel=1e-6) and out[1]["score"] == pytest.approx(0.25, rel=1e-6)
    assert "score" not in tset.decode("boxes", [seq], image_size=(64, 64))[0][0]
    with pytest.raises(ValueError, match="probability rows"):
        tset.decode("boxes", [seq, seq], image_size=(64, 64), probs=[p])


def test_tokenizer_set_save_load_equality(tset, batch, tmp_path):
    tset.save_pretrained(tmp_path / "set")
    loaded = TokenizerSet.from_pretrained(tmp_path / "set")
    assert loaded.vocab.to_json() == tset.vocab.to_json()
    for m in ("rgb", "depth", "semseg"):
        assert torch.equal(torch.stack(loaded.encode(m, batch[m][:3])), torch.stack(tset.encode(m, batch[m][:3])))
    assert [x.tolist() for x in loaded.encode("caption", batch["caption"][:3])] == [x.tolist() for x in tset.encode("caption", batch["caption"][:3])]
    assert (tmp_path / "set" / "rgb" / "model.safetensors").is_file() and (tmp_path / "set" / "text" / "tokenizer.json").is_file()
    cfg = json.loads((tmp_path / "set" / "rgb" / "config.json").read_text())
    cfg["typo"] = 1
    (tmp_path / "set" / "rgb" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception, match="typo"):
        TokenizerSet.from_pretrained(tmp_path / "set")
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        TokenizerSet.from_pretrained(tmp_path / "nothing")
    # weights that do not fit their config: a ValueError naming the tensor, not load_state_dict's RuntimeError
    from safetensors.torch import load_file, save_file

    del cfg["typo"]
    (tmp_path / "set" / "rgb" / "config.json").write_text(json.dumps(cfg))
    weights = tmp_path / "set" / "rgb" / "model.safetensors"
    state = load_file(str(weights))
    key = next(k for k, v in state.items() if v.dim() >= 1)
    save_file({**state, key: state[key][:-1].contiguous()}, str(weights))
    with pytest.raises(ValueError, match=rf"does not fit its config \({key}: shape"):
        TokenizerSet.from_pretrained(tmp_path / "set")


def test_random_crops_cut_every_tensor_alike_on_the_token_grid():
    from fourm.tokenizers.train_image import random_crops

    rgb = torch.arange(4 * 3 * 64 * 64).view(4, 3, 64, 64)
    weight = rgb[:, 0].float()  # (B, H, W): the crop of channel 0
    cut, wcut, none = random_crops([rgb, weight, None], 32, 8, torch.Generator().manual_seed(0))
    assert cut.shape == (4, 3, 32, 32) and wcut.shape == (4, 32, 32) and none is None
    assert torch.equal(cut[:, 0].float(), wcut)
    offsets = set()
    for i in range(4):
        y, x = divmod(int(cut[i, 0, 0, 0]) - i * 3 * 64 * 64, 64)
        assert y % 8 == 0 and x % 8 == 0 and torch.equal(cut[i], rgb[i, :, y : y + 32, x : x + 32])
        offsets.add((y, x))
    assert len(offsets) > 1  # a crop per sample, not one for the batch
    assert random_crops([rgb], 64, 8, torch.Generator())[0] is rgb
    with pytest.raises(ValueError, match="multiple"):
        random_crops([rgb], 30, 8, torch.Generator())


def test_a_tokenizer_trains_on_crops_and_still_encodes_whole_images(synth_dir, batch):
    from fourm.tokenizers.train_image import ImageTokenizerTrainingConfig, ImageTrainConfig, train_image_tokenizer

    seen = []
    cfg = ImageTokenizerTrainingConfig(tokenizer=ImageTokenizerConfig(modality="depth", **TINY), train=ImageTrainConfig(batch_size=4, max_steps=3, val_every=3, val_samples=8, num_workers=0, bf16=False, crop=16))
    model, history = train_image_tokenizer(cfg, synth_dir, synth_dir, progress=False)
    assert history["steps"] == 3 and all(torch.isfinite(torch.tensor(history["loss"]))) and history["val"][0]["delta1"] > 0
    handle = model.encoder.register_forward_hook(lambda m, a, o: seen.append(tuple(a[0].shape[-2:])))
    model(batch["depth"][..., :16, :16])  # the training pass takes crops ...
    ids, _ = model.encode(batch["depth"])  # ... encoding keeps whole images
    handle.remove()
    assert seen == [(16, 16), (64, 64)] and ids.shape == (len(batch["depth"]), model.config.grid**2)
    with pytest.raises(ValueError, match="tokenizer expects 64x64"):
        model.encode(batch["depth"][..., :16, :16])
    with pytest.raises(ValueError, match="multiples of 8"):
        model(batch["depth"][..., :20, :20])
    cfg.train.crop = 12
    with pytest.raises(ValueError, match="train.crop 12"):
        train_image_tokenizer(cfg, synth_dir, progress=False)
    with pytest.raises(ValueError, match="crop >= 0"):
        ImageTrainConfig(crop=-8)
