#!/usr/bin/env python
"""Speed benchmarks, every figure side by side with its peer, in one run.

    python eval/bench.py [--json OUT] [--repeats 3] [--tokens DIR] [--tokenizers DIR] [--sections ...] [--tiny]

Sections: ``peak`` (a large bf16 and fp32 matmul: the ceiling MFU is read against); ``train``
(decoder-only step vs ``transformers.LlamaForCausalLM`` of the identical shape on the same batch,
bf16 autocast both where the CPU has native bf16, else fp32 both; eager, and both compiled; the encoder-decoder step with the 4M objective and with plain next-token);
``data`` (the token-shard reader's samples/s vs the training step's consumption; image tokenizer
encode rates); ``zero3`` (parameter bytes per rank under DeepSpeed ZeRO-3 with 1 and 2 CPU ranks);
``decoding`` (KV-cache decoding, eager and compiled, vs HF ``generate`` on the same
weights in the same dtype, greedy, batch 1 and 8; MaskGIT ms per image). Token shards: ``--tokens``
(e.g. the demo's ``runs/demo/tokens/train``) or a small set rendered and pretokenized on the spot
with an untrained tokenizer set. ``--tiny`` shrinks every size (for the test suite).
"""

from __future__ import annotations

import logging
import os
import platform
import tempfile
import time
from pathlib import Path

from fourm.cli import ArgumentParser, UsageError, markdown_table, positive_int, run, setup_logging, write_json

log = logging.getLogger("bench")
SECTIONS = ("peak", "train", "data", "zero3", "decoding")


