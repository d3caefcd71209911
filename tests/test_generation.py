"""Generation: sampling helpers, cached == uncached decoding, CFG, MaskGIT, chaining, both
architectures (tiny untrained models: these check the machinery, not quality)."""

from __future__ import annotations

import pytest
import torch

from fourm.data.loader import LoaderConfig, build_loader
from fourm.generation.api import GenerationConfig, generate, request_config
from fourm.generation.sampling import TEXT_TO_IMAGE, choice_scores, filter_logits, guided, sample, temperature_at, unmask_counts
from fourm.models.build import build_model
from fourm.objectives.builders import image_patches
from fourm.tokenizers.tokenizer_set import TokenizerSet


@pytest.fixture(scope="module")
def tok(token_dir):
    return TokenizerSet.from_pretrained(token_dir.parent / "tok")


@pytest.fixture(scope="module")
def batch(synth_dir):
    loader, _ = build_loader(synth_dir, LoaderConfig(modalities=("rgb", "caption", "semseg"), batch_size=3, shuffle=0, num_workers=0))
    return next(iter(loader))


def _model(tok, arch):
    torch.manual_seed(0)
    return build_model(f"configs/models/{arch}_tiny.yaml", vocab=tok.vocab, overrides=["dim=64"]).eval()


GREEDY = GenerationConfig(temperature=0.0, max_len=12, steps=4)


def test_sampling_helpers():
    logits = torch.tensor([[1.0, 3.0, 2.0, float("-inf")]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[True, False, False, True]]
    assert torch.isinf(filter_logits(torch.tensor([[10.0, 0.0, 0.0]]), top_p=0.5)).tolist() == [[False, True, True]]
    ids, p = sample(logits, 0.0)
    assert ids.item() == 1 and 0 < p.item() < 1
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(logits, 1.0, generator=g)[0] for _ in range(300)])
    assert set(draws.flatten().tolist()) <= {0, 1, 2}
    c, u = torch.tensor([1.0, float("-inf")]), torch.tensor([0.5, float("-inf")])
    assert torch.equal(guided(c, u, 0.0), c) and guided(c, u, 2.0)[0] == 2.0 and guided(c, u, 2.0)[1] == float("-inf")
    assert temperature_at(0, 5, 1.0, 0.0) == 1.0 and temperature_at(4, 5, 1.0, 0.0) == 0.0
    for n, steps in ((64, 8), (64, 1), (5, 8), (256, 12)):
        counts = unmask_counts(n, steps)
        assert sum(counts) == n and all(c >= 1 for c in counts) and len(counts) <= steps


def test_choice_scores_rank_by_confidence_plus_seeded_noise():
    conf = torch.tensor([[0.9, 0.5, 0.3, 0.2, 0.1, 0.05]])
    assert choice_scores(conf, 0.0).argsort(dim=1, descending=True).tolist() == [[0, 1, 2, 3, 4, 5]]
    orders = {tuple(choice_scores(conf, 4.5, torch.Generator().manual_seed(s)).argsort(dim=1, descending=True)[0].tolist()) for s in range(10)}
    assert len(orders) > 1  # the noise reorders, differently per seed
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(choice_scores(conf, 4.5, g1), choice_scores(conf, 4.5, g2))
    # a tiny scale keeps well-separated confidences in order
    assert choice_scores(conf, 1e-3, torch.Generator().manual_seed(0)).argsort(dim=1, descending=True).tolist() == [[0, 1, 2, 3, 4, 5]]


def test_request_config_gives_caption_to_rgb_the_text_to_image_settings():
    # rgb first from a caption alone: TEXT_TO_IMAGE fills every control the request leaves unset
    cfg = request_config({"caption": "a red cube"}, ["rgb", "depth"], cfg_scale=None, steps=4, top_k=None, seed=3)
    rgb = cfg.for_target("rgb")
    assert rgb.cfg_scale == TEXT_TO_IMAGE["cfg_scale"] and rgb.choice_temperature == TEXT_TO_IMAGE["choice_temperature"]
    assert rgb.schedule == TEXT_TO_IMAGE["schedule"] and rgb.top_k == TEXT_TO_IMAGE["top_k"]
    assert rgb.steps == 4 and rgb.seed == 3  # given: kept
    depth = cfg.for_target("depth")
    assert depth.cfg_scale == GenerationConfig.cfg_scale and depth.steps == 4 and depth.schedule == GenerationConfig.schedule
    # other conditions, or rgb later in a chain: the plain defaults
    for conditions, targets in (({"caption": "x", "depth": 0}, ["rgb"]), ({"caption": "x"}, ["semseg", "rgb"]), ({"depth": 0}, ["rgb"])):
        assert request_config(conditions, targets, cfg_scale=None).per_target == {}
    assert request_config({"caption": "x"}, ["rgb"], cfg_scale=2.0).for_target("rgb").cfg_scale == 2.0


