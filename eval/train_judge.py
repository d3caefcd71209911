#!/usr/bin/env python
"""Train the caption -> rgb judge's segmenter (``fourm.eval.judge``) on raw training shards.

    python eval/train_judge.py --data runs/demo/data/train --tokenizers runs/demo/tokenizers \
        --out runs/judge.safetensors [--steps 2000] [--minutes 3.5] [--round-trip-share 0.5]

With --tokenizers, a --round-trip-share of its training images are the rgb tokenizer's round trips
of them (labels unchanged), so it reads decoded images as a generator's come out; without, true
images only. ``make demo`` trains one the same way into ``runs/demo/judge/``; eval/geneval.py and
eval/evaluate.py --judge read the file.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fourm.cli import ArgumentParser, UsageError, non_negative_float, positive_int, run, setup_logging
from fourm.data.shards import require_shards

log = logging.getLogger("train_judge")


def main(argv=None) -> int:
    p = ArgumentParser(prog="train_judge.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="raw training shards with rgb and semseg")
    p.add_argument("--tokenizers", default=None, help="tokenizer set whose rgb round trips the judge also trains on")
    p.add_argument("--out", required=True, help="the segmenter file to write (.safetensors)")
    p.add_argument("--steps", type=positive_int, default=None, help="training steps (default: JudgeConfig's)")
    p.add_argument("--minutes", type=non_negative_float, default=None, help="training time cap (default: JudgeConfig's)")
    p.add_argument("--round-trip-share", type=non_negative_float, default=None, help="share of images replaced by round trips, in [0, 1] (default: JudgeConfig's; needs --tokenizers)")
    p.add_argument("--width", type=positive_int, default=None, help="the segmenter's base width (default: JudgeConfig's)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="images a step (default: JudgeConfig's)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    setup_logging()
    if Path(args.out).suffix != ".safetensors":
        raise UsageError(f"--out {args.out}: expected a .safetensors path")
    require_shards(args.data, "--data")
    from fourm.eval.judge import JudgeConfig, round_trip_of, save_segmenter, train_segmenter

    given = {k: v for k, v in (("steps", args.steps), ("max_minutes", args.minutes), ("round_trip_share", args.round_trip_share), ("width", args.width), ("batch_size", args.batch_size)) if v is not None}
    try:
        config = JudgeConfig(seed=args.seed, **given)
    except ValueError as exn:
        raise UsageError(str(exn)) from None
    tokenizers = None
    if args.tokenizers is not None:
        from fourm.tokenizers.tokenizer_set import TokenizerSet

        try:
            tokenizers = TokenizerSet.from_pretrained(args.tokenizers)
        except (OSError, ValueError) as exn:
            raise UsageError(f"--tokenizers {args.tokenizers}: {exn}") from None
        if "rgb" not in tokenizers.images:
            raise UsageError(f"--tokenizers {args.tokenizers}: no rgb tokenizer (it has: {', '.join(tokenizers.modalities)})")
    elif args.round_trip_share:
        raise UsageError("--round-trip-share needs --tokenizers (the rgb tokenizer that makes the round trips)")
    model = train_segmenter(args.data, config, round_trip=round_trip_of(tokenizers))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_segmenter(model, args.out)
    log.info("judge segmenter written to %s", args.out)
    return 0


if __name__ == "__main__":
    run(main)
