"""The shared vocabulary: disjoint spaces, determinism, tags and sentinels, growth, errors."""

from __future__ import annotations

import pytest
import torch

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