@pytest.mark.parametrize("arch", ["encdec", "decoder"])
def test_every_direction_gives_valid_outputs(tok, batch, arch):
    model = _model(tok, arch)
    result = generate(model, tok, {"rgb": batch["rgb"]}, ["caption", "depth", "boxes", "semseg"], GenerationConfig(max_len=10, steps=3, cfg_scale=1.5, top_k=50, top_p=0.9))
    v = tok.vocab
    for m in ("depth", "semseg"):
        ids = torch.stack(result.ids[m])
        assert ids.shape == (3, 64) and all(v.space_of(int(i)) == m for i in ids.flatten())  # every position filled
    assert result.outputs["depth"][0].shape == (1, 64, 64) and result.outputs["semseg"][0].shape == (64, 64)
    assert all(isinstance(c, str) for c in result.outputs["caption"]) and len(result.outputs["boxes"]) == 3
    assert all(v.space_of(int(i)) == "text" for s in result.ids["caption"] for i in s)
    # sequence targets carry the probability of each generated id; boxes get a score from them
    assert set(result.token_probs) == {"caption", "boxes"}
    for m in ("caption", "boxes"):
        assert [len(p) for p in result.token_probs[m]] == [len(s) for s in result.ids[m]]
        assert all(bool(((p > 0) & (p <= 1)).all()) for p in result.token_probs[m])
    assert all(0 < b["score"] <= 1 for row in result.outputs["boxes"] for b in row)


def test_encdec_maskgit_and_roar_fill_every_position(tok, batch):
    model = _model(tok, "encdec")
    for scheme, choice in (("maskgit", 0.0), ("maskgit", 4.5), ("roar", 0.0)):
        ids = torch.stack(generate(model, tok, {"caption": batch["caption"]}, ["rgb"], GenerationConfig(scheme=scheme, steps=5, choice_temperature=choice)).ids["rgb"])
        r = tok.vocab.space_range("rgb")
        assert ids.shape == (3, 64) and bool(((ids >= r.start) & (ids < r.stop)).all())


def _greedy_decoder_reference(model, tok, prefix_ids: torch.Tensor, prefix_pos: torch.Tensor, target: str, n: int) -> torch.Tensor:
    """No cache: recompute the whole sequence for every token (1D positions for a sequence target)."""
    ids, pos = prefix_ids[None], prefix_pos[None]
    allowed = tok.vocab.allowed_mask(target)
    out = []
    for _ in range(n):
        logits = model(ids, positions=pos).logits[0, -1].masked_fill(~allowed, float("-inf"))
        nxt = int(logits.argmax())
        out.append(nxt)
        if nxt == tok.vocab.eos_id:
            break
        p = pos[0, -1, 0] + 1
        ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
        pos = torch.cat([pos, torch.tensor([[[p, p]]])], 1)
    return torch.tensor(out)


def test_kv_cache_generation_equals_recomputation(tok, batch):
    from fourm.sequence import pack_sequence

    model = _model(tok, "decoder")
    with torch.no_grad():
        result = generate(model, tok, {"caption": batch["caption"][:1]}, ["boxes"], GREEDY)
        ids = tok.encode("caption", batch["caption"][:1])[0]
        packed = pack_sequence([("caption", ids)], tok.vocab)
        start = int(packed.positions[-1, 0]) + 1
        prefix = torch.cat([packed.ids, torch.tensor([tok.vocab.begin_id("boxes")])])
        pos = torch.cat([packed.positions, torch.tensor([[start, start]])])
        ref = _greedy_decoder_reference(model, tok, prefix, pos, "boxes", 12)
    got = result.ids["boxes"][0]
    assert torch.equal(got, ref[: len(got)]) and (len(ref) == len(got) or ref[len(got)] == tok.vocab.eos_id)


