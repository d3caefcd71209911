#!/usr/bin/env python
"""Train one modality tokenizer and add it to a tokenizer-set directory.

    python tokenizers/train.py --config configs/tokenizers/rgb.yaml --data DIR --out DIR [--val DIR] [--max-steps N] [--minutes M] [--set key=value ...]
    python tokenizers/train.py --config configs/tokenizers/normals.yaml --data DIR --out SET --grow    # append, keep every id of SET
    python tokenizers/train.py --add-text-modality count --out SET                                      # add count (text ids) to SET

--data/--val are raw shard directories (data_pipelines/synth_scenes.py or import_folder.py).
--out is a tokenizer set: each tokenizer in its own subfolder plus the shared vocab.json. Without
--grow the vocabulary is laid out again after training (ids may move); with --grow the new
tokenizer's ids (and its modality's tags) are appended, so models and token shards made with the
set still fit.
"""

from __future__ import annotations

import os

from fourm.cli import ArgumentParser, UsageError, positive_int, run, setup_logging
from fourm.data.shards import require_shards
from fourm.tokenizers.tokenizer_set import TEXT_MODALITIES
from fourm.tokenizers.training import add_text_modalities, load_training_config, train_tokenizer


def main(argv=None) -> int:
    p = ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="configs/tokenizers/<name>.yaml (required unless only --add-text-modality)")
    p.add_argument("--data", default=None, help="raw training shards (directory, brace pattern or glob)")
    p.add_argument("--out", required=True, help="tokenizer-set directory (created or updated)")
    p.add_argument("--val", default=None, help="raw held-out shards for periodic validation (image tokenizers)")
    p.add_argument("--max-steps", type=positive_int, default=None, help="override train.max_steps")
    p.add_argument("--minutes", type=float, default=None, help="override train.max_minutes")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override one config key")
    p.add_argument("--grow", action="store_true", help="append the new tokenizer's ids to the existing set's vocabulary instead of laying it out again")
    p.add_argument("--add-text-modality", dest="text_modalities", action="append", default=[], metavar="NAME", help="add a modality made of text ids (count) to the set, appending its tags (after training, if --config is given)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    setup_logging()
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} is not a directory")
    for name in args.text_modalities:
        if name not in TEXT_MODALITIES:
            raise UsageError(f"--add-text-modality {name}: not a text modality; text modalities: {', '.join(TEXT_MODALITIES)}")
    if args.config is None:
        if not args.text_modalities:
            p.error("--config and --data are required (unless only --add-text-modality)")
        add_text_modalities(args.out, args.text_modalities)
        return 0
    if args.data is None:
        p.error("--data is required with --config")
    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    if args.minutes is not None:
        if args.minutes <= 0:
            raise UsageError(f"--minutes must be positive, got {args.minutes}")
        overrides.append(f"train.max_minutes={args.minutes}")
    kind, config = load_training_config(args.config, overrides)
    if kind == "text" and (args.max_steps or args.minutes):
        raise UsageError("--max-steps and --minutes apply to image tokenizers only")
    require_shards(args.data, "--data")
    if args.val is not None:
        require_shards(args.val, "--val")
    train_tokenizer(kind, config, args.data, args.out, val=args.val, progress=not args.quiet, grow=args.grow)
    if args.text_modalities:
        add_text_modalities(args.out, args.text_modalities)
    return 0


if __name__ == "__main__":
    run(main)
