#!/usr/bin/env python
"""Pseudo-label a folder of photos (or raw shards) with local Hugging Face models into shards of the
embedded dataset's format: depth, semseg, boxes and caption, any subset.

    python data_pipelines/pseudo_label.py --src IMAGES_OR_SHARDS --out DIR [--depth MODEL_DIR]
        [--semseg MODEL_DIR] [--boxes MODEL_DIR] [--caption MODEL_DIR] [--batch-size N]
        [--device cpu|cuda] [--shard-size N] [--shard-index I --num-shards N] [--res R]

Resumable (a re-run skips finished shards) and shardable across machines; DIR/manifest.json is
written once every shard is done. See fourm/data/pseudo_label.py.
"""

from __future__ import annotations

from fourm.cli import ArgumentParser, UsageError, non_negative_int, positive_int, run, setup_logging
from fourm.data.pseudo_label import PseudoLabelConfig, pseudo_label


def main(argv=None) -> int:
    p = ArgumentParser(prog="pseudo_label.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, help="folder of images (or with an rgb/ folder), or a raw shard directory")
    p.add_argument("--out", required=True, help="output directory for shards and manifest.json")
    p.add_argument("--depth", help="depth estimator directory (AutoModelForDepthEstimation: DPT, Depth Anything, ZoeDepth)")
    p.add_argument("--semseg", help="segmenter directory (SegFormer, Mask2Former, ...)")
    p.add_argument("--boxes", help="object detector directory (DETR-style, AutoModelForObjectDetection)")
    p.add_argument("--caption", help="image-to-text model directory (BLIP, VisionEncoderDecoder, ...)")
    p.add_argument("--depth-kind", choices=("metric", "relative"), help="override the depth model's own metric/relative declaration")
    p.add_argument("--score-threshold", type=float, default=0.5, help="keep detections scoring at least this (default 0.5)")
    p.add_argument("--max-caption-tokens", type=positive_int, default=30, help="caption length limit in tokens (default 30)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="images per model call (default 8)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--shard-size", type=positive_int, default=1000, help="images per output shard for a folder source (default 1000; shard sources keep theirs)")
    p.add_argument("--shard-index", type=non_negative_int, default=0, help="this machine's index among --num-shards (default 0)")
    p.add_argument("--num-shards", type=positive_int, default=1, help="machines splitting the output shards (default 1)")
    p.add_argument("--res", type=positive_int, default=None, help="centre-crop and resize folder images to RES x RES")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    setup_logging()
    if args.res is not None and not 8 <= args.res <= 4096:
        raise UsageError(f"--res must be between 8 and 4096, got {args.res}")
    if not 0.0 <= args.score_threshold <= 1.0:
        raise UsageError(f"--score-threshold must be between 0 and 1, got {args.score_threshold}")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        raise UsageError(f"--device must be cpu or cuda[:N], got {args.device!r}")
    cfg = PseudoLabelConfig(
        depth=args.depth, semseg=args.semseg, boxes=args.boxes, caption=args.caption, depth_kind=args.depth_kind,
        score_threshold=args.score_threshold, max_caption_tokens=args.max_caption_tokens, batch_size=args.batch_size,
        device=args.device, shard_size=args.shard_size, res=args.res,
    )
    pseudo_label(args.src, args.out, cfg, shard_index=args.shard_index, num_shards=args.num_shards, progress=not args.quiet)
    return 0


if __name__ == "__main__":
    run(main)