def main(argv=None) -> int:
    p = ArgumentParser(prog="bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None)
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--tokens", default=None, help="token shards for the training and data sections")
    p.add_argument("--tokenizers", default=None, help="tokenizer set for the encode rates (default: the one the token shards were made with)")
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--tiny", action="store_true", help="small sizes, for tests")
    args = p.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad or not sections:
        raise UsageError(f"unknown section(s) {bad}; known: {', '.join(SECTIONS)}")
    if args.tokens and not (Path(args.tokens) / "manifest.json").is_file():
        raise UsageError(f"--tokens {args.tokens}: no manifest.json (pretokenized shards expected)")
    setup_logging()
    import torch

    from fourm.bench import speed

    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads", "date": time.strftime("%Y-%m-%d"), "tiny": args.tiny}
    r = args.repeats
    from fourm.precision import cpu_bf16_pays, cpu_has_native_bf16

    native = cpu_has_native_bf16()  # without it bf16 runs reference kernels: its peak is measured smaller, training runs fp32
    bf16_training = cpu_bf16_pays()  # native and faster than fp32 (not so with AVX512-BF16 alone)
    with tempfile.TemporaryDirectory() as tmp:
        tokens = Path(args.tokens) if args.tokens else None
        if tokens is None and ("train" in sections or "data" in sections or "zero3" in sections):
            tokens = speed.untrained_token_shards(Path(tmp), scenes=64 if args.tiny else 256)
        if "peak" in sections or "train" in sections:
            n = 512 if args.tiny else 4096
            n_bf16 = n if native else min(n, 1024)
            result["peak"] = {"bf16_tflops": speed.matmul_peak_tflops("bfloat16", n_bf16, r), "fp32_tflops": speed.matmul_peak_tflops("float32", n, r), "n": n, "n_bf16": n_bf16,
                              "bf16_native": native, "training_dtype": "bfloat16" if bf16_training else "float32"}
            log.info("matmul peak: %s", result["peak"])
        if "train" in sections:
            peak = result["peak"]["bf16_tflops" if bf16_training else "fp32_tflops"]
            # eager, and (not --tiny: minutes of compiling) both compiled, the four taking turns
            result["train_decoder_vs_hf"] = speed.training_vs_hf(tokens, peak, r, batch_size=4 if args.tiny else 16, compile=not args.tiny)
            result["train_encdec"] = speed.training_encdec(tokens, peak, r, batch_size=4 if args.tiny else 32)
        if "data" in sections:
            result["loader_samples_per_s"] = speed.loader_samples_per_s(tokens, batches=3 if args.tiny else 30, batch_size=4 if args.tiny else 32)
            tok_dir = Path(args.tokenizers) if args.tokenizers else speed.tokenizer_dir_of(tokens)
            result["tokenizer_images_per_s"] = speed.tokenizer_images_per_s(tok_dir, batch=4 if args.tiny else 64, repeats=r)
            if "train_encdec" in result:
                result["loader_vs_training"] = result["loader_samples_per_s"] / result["train_encdec"]["4m"]["samples_per_s"]
        if "zero3" in sections:
            result["zero3"] = speed.zero3_parameter_memory(tokens, Path(tmp), one_rank_run=not args.tiny)
        if "decoding" in sections:
            result["decoding"] = []
            # --tiny leaves out the compiled step (a one-off compile of ~1 min on 2 cores; its parity
            # with eager decoding is tested in tests/test_generation.py); bf16 only where it is native
            combos = (("float32", False),) if args.tiny else (("float32", False), ("float32", True)) + ((("bfloat16", False), ("bfloat16", True)) if native else ())
            for dtype, compile in combos:
                for b in (1, 8):
                    result["decoding"].append(speed.decoding_vs_hf(b, new_tokens=16 if args.tiny else 64, repeats=r, dtype=dtype, compile=compile))
            result["maskgit"] = speed.maskgit_images_per_s(batch=2 if args.tiny else 8, repeats=r)
    print_tables(result)
    write_json(args.json, result)
    return 0


def print_tables(result: dict) -> None:
    if "peak" in result:
        pk = result["peak"]
        why = "training runs bf16" if pk["training_dtype"] == "bfloat16" else ("native but not faster: training runs fp32" if pk["bf16_native"] else "no native bf16: training runs fp32")
        print(f"matmul peak ({pk['n']}^3): bf16 {pk['bf16_tflops']:.4f} TFLOP/s ({why}), fp32 {pk['fp32_tflops']:.2f} TFLOP/s\n")
    if "train_decoder_vs_hf" in result:
        t = result["train_decoder_vs_hf"]
        softmax = ", softmax per modality" if t["modality_softmax"] else ""
        rows = [[f"decoder_tiny, batch {t['batch']} x {t['seq_len']}{softmax}", f"{t['ours_tokens_per_s']:.0f}", f"{t['hf_tokens_per_s']:.0f}", f"{t['speedup']:.2f}x", f"{100 * t['ours_mfu']:.1f}% / {100 * t['hf_mfu']:.1f}%"]]
        if "whole_softmax" in t:
            w = t["whole_softmax"]
            rows.append([f"decoder_tiny, softmax over the whole vocabulary (as HF; per modality pays {w['modality_softmax_speedup']:.2f}x)", f"{w['ours_tokens_per_s']:.0f}", f"{t['hf_tokens_per_s']:.0f}", f"{w['speedup']:.2f}x", ""])
        if "compiled" in t:
            c = t["compiled"]
            rows.append([f"decoder_tiny, both torch.compile'd (fourm compiled / HF eager: {c['speedup_vs_hf_eager']:.2f}x)", f"{c['ours_tokens_per_s']:.0f}", f"{c['hf_tokens_per_s']:.0f}", f"{c['speedup']:.2f}x", f"{100 * c['ours_mfu']:.1f}% / {100 * c['hf_mfu']:.1f}%"])
        for name, e in result["train_encdec"].items():
            rows.append([f"encdec_tiny, {name}, batch {e['batch']} ({100 * e['real_fraction']:.0f}% real tokens; padded: {e['padded_tokens_per_s']:.0f}, {e['skip_padding_speedup']:.2f}x)", f"{e['tokens_per_s']:.0f}", "", "", f"{100 * e['mfu']:.1f}%"])
        dtype = "bf16 autocast" if result.get("peak", {}).get("training_dtype", "bfloat16") == "bfloat16" else "fp32 (bf16 not faster here)"
        print(markdown_table([f"training step, {dtype} (tokens/s, best step)", "fourm", "HF Llama", "ratio (median of paired rounds)", "MFU fourm / HF"], rows) + "\n")
    if "loader_samples_per_s" in result:
        ratio = result.get("loader_vs_training")
        print(f"token-shard reader: {result['loader_samples_per_s']:.0f} samples/s" + (f" = {ratio:.1f}x the encdec training step's consumption" if ratio else ""))
        print("tokenizer encode: " + ", ".join(f"{m} {v:.0f} images/s" for m, v in result["tokenizer_images_per_s"].items()) + "\n")
    if "zero3" in result:
        z = result["zero3"]
        print(f"ZeRO-3 parameters per rank: 1 rank {z['one_rank_bytes'] / 2**20:.2f} MB ({z['one_rank']}); 2 ranks " + " / ".join(f"{b / 2**20:.2f}" for b in z["two_ranks_bytes"]) + f" MB ({z['ratio']:.2f} of one rank)\n")
    if "decoding" in result:
        rows = [[f"decoder_tiny {r['dtype']}, greedy, batch {r['batch']}, {r['new_tokens']} new tokens", "compiled" if r["compiled"] else "eager", f"{r['ours_tokens_per_s']:.0f}", f"{r['hf_tokens_per_s']:.0f}", f"{r['speedup']:.2f}x", f"{r['first_call_s']:.1f}"] for r in result["decoding"]]
        print(markdown_table(["decoding (tokens/s), both models in the same dtype", "fourm step", "fourm", "HF generate", "ratio", "fourm first call (s)"], rows))
        m = result["maskgit"]
        print(f"\nMaskGIT, encdec_tiny, batch {m['batch']}: {m['steps']} steps = {m['decoder_passes_per_image']} decoder passes per image and {m['rgb_decodes']} rgb decodes of the batch's estimate (the model reads rgb as pixels), {m['ms_per_image']:.1f} ms per image ({m['images_per_s']:.1f} images/s)")


if __name__ == "__main__":
    run(main)
