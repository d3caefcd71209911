"""``eval/bench.py --tiny`` produces every figure (speed itself is measured by the program, never
asserted); bad sections are usage errors."""

from __future__ import annotations

import json

from conftest import assert_usage_error, run_program


def test_bench_tiny_produces_every_figure(tmp_path, token_dir):
    out = tmp_path / "bench.json"
    proc = run_program("eval/bench.py", "--tiny", "--repeats", "1", "--tokens", str(token_dir), "--json", str(out), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["peak"]["bf16_tflops"] > 0 and r["peak"]["fp32_tflops"] > 0
    t = r["train_decoder_vs_hf"]
    assert t["ours_tokens_per_s"] > 0 and t["hf_tokens_per_s"] > 0 and 0 < t["ours_mfu"] and 0 < t["hf_mfu"]
    assert t["modality_softmax"] and t["whole_softmax"]["ours_tokens_per_s"] > 0 and t["whole_softmax"]["modality_softmax_speedup"] > 0  # the preset's softmax, and the reference
    assert {"4m", "next_token"} == set(r["train_encdec"]) and all(e["tokens_per_s"] > 0 and e["mfu"] > 0 and e["padded_tokens_per_s"] > 0 and 0 < e["real_fraction"] <= 1 for e in r["train_encdec"].values())
    assert 0.4 < r["zero3"]["ratio"] < 0.75 and len(r["zero3"]["two_ranks_bytes"]) == 2 and r["zero3"]["one_rank"] == "whole model in the 2-rank run"
    assert r["loader_samples_per_s"] > 0 and r["loader_vs_training"] > 0 and set(r["tokenizer_images_per_s"]) == {"rgb", "depth", "semseg"}
    assert {(d["dtype"], d["compiled"], d["batch"]) for d in r["decoding"]} == {("float32", False, 1), ("float32", False, 8)}
    assert all(d["speedup"] > 0 for d in r["decoding"]) and r["maskgit"]["decoder_passes_per_image"] == 8 and r["maskgit"]["rgb_decodes"] == 7
    assert "| decoding (tokens/s)" in proc.stdout and "training step" in proc.stdout


def test_bench_bad_arguments(tmp_path):
    assert_usage_error(run_program("eval/bench.py", "--sections", "warp"), "warp")
    assert_usage_error(run_program("eval/bench.py", "--tokens", str(tmp_path)), "manifest.json")
