#!/usr/bin/env python
"""Add derived modalities (normals from depth, count from scene.json) to raw shards.

    python data_pipelines/add_modalities.py --src RAW_DIR --out DIR --add normals,count [--fov DEG] [--shard-size N] [--overwrite]

Writes DIR/shard-*.tar with every member of RAW_DIR's samples plus normals.png and/or count.txt,
and DIR/manifest.json listing them (see fourm/data/add_modalities.py).
"""

from __future__ import annotations

from fourm.cli import ArgumentParser, UsageError, positive_int, run, setup_logging
from fourm.data.add_modalities import add_modalities
from fourm.modalities import parse_modalities


def main(argv=None) -> int:
    p = ArgumentParser(prog="add_modalities.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, help="raw shard directory with manifest.json (synth_scenes.py, import_folder.py)")
    p.add_argument("--out", required=True, help="output directory for the new shards and manifest.json")
    p.add_argument("--add", required=True, help="comma-separated: normals (from depth.npy), count (from scene.json)")
    p.add_argument("--fov", type=float, default=None, help="vertical field of view in degrees for normals of samples without scene.json (its camera.fov_deg is used where there is one)")
    p.add_argument("--shard-size", type=positive_int, default=None, help="samples per shard (default: as the source)")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    setup_logging()
    try:
        add = parse_modalities(args.add)
    except (KeyError, ValueError) as exn:
        raise UsageError(f"--add {args.add}: {exn.args[0]}") from None
    add_modalities(args.src, args.out, add, fov_deg=args.fov, shard_size=args.shard_size, overwrite=args.overwrite, progress=not args.quiet)
    return 0


if __name__ == "__main__":
    run(main)
