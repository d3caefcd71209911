"""Soft targets for ordered ids (box coordinate bins): ``ordinal_sigma``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fourm.models.build import config_from_vocab
from fourm.models.encdec import EncDecConfig
from fourm.models.layers import ordinal_kl, ordinal_targets, span_cross_entropy
from fourm.vocab import SharedVocab

VOCAB = SharedVocab.build({"text": 20, "box_coords": 16, "rgb": 8})


def test_the_soft_target_is_a_gaussian_around_the_id_cut_at_the_range():
    y = torch.tensor([10, 13, 10])
    q = ordinal_targets(y, 10, 14, sigma=1.0)
    assert q.shape == (3, 4)
    torch.testing.assert_close(q.sum(-1), torch.ones(3))
    assert q[0].argmax() == 0 and q[1].argmax() == 3
    assert q[0, 0] > q[0, 1] > q[0, 2] > q[0, 3] > 0
    torch.testing.assert_close(q[0, 1] / q[0, 0], torch.tensor(float(torch.exp(torch.tensor(-0.5)))))
    sharp = ordinal_targets(torch.tensor([12]), 10, 14, sigma=0.05)
    torch.testing.assert_close(sharp, F.one_hot(torch.tensor([2]), 4).float())


def test_a_near_miss_costs_less_than_a_far_one_and_other_ids_keep_their_cross_entropy():
    lo, hi = 5, 30  # the logits' ids
    coords = [[10, 20]]
    y = torch.tensor([14, 14, 7])  # two coordinate targets, one other id
    logits = torch.full((3, hi - lo), -4.0)
    logits[0, 15 - lo] = 4.0  # predicts one bin off
    logits[1, 19 - lo] = 4.0  # five bins off
    logits[2, 7 - lo] = 4.0
    ce = F.cross_entropy(logits, y - lo, reduction="none")
    assert ce[0] == pytest.approx(float(ce[1]))  # one-hot: every miss is alike
    soft = ordinal_kl(logits, lo, y, coords, 1.0, ce)
    assert soft[0] < soft[1] - 1.0
    assert soft[2] == ce[2]
    q = ordinal_targets(y[:1], 10, 20, 1.0)
    exact = torch.full((1, hi - lo), -1e4)
    exact[0, 10 - lo : 20 - lo] = q.log()[0]
    assert float(ordinal_kl(exact, lo, y[:1], coords, 1.0, ce[:1])) == pytest.approx(0.0, abs=1e-5)  # 0 at the soft target
    with pytest.raises(ValueError, match="outside the logits"):
        ordinal_kl(logits, lo, y, [[0, 20]], 1.0, ce)


def test_span_cross_entropy_uses_the_soft_targets_only_when_asked():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 40, bias=False)
    h, y = torch.randn(4, 8), torch.tensor([12, 3, 25, 30])
    groups, spans, allowed = torch.zeros(4, dtype=torch.long), [(0, 40)], torch.ones(1, 40, dtype=torch.bool)
    plain, lse = span_cross_entropy(head, h, y, groups, spans, allowed)
    soft, lse2 = span_cross_entropy(head, h, y, groups, spans, allowed, ([[10, 28]], 2.0))
    torch.testing.assert_close(lse, lse2)
    assert torch.equal(plain[[1, 3]], soft[[1, 3]]) and not torch.allclose(plain[[0, 2]], soft[[0, 2]])


def test_the_vocabulary_names_the_coordinate_ids_and_the_setting_is_checked():
    fields = config_from_vocab(VOCAB)
    r = VOCAB.space_range("box_coords")
    assert fields["ordinal_ranges"] == [[r.start, r.stop]]
    config = EncDecConfig(**fields, dim=32, n_heads=2, n_kv_heads=2, ordinal_sigma=1.0)
    assert config.ordinal() == ([[r.start, r.stop]], 1.0)
    assert EncDecConfig(**fields, dim=32, n_heads=2, n_kv_heads=2).ordinal() is None  # off by default
    assert config_from_vocab(SharedVocab.build({"text": 20, "rgb": 8}))["ordinal_ranges"] == []
    with pytest.raises(ValueError, match="ordinal_sigma"):
        EncDecConfig(**fields, dim=32, n_heads=2, n_kv_heads=2, ordinal_sigma=-1.0)