def test_encdec_cached_sequence_equals_recomputation(tok, batch):
    model = _model(tok, "encdec")
    with torch.no_grad():
        result = generate(model, tok, {"rgb": batch["rgb"][:1]}, ["caption"], GREEDY)
        got = result.ids["caption"][0]
        rgb = tok.encode("rgb", batch["rgb"][:1])[0]
        idx = torch.arange(64)
        enc_pos = torch.stack([idx // 8, idx % 8], -1)[None]
        pixels = torch.from_numpy(image_patches(batch["rgb"][0].numpy(), 8))[None]  # the preset reads rgb as pixels too
        enc = model.encode(rgb[None], torch.full((1, 64), model.modality_index("rgb")), enc_pos, torch.ones(1, 64, dtype=torch.bool), pixels=pixels, pixel_mask=torch.ones(1, 64, dtype=torch.bool))
        seq, probs, allowed, cap = [tok.vocab.bos_id], [], tok.vocab.allowed_mask("caption"), model.modality_index("caption")
        for _ in range(12):
            n = len(seq)
            p = torch.arange(n)
            logits = model.decode(enc, torch.ones(1, 64, dtype=torch.bool), torch.tensor([seq]), torch.full((1, n), cap), torch.stack([p, p], -1)[None], torch.ones(1, n, dtype=torch.bool), torch.ones(1, n, dtype=torch.bool), enc_positions=enc_pos)
            masked = logits[0, -1].float().masked_fill(~allowed, float("-inf"))
            nxt = int(masked.argmax())
            if nxt == tok.vocab.eos_id:
                break
            seq.append(nxt)
            probs.append(float(masked.softmax(-1)[nxt]))
    assert got.tolist() == seq[1:]
    assert result.token_probs["caption"][0].tolist() == pytest.approx(probs, rel=1e-4)  # each id's probability, as recomputed


@pytest.mark.parametrize("arch", ["encdec", "decoder"])
def test_cfg_scale_zero_equals_conditional(tok, batch, arch):
    model = _model(tok, arch)
    # An untrained model's MaskGIT confidences are near-ties, which float rounding of the larger
    # (conditional + unconditional) batch may reorder; greedy sequences are a fair comparison.
    TARGETS = ["caption"] if arch == "encdec" else ["semseg", "caption"]
    inputs = {"caption": batch["caption"]}
    plain = generate(model, tok, inputs, TARGETS, GenerationConfig(temperature=0.0, steps=4, max_len=8, cfg_scale=0.0))
    # a vanishing guidance scale runs the batched unconditional branch yet must sample the same
    tiny = generate(model, tok, inputs, TARGETS, GenerationConfig(temperature=0.0, steps=4, max_len=8, cfg_scale=1e-7))
    for m in TARGETS:
        assert all(torch.equal(a, b) for a, b in zip(plain.ids[m], tiny.ids[m])), m
    strong = generate(model, tok, inputs, ["semseg"], GenerationConfig(temperature=0.0, steps=4, cfg_scale=5.0))
    weak = generate(model, tok, inputs, ["semseg"], GenerationConfig(temperature=0.0, steps=4, cfg_scale=0.0))
    assert not all(torch.equal(a, b) for a, b in zip(weak.ids["semseg"], strong.ids["semseg"]))


@pytest.mark.parametrize("arch", ["encdec", "decoder"])
def test_chained_targets_condition_the_next(tok, batch, arch):
    model = _model(tok, arch)
    chained = generate(model, tok, {"rgb": batch["rgb"]}, ["semseg", "depth"], GREEDY)
    direct = generate(model, tok, {"rgb": batch["rgb"]}, ["depth"], GREEDY, token_inputs={"semseg": chained.ids["semseg"]})
    assert all(torch.equal(a, b) for a, b in zip(chained.ids["depth"], direct.ids["depth"]))


def test_generation_errors(tok, batch):
    model = _model(tok, "encdec")
    with pytest.raises(KeyError, match="unknown modality 'normals'"):
        generate(model, tok, {"rgb": batch["rgb"]}, ["normals"])
    with pytest.raises(ValueError, match="no target"):
        generate(model, tok, {"rgb": batch["rgb"]}, [])
    with pytest.raises(ValueError, match="unknown generation setting"):
        generate(model, tok, {"rgb": batch["rgb"]}, ["depth"], GenerationConfig(per_target={"depth": {"tempo": 1}}))
    with pytest.raises(ValueError, match="different batch sizes"):
        generate(model, tok, {"rgb": batch["rgb"], "caption": batch["caption"][:1]}, ["depth"])


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


def test_generate_program_names_weights_that_do_not_fit(model_dir, tmp_path):
    """A model directory whose weights do not fit its config.json: one line naming the tensor and
    exit 2 (it was PyTorch's load_state_dict traceback)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from conftest import assert_usage_error, run_program

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    state = load_file(str(broken / "model.safetensors"))
    save_file({k: v[:-1].contiguous() if k == "embed.weight" else v for k, v in state.items()}, str(broken / "model.safetensors"))
    proc = run_program("launch/generate.py", "--model", str(broken), "--from", "caption=a large red sphere", "--to", "rgb", "--out", str(tmp_path / "out"))
    assert_usage_error(proc, "does not fit its config", "embed.weight: shape")
    assert not (tmp_path / "out").exists()


def test_generate_program_writes_every_output(model_dir, synth_dir, tmp_path):
    import json
    import tarfile

    import numpy as np
    from PIL import Image

    from conftest import run_program

    with tarfile.open(synth_dir / "shard-000000.tar") as tar:
        (tmp_path / "in.png").write_bytes(tar.extractfile("00000000.rgb.png").read())
    Image.open(tmp_path / "in.png").resize((96, 80)).save(tmp_path / "big.png")  # another size: resized
    out = tmp_path / "out"
    proc = run_program("launch/generate.py", "--model", str(model_dir), "--from", f"rgb={tmp_path / 'big.png'}", "--to", "caption,depth,semseg,boxes", "--out", str(out), "--steps", "3", "--cfg", "2")
    assert proc.returncode == 0, proc.stderr
    assert "resizing 96x80 to 64x64" in proc.stderr
    for name in ("caption.txt", "depth.npy", "depth.png", "semseg.png", "semseg_overlay.png", "boxes.png", "boxes.json", "overview.png"):
        assert (out / name).is_file(), name
    assert np.load(out / "depth.npy").shape == (64, 64) and (np.load(out / "depth.npy") > 0).all()
    assert Image.open(out / "semseg.png").size == (64, 64)
    assert isinstance(json.loads((out / "boxes.json").read_text()), list)
    proc = run_program("launch/generate.py", "--model", str(model_dir), "--from", "caption=a large red sphere", "--to", "rgb", "--out", str(tmp_path / "o2"), "--steps", "2", "--dtype", "bfloat16")
    assert proc.returncode == 0, proc.stderr
    assert Image.open(tmp_path / "o2" / "rgb.png").size == (64, 64)


def test_generate_program_bad_input(model_dir, tmp_path):
    from conftest import assert_usage_error, run_program

    out = tmp_path / "o"
    base = ["--model", str(model_dir), "--out", str(out)]
    assert_usage_error(run_program("launch/generate.py", *base, "--from", "rgb=x.png", "--to", "normals"), "known: ")
    assert_usage_error(run_program("launch/generate.py", *base, "--from", f"rgb={tmp_path / 'none.png'}", "--to", "depth"), "none.png")
    assert_usage_error(run_program("launch/generate.py", *base, "--from", "thermal=x.png", "--to", "depth"), "thermal")
    assert_usage_error(run_program("launch/generate.py", *base, "--from", "caption=", "--to", "depth"), "empty")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    assert_usage_error(run_program("launch/generate.py", *base, "--from", f"rgb={tmp_path / 'bad.png'}", "--to", "depth"), "bad.png")
    assert_usage_error(run_program("launch/generate.py", "--model", str(tmp_path), "--out", str(out), "--to", "depth"), "config.json")
    assert_usage_error(run_program("launch/generate.py", *base, "--from", "caption=hi", "--to", "caption"), "both an input and a target")
    assert not out.exists() or not any(out.iterdir())


def test_compiled_decoding_step_equals_eager(tok, batch, monkeypatch):
    """GenerationConfig(compile=True) (torch.compile with frozen weights, max-autotuned GEMMs)
    gives the eager step's logits at every step (to 1e-4; the rgb span starts past id 0, the case
    Inductor's C++ GEMM template got wrong) and the same greedy tokens, and compiles again after
    the weights change."""
    from fourm.generation import api
    from fourm.generation import compiled as compiled_step

    logits = {}
    for name in ("decode_step", "compiled_decode_step"):
        def recording(*args, _step=getattr(api, name), _log=logits.setdefault(name, [])):
            out = _step(*args)
            _log.append(out.detach().clone())
            return out
        monkeypatch.setattr(api, name, recording)
    torch.manual_seed(0)  # two layers: every kind of product the step has, half the compile time of eight
    model = build_model("configs/models/decoder_tiny.yaml", vocab=tok.vocab, overrides=["dim=64", "n_layers=2"]).eval()
    eager = generate(model, tok, {"caption": batch["caption"][:2]}, ["rgb"], GREEDY).ids["rgb"]
    compiled = generate(model, tok, {"caption": batch["caption"][:2]}, ["rgb"], GenerationConfig(temperature=0.0, compile=True)).ids["rgb"]
    assert tok.vocab.logit_span("rgb")[0] > 0 and len(logits["compiled_decode_step"]) == len(logits["decode_step"]) == 63
    assert max((a - b).abs().max().item() for a, b in zip(logits["decode_step"], logits["compiled_decode_step"])) < 1e-4
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled))
    assert not compiled_step.status["failed"] and compiled_step.status["compiled_steps"] >= 63
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)  # new weights: the frozen graph must not be reused
    eager = generate(model, tok, {"caption": batch["caption"][:2]}, ["rgb"], GREEDY).ids["rgb"]
    compiled = generate(model, tok, {"caption": batch["caption"][:2]}, ["rgb"], GenerationConfig(temperature=0.0, compile=True)).ids["rgb"]
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled))
    assert not compiled_step.status["failed"] and compiled_step.status["recompiles_for_new_weights"] == 1
