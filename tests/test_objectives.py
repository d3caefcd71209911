"""Objectives: masking sampler properties, span masking, example builders, mixing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fourm.models.build import config_from_vocab
from fourm.models.decoder import DecoderConfig, DecoderLM
from fourm.models.encdec import EncDecConfig, EncoderDecoder
from fourm.objectives.builders import collate_decoder, collate_encdec, decoder_example, encdec_example, prefix_plans
from fourm.objectives.masking import AlphaSetting, MaskingConfig, dirichlet_split, plan_masking, random_split, span_mask
from fourm.objectives.mixture import ObjectiveConfig, make_example
from fourm.vocab import SharedVocab

VOCAB = SharedVocab.build({"text": 120, "box_coords": 50, "rgb": 64, "depth": 64, "semseg": 64})
KINDS = {"rgb": "image", "depth": "image", "semseg": "image", "caption": "sequence", "boxes": "sequence"}
GRIDS = {"rgb": 4, "depth": 4, "semseg": 4}
SENTINELS = [VOCAB.sentinel_id(i) for i in range(VOCAB.num_sentinels)]


def _tokens(rng, with_boxes=False):
    t = {m: np.asarray(VOCAB.to_global(m, torch.as_tensor(rng.integers(0, 64, 16)))) for m in ("rgb", "depth", "semseg")}
    t["caption"] = np.asarray(VOCAB.to_global("text", torch.as_tensor(rng.integers(0, 120, int(rng.integers(3, 12))))))
    if with_boxes:
        t["boxes"] = np.concatenate([np.asarray(VOCAB.to_global("box_coords", torch.as_tensor(rng.integers(0, 50, 4)))), t["caption"][:2]])
    return t


def test_dirichlet_split_respects_budget_capacity_and_alpha():
    rng = np.random.default_rng(0)
    for _ in range(300):
        cap = rng.integers(0, 40, 4)
        budget = int(rng.integers(0, 120))
        alphas = rng.choice([0.0, 0.5, 1.0, 5.0], 4)
        n = dirichlet_split(rng, budget, alphas, cap)
        assert (n >= 0).all() and (n <= cap).all() and n.sum() <= budget
        assert (n[(alphas == 0)] == 0).all()
        assert n.sum() == min(budget, cap[(alphas > 0)].sum())  # the budget is used when it can be


def test_dirichlet_proportions_over_many_draws():
    rng = np.random.default_rng(1)
    alphas = np.array([1.0, 2.0, 5.0])
    draws = np.array([dirichlet_split(rng, 1000, alphas, np.full(3, 10**6)) for _ in range(3000)])
    np.testing.assert_allclose(draws.mean(0) / 1000, alphas / alphas.sum(), atol=0.015)


def test_random_split_is_disjoint():
    rng = np.random.default_rng(2)
    a, b = random_split(rng, 16, 5, 7)
    assert len(a) == 5 and len(b) == 7 and not set(a) & set(b) and list(a) == sorted(a)
    with pytest.raises(ValueError):
        random_split(rng, 4, 3, 2)


def test_span_mask_rebuilds_the_sequence():
    rng = np.random.default_rng(3)
    for n in (1, 2, 7, 30):
        ids = np.arange(1000, 1000 + n)
        for ratio in (0.0, 0.15, 0.5):
            inp, tgt = span_mask(rng, ids, ratio, 3.0, SENTINELS)
            spans, cur = {}, None
            for t in tgt:
                if t in SENTINELS:
                    cur = t
                    spans[cur] = []
                else:
                    spans[cur].append(t)
            rebuilt = [x for t in inp for x in (spans[t] if t in SENTINELS else [t])]
            assert rebuilt == list(ids)
            assert abs((len(tgt) - len(spans)) - round(n * ratio)) <= 0


def test_plan_masking_budgets_and_disjointness():
    rng = np.random.default_rng(4)
    cfg = MaskingConfig(input_budget=20, target_budget=15)
    for _ in range(200):
        toks = _tokens(rng, with_boxes=True)
        plans, _ = plan_masking(rng, toks, KINDS, cfg, SENTINELS)
        n_in = n_out = 0
        for p in plans:
            if p.input_idx is not None:
                assert not set(p.input_idx) & set(p.target_idx)
                n_in += len(p.input_idx)
                n_out += len(p.target_idx)
        assert n_in <= 20 and n_out <= 15
        assert any(p.role != "none" or len(p.input_idx) or len(p.target_idx) for p in plans)


def test_alpha_settings_are_drawn_by_weight():
    rng = np.random.default_rng(5)
    cfg = MaskingConfig(settings=[AlphaSetting(name="a", weight=3.0), AlphaSetting(name="rgb-to-all", input_alphas={"depth": 0, "semseg": 0, "caption": 0}, weight=1.0)])
    names = []
    for _ in range(2000):
        plans, name = plan_masking(rng, _tokens(rng), KINDS, cfg, SENTINELS)
        names.append(name)
        if name == "rgb-to-all":
            assert all(p.name == "rgb" or (p.input_idx is None or len(p.input_idx) == 0) and p.role != "input" for p in plans)
    assert abs(names.count("a") / len(names) - 0.75) < 0.04


def test_encdec_example_aligns_inputs_targets_and_labels():
    rng = np.random.default_rng(6)
    toks = _tokens(rng)
    plans, _ = plan_masking(rng, toks, KINDS, MaskingConfig(input_budget=24, target_budget=24), SENTINELS)
    ex = encdec_example(toks, plans, VOCAB, GRIDS)
    names = list(VOCAB.modalities)
    for p in plans:
        mi = names.index(p.name)
        if p.input_idx is not None:
            sel = ex.dec_modality == mi
            assert (ex.dec_ids[sel] == VOCAB.mask_id).all() and not ex.dec_causal[sel].any()
            np.testing.assert_array_equal(ex.labels[sel], toks[p.name][p.target_idx])
            np.testing.assert_array_equal(ex.dec_positions[sel], np.stack([p.target_idx // 4, p.target_idx % 4], -1))
            np.testing.assert_array_equal(ex.enc_ids[ex.enc_modality == mi], toks[p.name][p.input_idx])
        elif p.target_ids is not None and len(p.target_ids):
            sel = ex.dec_modality == mi
            assert ex.dec_causal[sel].all() and ex.dec_ids[sel][0] == VOCAB.bos_id
            np.testing.assert_array_equal(ex.dec_ids[sel][1:], ex.labels[sel][:-1])  # teacher forcing
            assert ex.labels[sel][-1] == VOCAB.eos_id
    dropped = encdec_example(toks, plans, VOCAB, GRIDS, drop_condition=True)
    assert dropped.enc_ids.tolist() == [VOCAB.bos_id] and np.array_equal(dropped.labels, ex.labels)


def test_prefix_plans_and_decoder_examples():
    rng = np.random.default_rng(7)
    toks = _tokens(rng)
    plans = prefix_plans(toks, KINDS, rng, n_condition=2)
    assert sum(1 for p in plans if (p.input_idx is not None and len(p.input_idx)) or p.role == "input") == 2
    ex = decoder_example(toks, VOCAB, GRIDS, rng, n_condition=1)
    assert (ex.labels[: ex.prefix_len] == -100).all() and ex.prefix_len > 2
    content = ex.labels != -100
    np.testing.assert_array_equal(ex.labels[content], ex.ids[content])
    cond_len = ex.prefix_len - 3  # [BOS] <m> ... </m>
    assert content.sum() == sum(len(v) + 1 for v in toks.values()) - (cond_len + 1)  # targets + end tags
    nt = decoder_example(toks, VOCAB, GRIDS, rng, n_condition=0)
    assert nt.prefix_len == 0 and nt.ids[0] == VOCAB.bos_id


@pytest.mark.parametrize("arch", ["encdec", "decoder"])
def test_mixed_batches_run_through_the_models(arch):
    rng = np.random.default_rng(8)
    weights = {"4m": 2.0, "prefix_lm": 1.0, "next_token": 1.0} if arch == "encdec" else {"next_token": 1.0, "prefix_lm": 1.0}
    cfg = ObjectiveConfig(weights=weights, masking=MaskingConfig(input_budget=24, target_budget=24), condition_dropout=0.2)
    cfg.validate(arch)
    pairs = [make_example(arch, _tokens(rng, with_boxes=True), KINDS, VOCAB, GRIDS, cfg, rng) for _ in range(400)]
    counts = {n: sum(1 for _, o in pairs if o == n) for n in weights}
    for n, w in weights.items():
        assert abs(counts[n] / len(pairs) - w / sum(weights.values())) < 0.06
    torch.manual_seed(0)
    if arch == "encdec":
        model = EncoderDecoder(EncDecConfig(**config_from_vocab(VOCAB), dim=32, enc_layers=1, dec_layers=1, n_heads=2, n_kv_heads=2))
        batch = collate_encdec([e for e, _ in pairs[:8]])
        assert batch["labels"][~batch["dec_valid"]].eq(-100).all()
    else:
        model = DecoderLM(DecoderConfig(vocab_size=VOCAB.size, dim=32, n_layers=1, n_heads=2, n_kv_heads=2))
        batch = collate_decoder([e for e, _ in pairs[:8]])
    label_modality = batch.pop("label_modality")
    assert label_modality.shape == batch["labels"].shape and (label_modality[batch["labels"] != -100] >= 0).all()
    out = model(**batch)
    assert torch.isfinite(out.loss) and torch.isfinite(out.logits[torch.isfinite(out.logits)]).all()
    out.loss.backward()


def test_objective_config_errors():
    with pytest.raises(ValueError, match="not available for decoder"):
        ObjectiveConfig(weights={"4m": 1.0}).validate("decoder")
    with pytest.raises(ValueError, match="negative"):
        ObjectiveConfig(weights={"4m": -1.0}).validate("encdec")
    with pytest.raises(ValueError):
        MaskingConfig(input_budget=0)
