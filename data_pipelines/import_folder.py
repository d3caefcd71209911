#!/usr/bin/env python
"""Import a folder dataset (rgb/, depth/, semseg/, boxes/ or a COCO file, captions.jsonl) into
WebDataset shards of the embedded dataset's format.

    python data_pipelines/import_folder.py --src SRC --out DIR [--res 64] [--coco FILE] [--shard-size 1000]

See fourm/data/folder_import.py for the folder layout.
"""

from __future__ import annotations

from fourm.cli import ArgumentParser, UsageError, positive_int, run, setup_logging
from fourm.data.folder_import import import_folder


def main(argv=None) -> int:
    p = ArgumentParser(prog="import_folder.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, help="folder with rgb/ and optional depth/, semseg/, boxes/, captions.jsonl")
    p.add_argument("--out", required=True, help="output directory for shards and manifest.json")
    p.add_argument("--res", type=positive_int, default=None, help="centre-crop and resize every sample to RES x RES")
    p.add_argument("--coco", default=None, help="COCO instances file for boxes (default: SRC/instances.json or SRC/annotations/instances*.json)")
    p.add_argument("--shard-size", type=positive_int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    setup_logging()
    if args.res is not None and not 8 <= args.res <= 4096:
        raise UsageError(f"--res must be between 8 and 4096, got {args.res}")
    import_folder(args.src, args.out, res=args.res, shard_size=args.shard_size, coco=args.coco, overwrite=args.overwrite, progress=not args.quiet)
    return 0


if __name__ == "__main__":
    run(main)
