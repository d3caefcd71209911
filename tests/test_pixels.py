"""rgb inputs read as pixel patches too (``EncDecConfig.rgb_pixels``): patches in token order, the
examples and batches that carry them, the model's use of them, token shards that keep them, and
generation from an image."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import REPO, assert_usage_error, rewrite_tar, run_program
from fourm.models.build import build_model
from fourm.objectives.builders import collate_encdec, encdec_example, image_patches, prefix_plans
from fourm.objectives.masking import MaskingConfig, plan_masking
from test_objectives import GRIDS, KINDS, SENTINELS, VOCAB, _tokens


def test_image_patches_follow_the_token_grid():
    image = np.random.default_rng(0).integers(0, 256, (3, 16, 16), dtype=np.uint8)
    rows = image_patches(image, 4)
    assert rows.shape == (16, 3 * 4 * 4)
    for r in range(4):
        for c in range(4):
            assert (rows[r * 4 + c] == image[:, r * 4 : (r + 1) * 4, c * 4 : (c + 1) * 4].reshape(-1)).all()
    with pytest.raises(ValueError, match="does not split"):
        image_patches(image[:, :15, :15], 4)


def test_examples_carry_the_patches_of_their_visible_rgb_tokens():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (3, 16, 16), dtype=np.uint8)
    rows = image_patches(image, 4)
    examples = []
    for seed in range(20):
        r = np.random.default_rng(seed)
        tokens = _tokens(r)
        plans, _ = plan_masking(r, tokens, KINDS, MaskingConfig(input_budget=24, target_budget=24), SENTINELS)
        ex = encdec_example(tokens, plans, VOCAB, GRIDS, pixels={"rgb": image})
        rgb = list(VOCAB.modalities).index("rgb")
        is_rgb = ex.enc_modality == rgb
        assert (ex.enc_pixel_mask == is_rgb).all()
        plan = next(p for p in plans if p.name == "rgb")
        assert (ex.enc_pixels[is_rgb] == rows[plan.input_idx]).all() and not ex.enc_pixels[~is_rgb].any()
        assert (ex.enc_ids[is_rgb] == tokens["rgb"][plan.input_idx]).all()
        examples.append(ex)
    assert any(e.enc_pixel_mask.any() for e in examples) and any(not e.enc_pixel_mask.all() for e in examples)
    batch = collate_encdec(examples)
    for i, e in enumerate(examples):
        n = len(e.enc_ids)
        assert (batch["enc_pixels"][i, :n].numpy() == e.enc_pixels).all() and (batch["enc_pixel_mask"][i, :n].numpy() == e.enc_pixel_mask).all()
        assert not batch["enc_pixel_mask"][i, n:].any()
    for none in (None, {}):  # no images (shards without pixels, or a sample without rgb): no patch tensors
        tokens = _tokens(rng)
        assert "enc_pixels" not in collate_encdec([encdec_example(tokens, prefix_plans(tokens, KINDS, rng), VOCAB, GRIDS, pixels=none)])


def _model(**over):
    overrides = ["dim=64", "enc_layers=1", "dec_layers=1", "rgb_pixels=true", "pixel_patch=4", "pixel_stem=linear"] + [f"{k}={v}" for k, v in over.items()]
    torch.manual_seed(0)
    return build_model(REPO / "configs/models/encdec_tiny.yaml", vocab=VOCAB, overrides=overrides)


def test_the_model_adds_a_projection_of_each_tokens_patch():
    model = _model().eval()
    rng = np.random.default_rng(2)
    tokens = _tokens(rng)
    ex = encdec_example(tokens, prefix_plans(tokens, KINDS, rng, n_condition=4, shuffle=False), VOCAB, GRIDS, pixels={"rgb": rng.integers(0, 256, (3, 16, 16), dtype=np.uint8)})
    b = collate_encdec([ex])
    args = (b["enc_ids"], b["enc_modality"], b["enc_positions"], b["enc_valid"])
    plain = model.encode(*args)
    assert torch.equal(model.encode(*args, pixels=b["enc_pixels"], pixel_mask=torch.zeros_like(b["enc_pixel_mask"])), plain)
    with_pixels = model.encode(*args, pixels=b["enc_pixels"], pixel_mask=b["enc_pixel_mask"])
    assert not torch.allclose(with_pixels, plain)
    # by hand: the embedding plus the projection of the patch scaled to [-1, 1], at rgb tokens only
    x = model.embed(args[0]) + model.modality_embeddings(args[1])
    x = x + b["enc_pixel_mask"][..., None] * (b["enc_pixels"].float() / 127.5 - 1) @ model.pixel_embed.weight.T
    assert torch.allclose(model.pixel_features(b["enc_pixels"], b["enc_pixel_mask"]) + model.embed(args[0]) + model.modality_embeddings(args[1]), x, atol=1e-6)
    # training: pixel dropout withholds whole examples' patches (dropout 0 keeps them all)
    kept = _model(pixel_dropout=0.0).train()
    assert torch.allclose(kept.pixel_features(b["enc_pixels"], b["enc_pixel_mask"]), model.pixel_features(b["enc_pixels"], b["enc_pixel_mask"]))
    dropping = _model(pixel_dropout=0.5).train()
    torch.manual_seed(0)
    many = dropping.pixel_features(b["enc_pixels"].expand(64, -1, -1), b["enc_pixel_mask"].expand(64, -1))
    zero = (many.abs().sum((1, 2)) == 0).float().mean()
    assert 0.25 < zero < 0.75
    with pytest.raises(ValueError, match="pixel patches of 48 values, but this model reads 192"):
        _model(pixel_patch=8).eval().encode(*args, pixels=b["enc_pixels"], pixel_mask=b["enc_pixel_mask"])


@pytest.mark.parametrize("stem", ["linear", "conv"])
def test_generation_reads_the_condition_images_pixels_not_the_generated_ones(monkeypatch, stem):
    from fourm.generation import api

    model = _model(pixel_stem=stem).eval()
    rng = np.random.default_rng(3)
    images = [torch.from_numpy(rng.integers(0, 256, (3, 16, 16), dtype=np.uint8)) for _ in range(2)]
    conds = {"rgb": [torch.as_tensor(_tokens(rng)["rgb"]) for _ in range(2)]}
    seen = []
    encode = model.encode

    def spy(*a, **k):
        seen.append((k.get("pixels"), k.get("pixel_mask"), a[1]))
        return encode(*a, **k)

    monkeypatch.setattr(model, "encode", spy)
    cfg = api.GenerationConfig(steps=2, max_len=4, cfg_scale=2.0)
    out = api.generate_ids(model, VOCAB, GRIDS, conds, ["depth", "caption"], cfg, pixels={"rgb": images})
    rgb = list(VOCAB.modalities).index("rgb")
    for pixels, mask, modality in seen:
        rows = pixels.shape[0] // 2  # the guided pass's unconditional half has no condition
        assert (mask[:rows] == (modality[:rows] == rgb)).all() and not mask[rows:].any()  # (no rgb target: no [BOS] of rgb's modality)
        for i in range(rows):
            assert (pixels[i][mask[i]].numpy() == image_patches(images[i].numpy(), 4)).all()
    assert set(out) == {"depth", "caption"}
    # the same ids without pixels give other outputs (the patches are read)
    seen.clear()
    other = api.generate_ids(model, VOCAB, GRIDS, conds, ["depth"], cfg, pixels={"rgb": [255 - x for x in images]})
    assert not all(torch.equal(a, b) for a, b in zip(out["depth"], other["depth"]))


def test_token_shards_keep_the_rgb_pixels_and_a_pixel_model_trains(token_dir, tmp_path):
    import webdataset as wds

    from fourm.data.codecs import decode_npy

    manifest = json.loads((token_dir / "manifest.json").read_text())
    assert manifest["pixels"] == {"rgb": manifest["grids"]["rgb"] * 8}
    sample = next(iter(wds.WebDataset(str(sorted(token_dir.glob("shard-*.tar"))[0]), shardshuffle=False)))
    image = decode_npy(sample["rgb.pixels.npy"], "rgb.pixels.npy")
    res = manifest["grids"]["rgb"] * 8
    assert image.dtype == np.uint8 and image.shape == (3, res, res)
    out = tmp_path / "pix"
    args = ["--config", "configs/train/tiny_encdec.yaml", "--data", str(token_dir), "--max-steps", "30", "--set", "model.rgb_pixels=true", "--set", "model.dim=64", "--set", "optim.lr=0.003", "--set", "optim.warmup_steps=5", "--set", "data.batch_size=8", "--set", "data.shuffle_buffer=16", "--set", "log_every=2", "--quiet"]
    proc = run_program("launch/train.py", *args, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss"] < 0.8 * records[0]["loss"]
    import fourm

    model = fourm.load_model(out / "final")
    assert model.config.rgb_pixels and model.config.pixel_stem == "conv" and sum(float(w.abs().sum()) for w in model.pixel_embed.parameters()) > 0
    # token shards made before (no rgb.pixels.npy): a one-line error, not a silent ids-only run
    old = tmp_path / "old"
    old.mkdir()
    for shard in token_dir.glob("shard-*.tar"):
        shutil.copy(shard, old / shard.name)
        rewrite_tar(old / shard.name, lambda name, data: None if name.endswith(".pixels.npy") else data)
    (old / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "pixels"}))
    assert_usage_error(run_program("launch/train.py", *[a if a != str(token_dir) else str(old) for a in args], "--out", str(tmp_path / "o")), "no rgb pixels", "pretokenize")
    assert_usage_error(run_program("launch/train.py", *args, "--out", str(tmp_path / "p"), "--set", "model.pixel_patch=4"), "patches of 8 pixels", "pixel_patch=8")


def test_rgb_known_only_as_ids_is_read_through_its_decoding(monkeypatch):
    """Generated rgb (as a later target's condition) and MaskGIT's partly generated rgb get the
    patches of their ids decoded (here a stand-in decoder that paints each token's patch with its
    id), so every rgb token the encoder sees has its patch, as in training; a finished rgb is
    decoded only when a later target reads it."""
    from fourm.generation import api

    model = _model().eval()
    g, p = 4, 4

    decodes = []

    def to_pixels(m, ids):
        assert m == "rgb" and ids.shape[1] == g * g
        decodes.append(m)
        v = (ids % 251).to(torch.uint8).reshape(-1, g, g)
        return v.repeat_interleave(p, 1).repeat_interleave(p, 2)[:, None].expand(-1, 3, -1, -1).contiguous()

    seen = []
    encode = model.encode

    def spy(ids, modality, positions, valid, *a, **k):
        seen.append((ids, modality, valid, k.get("pixels"), k.get("pixel_mask")))
        return encode(ids, modality, positions, valid, *a, **k)

    monkeypatch.setattr(model, "encode", spy)
    rng = np.random.default_rng(4)
    conds = {"caption": [torch.as_tensor(_tokens(rng)["caption"]) for _ in range(2)]}
    out = api.generate_ids(model, VOCAB, GRIDS, conds, ["rgb", "depth"], api.GenerationConfig(steps=3, cfg_scale=1.5), to_pixels=to_pixels)
    rgb = list(VOCAB.modalities).index("rgb")
    calls = 0
    for ids, modality, valid, pixels, mask in seen:
        is_rgb = (modality == rgb) & valid & (ids != VOCAB.bos_id)  # ([BOS], the null condition, takes the target's modality)
        if not is_rgb.any():
            continue
        calls += 1
        assert (mask == is_rgb).all()
        assert (pixels[is_rgb] == (ids[is_rgb] % 251).to(torch.uint8)[:, None]).all()
    assert calls == 2 + 3  # rgb: MaskGIT steps 2 and 3 (step 1 has nothing fixed); depth: its 3 steps, rgb as their condition
    assert len(out["rgb"]) == 2 and len(decodes) == 2 + 1  # steps 2 and 3, then the finished rgb for depth
    decodes.clear()
    api.generate_ids(model, VOCAB, GRIDS, conds, ["rgb"], api.GenerationConfig(steps=3), to_pixels=to_pixels)
    assert len(decodes) == 2  # the last target's pixels are not decoded: nothing reads them


@pytest.mark.parametrize("full_res", [0, 8])
def test_the_conv_stem_reads_neighbours_never_hidden_patches_whatever_the_batch(full_res):
    """``pixel_stem: conv``: a token's feature changes with a visible neighbour's pixels (the
    linear stem's does not), never with a hidden patch's, and is the same alone or batched beside
    an example whose visible patches reach further (the canvas is only as large as needed); with
    a full-resolution first convolution too, whose wider view still ends at the canvas's margin."""
    from fourm.models.pixel_stem import ConvPixelStem

    torch.manual_seed(0)
    stem = ConvPixelStem(4, 32, full_res).eval()
    assert (stem.net[0].stride, stem.net[0].out_channels) == (((1, 1), 8) if full_res else ((2, 2), stem.net[0].out_channels))
    g, p = 4, 4
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (3, g * p, g * p), dtype=np.uint8)
    patches = torch.from_numpy(image_patches(image, g))[None]  # (1, 16, 48)
    positions = torch.stack(torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij"), -1).reshape(1, g * g, 2)
    mask = torch.zeros(1, g * g, dtype=torch.bool)
    mask[0, [0, 1, 4, 5]] = True  # the top-left 2 x 2 patches visible
    with torch.no_grad():
        base = stem(patches, mask, positions)
        assert base.shape == (1, 16, 32) and base[0, mask[0]].abs().sum() > 0 and not base[0, ~mask[0]].any()
        hidden = patches.clone()
        hidden[0, 2] = 255 - hidden[0, 2]  # a hidden patch beside visible token 1
        assert torch.equal(stem(hidden, mask, positions), base)
        for seen_by, changed in ((0, 1), (0, 4), (5, 4), (5, 1)):  # right, below, left, above
            neighbour = patches.clone()
            neighbour[0, changed] = 255 - neighbour[0, changed]
            assert not torch.allclose(stem(neighbour, mask, positions)[0, seen_by], base[0, seen_by])
        far = torch.ones(1, g * g, dtype=torch.bool)  # a second example with every patch visible
        both = stem(torch.cat([patches, patches.flip(1)]), torch.cat([mask, far]), torch.cat([positions, positions]))
        assert torch.allclose(both[:1], base, atol=1e-6)
        calls = []  # no patch visible: zeros, yet every layer runs (ZeRO-3 ranks gather their weights alike)
        for layer in (stem.net[0], stem.net[-1], stem.linear):
            layer.register_forward_hook(lambda *a: calls.append(1))
        assert not stem(patches, torch.zeros_like(mask), positions).any() and len(calls) == 3


def test_a_conv_stem_model_encodes_and_checks_its_config():
    from fourm.models.encdec import EncDecConfig

    model = _model(pixel_stem="conv").eval()
    rng = np.random.default_rng(6)
    tokens = _tokens(rng)
    b = collate_encdec([encdec_example(tokens, prefix_plans(tokens, KINDS, rng, n_condition=4, shuffle=False), VOCAB, GRIDS, pixels={"rgb": rng.integers(0, 256, (3, 16, 16), dtype=np.uint8)})])
    args = (b["enc_ids"], b["enc_modality"], b["enc_positions"], b["enc_valid"])
    plain = model.encode(*args)
    assert torch.equal(model.encode(*args, pixels=b["enc_pixels"], pixel_mask=torch.zeros_like(b["enc_pixel_mask"])), plain)
    assert not torch.allclose(model.encode(*args, pixels=b["enc_pixels"], pixel_mask=b["enc_pixel_mask"]), plain)
    with pytest.raises(ValueError, match="positions"):
        model.pixel_features(b["enc_pixels"], b["enc_pixel_mask"])
    with pytest.raises(ValueError, match="'linear' or 'conv'"):
        EncDecConfig(pixel_stem="cnn")
    with pytest.raises(ValueError, match="power-of-two"):
        EncDecConfig(rgb_pixels=True, pixel_stem="conv", pixel_patch=6)
    with pytest.raises(ValueError, match="stem_full_res needs pixel_stem: conv"):
        EncDecConfig(rgb_pixels=True, pixel_stem="linear", stem_full_res=16)
    assert _model(pixel_stem="conv", stem_full_res=8).pixel_embed.net[0].out_channels == 8
