#!/usr/bin/env python
"""Speed benchmarks, every figure side by side with its peer, in one run.

    python eval/bench.py [--json OUT] [--repeats 3]

Sections so far: decoding (our KV-cache decode loop, eager and compiled, vs Hugging Face generate on
the same weights in the same dtype, greedy, batch 1 and 8) and MaskGIT (ms per 64-token image).
"""

from __future__ import annotations

import logging
import os
import platform
import time

from fourm.cli import ArgumentParser, markdown_table, positive_int, run, setup_logging, write_json
from fourm.eval.speed import decoding_vs_hf, maskgit_images_per_s

log = logging.getLogger("bench")


def main(argv=None) -> int:
    p = ArgumentParser(prog="bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None)
    p.add_argument("--repeats", type=positive_int, default=3)
    args = p.parse_args(argv)
    setup_logging()
    import torch

    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads", "date": time.strftime("%Y-%m-%d"), "decoding": [], "maskgit": None}
    for dtype, compile in (("float32", False), ("float32", True), ("bfloat16", False), ("bfloat16", True)):
        for b in (1, 8):
            result["decoding"].append(decoding_vs_hf(b, repeats=args.repeats, dtype=dtype, compile=compile))
    result["maskgit"] = maskgit_images_per_s(repeats=args.repeats)
    rows = [[f"decoder_tiny {r['dtype']}, greedy, batch {r['batch']}, {r['new_tokens']} new tokens", "compiled" if r["compiled"] else "eager", f"{r['ours_tokens_per_s']:.0f}", f"{r['hf_tokens_per_s']:.0f}", f"{r['speedup']:.2f}x", f"{r['first_call_s']:.1f}"] for r in result["decoding"]]
    print(markdown_table(["decoding (tokens/s), both models in the same dtype", "fourm step", "fourm", "HF generate", "ratio", "fourm first call (s)"], rows))
    m = result["maskgit"]
    print(f"\nMaskGIT, encdec_tiny, batch {m['batch']}: {m['steps']} steps = {m['decoder_passes_per_image']} decoder passes per image, {m['ms_per_image']:.1f} ms per image ({m['images_per_s']:.1f} images/s)")
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    run(main)
