#!/usr/bin/env python
"""Render the embedded synthetic multimodal dataset into WebDataset shards.

    python data_pipelines/synth_scenes.py --out DIR --num N [--res 64] [--seed 0] [--shard-size 1000]

Writes DIR/shard-000000.tar ... and DIR/manifest.json. Each sample holds rgb.png, depth.npy,
semseg.png, boxes.json, caption.txt and scene.json (see fourm/data/synth/).
"""

from __future__ import annotations

import logging

from fourm.cli import ArgumentParser, positive_int, non_negative_int, run, setup_logging, UsageError
from fourm.data.synth.generate import generate_dataset

log = logging.getLogger("synth_scenes")

MIN_RES, MAX_RES = 16, 1024


def main(argv=None) -> int:
    p = ArgumentParser(prog="synth_scenes.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory for shards and manifest.json")
    p.add_argument("--num", required=True, type=positive_int, help="number of scenes")
    p.add_argument("--res", type=positive_int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default 0)")
    p.add_argument("--shard-size", type=positive_int, default=1000, help="scenes per shard (default 1000)")
    p.add_argument("--workers", type=positive_int, default=None, help="render processes (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    setup_logging()
    if not MIN_RES <= args.res <= MAX_RES:
        raise UsageError(f"--res must be between {MIN_RES} and {MAX_RES}, got {args.res}")
    manifest = generate_dataset(
        args.out, args.num, res=args.res, seed=args.seed, shard_size=args.shard_size,
        workers=args.workers, overwrite=args.overwrite, progress=not args.quiet,
    )
    log.info("%d scenes, %d shards, %.0f scenes/s", manifest["num_samples"], len(manifest["shards"]), manifest["scenes_per_second"])
    return 0


if __name__ == "__main__":
    run(main)
