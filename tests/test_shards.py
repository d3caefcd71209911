"""Raw shards: writing, the manifest, reading back through the loader, corrupt data, safe output."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import numpy as np
import pytest
import torch

from fourm.cli import UsageError
from fourm.data.loader import SKIP_REASONS, LoaderConfig, build_loader
from fourm.data.shards import ShardSink, expand_shards, prepare_output_dir
from fourm.data.synth.generate import generate_dataset, render_sample
from fourm.data.codecs import decode_image, decode_npy

from conftest import rewrite_tar


def _read_all(path, workers=0, **kw):
    cfg = LoaderConfig(batch_size=kw.pop("batch_size", 4), shuffle=kw.pop("shuffle", 0), num_workers=workers, **kw)
    loader, counter = build_loader(path, cfg)
    batches = list(loader)
    return batches, counter.as_dict()


def test_manifest_and_shards(synth_dir):
    manifest = json.loads((synth_dir / "manifest.json").read_text())
    assert manifest["num_samples"] == 40
    assert [s["name"] for s in manifest["shards"]] == [f"shard-{i:06d}.tar" for i in range(4)]
    assert manifest["resolution"] == 64 and manifest["seed"] == 3
    assert manifest["classes"][:2] == ["background", "ground"]
    assert set(manifest["modalities"]) == {"rgb", "depth", "semseg", "boxes", "caption", "scene", "instance"}
    assert manifest["generator"]
    with tarfile.open(synth_dir / "shard-000000.tar") as tar:
        names = tar.getnames()
    assert names[:7] == [f"00000000.{m}" for m in ("boxes.json", "caption.txt", "depth.npy", "instance.png", "rgb.png", "scene.json", "semseg.png")]
    assert not list(synth_dir.glob(".staging-*"))


def test_same_bytes_regardless_of_workers(tmp_path, synth_dir):
    generate_dataset(tmp_path / "one", 40, res=64, seed=3, shard_size=10, workers=1, progress=False)
    for i in range(4):
        name = f"shard-{i:06d}.tar"
        assert (tmp_path / "one" / name).read_bytes() == (synth_dir / name).read_bytes()


def test_round_trip_through_loader(synth_dir):
    batches, skipped = _read_all(synth_dir, modalities=("rgb", "depth", "semseg", "boxes", "caption", "scene"))
    assert skipped["total"] == 0
    keys = [k for b in batches for k in b["__key__"]]
    assert keys == [f"{i:08d}" for i in range(40)]
    b = batches[0]
    assert b["rgb"].shape == (4, 3, 64, 64) and b["rgb"].dtype == torch.uint8
    assert b["depth"].shape == (4, 1, 64, 64) and b["depth"].dtype == torch.float32
    assert b["semseg"].shape == (4, 64, 64) and b["semseg"].dtype == torch.int64
    ref = render_sample(3, 1, 64)
    assert np.array_equal(b["rgb"][1].permute(1, 2, 0).numpy(), decode_image(ref["rgb.png"], "rgb.png", "RGB"))
    assert np.array_equal(b["depth"][1, 0].numpy(), decode_npy(ref["depth.npy"], "depth.npy"))
    assert b["caption"][1] == ref["caption.txt"].decode()
    assert b["boxes"][1] == [{"bbox": [float(v) for v in x["bbox"]], "label": x["label"]} for x in json.loads(ref["boxes.json"])]
    assert b["scene"][1]["index"] == 1


def test_select_modalities_shuffle_and_workers(synth_dir):
    batches, skipped = _read_all(synth_dir, workers=2, modalities=("rgb", "caption"), shuffle=16, batch_size=8)
    keys = [k for b in batches for k in b["__key__"]]
    assert sorted(keys) == [f"{i:08d}" for i in range(40)]
    assert keys != sorted(keys)  # shuffled
    assert set(batches[0]) == {"__key__", "rgb", "caption"}
    assert skipped["total"] == 0


def test_brace_patterns_and_globs(synth_dir):
    assert len(expand_shards(str(synth_dir / "shard-{000000..000002}.tar"))) == 3
    assert len(expand_shards(str(synth_dir / "shard-*.tar"))) == 4
    batches, _ = _read_all(str(synth_dir / "shard-{000000..000001}.tar"))
    assert sum(len(b["__key__"]) for b in batches) == 20


@pytest.fixture()
def corrupt_dir(tmp_path, synth_dir):
    bad = tmp_path / "bad"
    shutil.copytree(synth_dir, bad)
    data = (bad / "shard-000001.tar").read_bytes()
    (bad / "shard-000001.tar").write_bytes(data[: len(data) // 2 + 1000])  # truncated mid-shard

    def edit(name, data):
        if name == "00000021.depth.npy":
            return b"garbage"
        if name == "00000022.rgb.png":
            return data[:40]
        if name == "00000023.caption.txt":
            return None
        if name == "00000024.depth.npy":
            buf = io.BytesIO()
            np.save(buf, np.full((64, 64), np.nan, np.float32))
            return buf.getvalue()
        return data

    rewrite_tar(bad / "shard-000002.tar", edit)
    (bad / "shard-000003.tar").write_bytes(b"this is not a tar file" * 40)
    return bad


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_data_is_skipped_and_counted(corrupt_dir, workers):
    batches, skipped = _read_all(corrupt_dir, workers=workers)
    keys = {k for b in batches for k in b["__key__"]}
    assert {f"{i:08d}" for i in range(10)} <= keys  # the intact shard is whole
    assert not keys & {f"{i:08d}" for i in range(21, 25)}
    assert not keys & {f"{i:08d}" for i in range(30, 40)}
    assert {f"{i:08d}" for i in (20, 25, 26, 27, 28, 29)} <= keys
    assert skipped["truncated_shard"] == 1
    assert skipped["unreadable_shard"] == 1
    assert skipped["corrupt_member"] == 2
    assert skipped["missing_modality"] >= 1  # the caption-less sample (+ the sample cut by truncation)
    assert skipped["inconsistent_sample"] == 1  # NaN depth
    assert set(skipped) == set(SKIP_REASONS) | {"total"}


def test_missing_shard_path_is_counted_not_fatal(tmp_path, synth_dir):
    batches, skipped = _read_all([str(synth_dir / "shard-000000.tar"), str(tmp_path / "nope.tar")])
    assert sum(len(b["__key__"]) for b in batches) == 10
    assert skipped["unreadable_shard"] == 1


def test_no_shards_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        build_loader(tmp_path)


def test_existing_dataset_is_not_overwritten_without_flag(tmp_path):
    generate_dataset(tmp_path, 5, res=32, seed=0, shard_size=5, workers=1, progress=False)
    before = (tmp_path / "shard-000000.tar").read_bytes()
    with pytest.raises(UsageError, match="--overwrite"):
        prepare_output_dir(tmp_path, overwrite=False)
    generate_dataset(tmp_path, 3, res=32, seed=1, shard_size=2, workers=1, progress=False, overwrite=True)
    assert (tmp_path / "shard-000000.tar").read_bytes() != before
    assert sorted(p.name for p in tmp_path.glob("shard-*")) == ["shard-000000.tar", "shard-000001.tar"]
    assert json.loads((tmp_path / "manifest.json").read_text())["num_samples"] == 3


def test_failure_midway_keeps_the_old_dataset(tmp_path):
    generate_dataset(tmp_path, 6, res=32, seed=0, shard_size=2, workers=1, progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(RuntimeError):
        with ShardSink(tmp_path, 2) as sink:
            for i in range(5):
                sink.write(render_sample(9, i, 32))
            raise RuntimeError("killed")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("cut", [0.02, 0.1, 0.33, 0.5, 0.77, 0.95, "member-boundary", "no-end-blocks"])
def test_truncation_anywhere_is_one_truncated_shard(tmp_path, synth_dir, cut):
    path = synth_dir / "shard-000000.tar"
    data = path.read_bytes()
    if cut == "member-boundary":  # right after the 3rd sample: tarfile alone sees a normal end
        with tarfile.open(path) as tar:
            members = tar.getmembers()
        end = members[3 * len([m for m in members if m.name.startswith("00000000.")])].offset
    elif cut == "no-end-blocks":  # every sample whole, only the closing zero blocks missing
        with tarfile.open(path) as tar:
            last = tar.getmembers()[-1]
        end = last.offset_data + ((last.size + 511) // 512) * 512
    else:
        end = int(len(data) * cut)
    (tmp_path / "shard-000000.tar").write_bytes(data[:end])
    batches, skipped = _read_all(tmp_path)
    n = sum(len(b["__key__"]) for b in batches)
    assert n == 10 if cut == "no-end-blocks" else n < 10
    if cut == "member-boundary":
        assert n == 3
    assert skipped["truncated_shard"] == 1 and skipped["unreadable_shard"] == 0
