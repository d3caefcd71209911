"""The shared vocabulary: disjoint spaces, determinism, tags and sentinels, growth, errors."""

from __future__ import annotations

import pytest
import torch

from fourm.models.grow import check_extends
from fourm.vocab import SharedVocab

SIZES = {"semseg": 64, "text": 300, "rgb": 1000, "box_coords": 1000, "depth": 500}


def test_layout_is_deterministic_and_canonical():
    a = SharedVocab.build(SIZES)
    b = SharedVocab.build(dict(reversed(list(SIZES.items()))))
    assert a.to_json() == b.to_json()
    assert list(a.spaces) == ["text", "box_coords", "rgb", "depth", "semseg"]
    assert a.specials[:4] == ["[PAD]", "[BOS]", "[EOS]", "[MASK]"]
    assert a.size == len(a.specials) + sum(SIZES.values())


def test_every_id_is_in_exactly_one_space():
    v = SharedVocab.build(SIZES)
    owner = {}
    for name in v.spaces:
        for i in v.space_range(name):
            assert i not in owner
            owner[i] = name
    assert sorted(owner) == list(range(len(v.specials), v.size))
    for i in (0, 3, len(v.specials) - 1):
        assert v.space_of(i) == "special"
    for name in v.spaces:
        r = v.space_range(name)
        assert v.space_of(r.start) == name and v.space_of(r.stop - 1) == name
    with pytest.raises(IndexError):
        v.space_of(v.size)


def test_tags_sentinels_and_modalities():
    v = SharedVocab.build(SIZES)
    assert v.modalities == {"rgb": ["rgb"], "depth": ["depth"], "semseg": ["semseg"], "boxes": ["box_coords", "text"], "caption": ["text"]}
    tags = {v.begin_id(m) for m in v.modalities} | {v.end_id(m) for m in v.modalities}
    assert len(tags) == 10 and all(v.space_of(t) == "special" for t in tags)
    assert v.specials[v.begin_id("rgb")] == "<rgb>" and v.specials[v.end_id("caption")] == "</caption>"
    assert v.num_sentinels == 100 and v.specials[v.sentinel_id(7)] == "<extra_id_7>"
    with pytest.raises(IndexError):
        v.sentinel_id(100)
    with pytest.raises(KeyError, match="unknown modality"):
        v.begin_id("normals")


def test_allowed_mask_restricts_to_the_modality():
    v = SharedVocab.build(SIZES)
    m = v.allowed_mask("boxes")
    assert m.sum() == 1000 + 300 + 1 and m[v.eos_id]
    r = v.allowed_mask("rgb")
    assert r.sum() == 1000 and not r[v.eos_id] and r[v.space_range("rgb").start]


def test_local_global_round_trip_and_range_errors():
    v = SharedVocab.build(SIZES)
    local = torch.tensor([0, 5, 999])
    g = v.to_global("rgb", local)
    assert torch.equal(v.to_local("rgb", g), local)
    with pytest.raises(ValueError, match="must be in"):
        v.to_global("rgb", torch.tensor([1000]))
    with pytest.raises(ValueError, match="not a 'depth' id"):
        v.to_local("depth", g)


def test_save_load_and_growth_keeps_ids(tmp_path):
    v = SharedVocab.build(SIZES)
    v.save(tmp_path / "vocab.json")
    w = SharedVocab.load(tmp_path / "vocab.json")
    assert w.to_json() == v.to_json()
    grown = v.grow({"normals": 256})
    for name, rng in v.spaces.items():
        assert grown.spaces[name] == rng
    assert grown.space_range("normals").start == v.size
    assert grown.begin_id("normals") != grown.end_id("normals") and grown.begin_id("normals") >= v.size
    assert grown.begin_id("rgb") == v.begin_id("rgb")
    grown.validate()
    with pytest.raises(ValueError, match="has 1000 ids"):
        v.grow({"rgb": 10})


def test_malformed_vocab_file(tmp_path):
    (tmp_path / "v.json").write_text('{"specials": [], "spaces": {"a": [5, 3], "b": [0, 2]}, "modalities": {}}')
    with pytest.raises(ValueError, match="not contiguous"):
        SharedVocab.load(tmp_path / "v.json")
    (tmp_path / "w.json").write_text("not json")
    with pytest.raises(ValueError, match="cannot read vocabulary"):
        SharedVocab.load(tmp_path / "w.json")


def test_optional_modalities_stay_out_of_a_fresh_build():
    from fourm.vocab import modality_spaces

    assert modality_spaces("count") == ("text",) and modality_spaces("normals") == ("normals",)
    v = SharedVocab.build(SIZES)
    assert "count" not in v.modalities and v.size == 114 + sum(SIZES.values())  # as before the registry grew
    with_count = SharedVocab.build({**SIZES, "normals": 10}, modalities=("count",))
    assert list(with_count.modalities)[-2:] == ["normals", "count"] and with_count.specials[with_count.begin_id("count")] == "<count>"
    with pytest.raises(ValueError, match="lacks"):
        SharedVocab.build({"rgb": 10}, modalities=("count",))


def test_growth_with_normals_and_count_keeps_every_old_id(tmp_path):
    old = SharedVocab.build(SIZES)
    grown = old.grow({**SIZES, "normals": 1000}, modalities=("count",))
    check_extends(old, grown)
    with pytest.raises(ValueError):
        check_extends(grown, old)
    assert list(grown.modalities) == list(old.modalities) + ["normals", "count"]
    for i in range(old.size):  # every old id means the same
        assert grown.space_of(i) == old.space_of(i)
        if i < len(old.specials):
            assert grown.specials[i] == old.specials[i]
    for m in old.modalities:
        assert (grown.begin_id(m), grown.end_id(m)) == (old.begin_id(m), old.end_id(m))
        assert torch.equal(grown.allowed_mask(m)[: old.size], old.allowed_mask(m)) and not grown.allowed_mask(m)[old.size :].any()
        assert grown.logit_span(m) == old.logit_span(m)
    # the new ids: the normals codebook, then the four tags
    assert grown.space_range("normals") == range(old.size, old.size + 1000) and grown.size == old.size + 1000 + 4
    tags = {grown.begin_id("normals"), grown.end_id("normals"), grown.begin_id("count"), grown.end_id("count")}
    assert tags == set(range(old.size + 1000, grown.size))
    assert grown.logit_span("normals") == (old.size, old.size + 1000)
    assert torch.equal(grown.allowed_mask("count"), grown.allowed_mask("caption")) and grown.allowed_mask("count")[grown.eos_id]
    grown.save(tmp_path / "vocab.json")
    loaded = SharedVocab.load(tmp_path / "vocab.json")
    assert loaded.to_json() == grown.to_json() and loaded.begin_id("count") == grown.begin_id("count")


def test_count_alone_adds_only_its_tags_and_growth_is_idempotent():
    old = SharedVocab.build(SIZES)
    grown = old.grow(SIZES, modalities=("count",))
    check_extends(old, grown)
    assert grown.size == old.size + 2 and grown.modalities["count"] == ["text"]
    assert grown.grow(SIZES, modalities=("count",)).to_json() == grown.to_json()
    assert old.grow(SIZES).to_json() == old.to_json()
    with pytest.raises(ValueError, match="has no tokens"):
        old.grow({}, modalities=("scene",))
    with pytest.raises(ValueError, match="needs the space"):
        old.grow({}, modalities=("normals",))
    with pytest.raises(ValueError, match="renumbered"):
        check_extends(old, SharedVocab.build({**SIZES, "text": 301}))
