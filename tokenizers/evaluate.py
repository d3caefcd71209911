#!/usr/bin/env python
"""Reconstruction metrics of a tokenizer set on raw shards.

    python tokenizers/evaluate.py --tokenizer DIR --data DIR [--json OUT] [--max-samples N]

rgb PSNR/SSIM; depth AbsRel, δ1; semseg mIoU; normals angular error; boxes round-trip mean IoU;
caption and count exact round-trip rate; codebook usage and perplexity per image tokenizer.
"""

from __future__ import annotations

import logging
import os

from fourm.cli import ArgumentParser, UsageError, markdown_table, non_negative_int, run, setup_logging, write_json
from fourm.data.shards import require_shards
from fourm.tokenizers.evaluation import evaluate_tokenizer_set
from fourm.tokenizers.tokenizer_set import TokenizerSet

log = logging.getLogger("evaluate")
HEADLINE = {"rgb": ("psnr", "ssim", "codebook_usage"), "depth": ("abs_rel", "delta1", "codebook_usage"), "semseg": ("miou", "pixel_acc", "codebook_usage"), "boxes": ("mean_iou", "mean_tokens"), "caption": ("exact_round_trip", "mean_tokens"), "normals": ("median_deg", "within_11_25", "codebook_usage"), "count": ("exact_round_trip", "mean_tokens")}


def main(argv=None) -> int:
    p = ArgumentParser(prog="evaluate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", required=True, help="tokenizer-set directory")
    p.add_argument("--data", required=True, help="raw held-out shards")
    p.add_argument("--json", default=None, help="write all metrics here")
    p.add_argument("--max-samples", type=non_negative_int, default=0, help="stop after N samples (0: all)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    setup_logging()
    if not os.path.isdir(args.tokenizer):
        raise UsageError(f"--tokenizer {args.tokenizer} is not a directory")
    require_shards(args.data, "--data")
    try:
        tset = TokenizerSet.from_pretrained(args.tokenizer)
    except (FileNotFoundError, ValueError) as exn:
        raise UsageError(str(exn)) from None
    try:
        result = evaluate_tokenizer_set(tset, args.data, max_samples=args.max_samples, progress=not args.quiet)
    except ValueError as exn:  # data that does not fit the tokenizers (image size, class ids)
        raise UsageError(str(exn)) from None
    rows = [[m, k, f"{result[m][k]:.4f}"] for m, keys in HEADLINE.items() for k in keys if m in result and k in result[m]]
    print(markdown_table(["modality", "metric", "value"], rows))
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    run(main)
