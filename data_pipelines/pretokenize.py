#!/usr/bin/env python
"""Turn raw shards into token shards (shared-vocabulary ids per modality) with a tokenizer set.

    python data_pipelines/pretokenize.py --tokenizers DIR --data DIR --out DIR [--batch-size 64] [--shard-size 1000] [--overwrite]
"""

from __future__ import annotations

import os

from fourm.cli import ArgumentParser, UsageError, positive_int, run, setup_logging
from fourm.data.shards import require_shards
from fourm.tokenizers.pretokenize import pretokenize
from fourm.vocab import VOCAB_FILE


def main(argv=None) -> int:
    p = ArgumentParser(prog="pretokenize.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizers", required=True, help="tokenizer-set directory (tokenizers/train.py --out)")
    p.add_argument("--data", required=True, help="raw shards")
    p.add_argument("--out", required=True, help="output directory for token shards")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--shard-size", type=positive_int, default=1000)
    p.add_argument("--overwrite", action="store_true", help="replace token shards already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    setup_logging()
    if not os.path.isfile(os.path.join(args.tokenizers, VOCAB_FILE)):
        raise UsageError(f"--tokenizers {args.tokenizers}: no tokenizer set there (missing {os.path.join(args.tokenizers, VOCAB_FILE)})")
    require_shards(args.data, "--data")
    try:
        pretokenize(args.tokenizers, args.data, args.out, batch_size=args.batch_size, shard_size=args.shard_size, overwrite=args.overwrite, progress=not args.quiet)
    except ValueError as exn:  # data that does not fit the tokenizers (image size, class ids, vocabulary)
        raise UsageError(str(exn)) from None
    return 0


if __name__ == "__main__":
    run(main)
