#!/usr/bin/env python
"""The evaluation suite on held-out scenes: every direction against its floor and its ceiling.

    python eval/evaluate.py --model DIR --data DIR --json OUT [--train-data DIR] [--judge FILE]
        [--tokenizers DIR] [--scenes 64] [--steps 8] [--predict-steps 1] [--rgb-cfg 2] [--rgb-temperature 1] [--rgb-top-k 50] [--seed 0] [--md OUT] [--directions rgb_to_depth,rgb_to_normals,...]

--train-data enables the floors (mean depth, majority class, commonest object) and, when --judge
names no existing file, trains the caption -> rgb judge's segmenter on it and saves it there.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fourm.cli import ArgumentParser, UsageError, non_negative_int, positive_int, run, setup_logging, write_json
from fourm.data.shards import require_shards
from fourm.eval.suite import DIRECTIONS, EXTRA_DIRECTIONS, EvalConfig, check_targets, evaluate, markdown_report

log = logging.getLogger("evaluate")


def main(argv=None) -> int:
    p = ArgumentParser(prog="evaluate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a from_pretrained model directory")
    p.add_argument("--data", required=True, help="held-out raw shards (a directory with a manifest)")
    p.add_argument("--json", required=True, help="write every figure here")
    p.add_argument("--md", default=None, help="also write a markdown table here")
    p.add_argument("--train-data", default=None, help="training shards: floors, and the judge's training data")
    p.add_argument("--judge", default=None, help="judge segmenter (.safetensors): loaded if it exists, else trained from --train-data and saved")
    p.add_argument("--tokenizers", default=None, help="tokenizer set (default: the one recorded with the model)")
    p.add_argument("--scenes", type=positive_int, default=64)
    p.add_argument("--steps", type=positive_int, default=EvalConfig.steps, help="MaskGIT steps of caption -> rgb")
    p.add_argument("--predict-steps", type=positive_int, default=1, help="MaskGIT steps of rgb -> depth/semseg/normals (greedy; 1: one pass)")
    p.add_argument("--rgb-cfg", type=float, default=EvalConfig.rgb_cfg, help="classifier-free guidance scale of the sampled caption -> rgb (0: none)")
    p.add_argument("--rgb-temperature", type=float, default=EvalConfig.rgb_temperature, help="sampling temperature of caption -> rgb (0: greedy)")
    p.add_argument("--rgb-top-k", type=non_negative_int, default=EvalConfig.rgb_top_k, help="top-k of caption -> rgb (0: all ids)")
    p.add_argument("--rgb-choice-temperature", type=float, default=EvalConfig.rgb_choice_temperature, help="Gumbel noise on MaskGIT's choice of tokens to fix, caption -> rgb (0: by confidence)")
    p.add_argument("--seed", type=non_negative_int, default=EvalConfig.seed, help="sampling seed of caption -> rgb")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--judge-steps", type=positive_int, default=None, help="judge segmenter training steps (default: JudgeConfig's)")
    p.add_argument("--judge-minutes", type=float, default=None, help="judge segmenter training time cap (default: JudgeConfig's)")
    p.add_argument("--directions", default=None, help=f"comma-separated directions (default: {','.join(DIRECTIONS)}); also {', '.join(EXTRA_DIRECTIONS)} for models that have them")
    args = p.parse_args(argv)
    setup_logging()
    from fourm.eval.judge import JudgeConfig, load_or_train_segmenter, round_trip_of, train_segmenter
    from fourm.generation.files import open_model

    for flag, path in (("--data", args.data), ("--train-data", args.train_data)):
        if path is not None:
            require_shards(path, flag)
    try:
        model, tokenizers = open_model(args.model, args.tokenizers)
    except (OSError, ValueError) as exn:
        raise UsageError(str(exn)) from None
    directions = tuple(d.strip() for d in args.directions.split(",") if d.strip()) if args.directions else DIRECTIONS
    try:
        judge_config = JudgeConfig(**{k: v for k, v in (("steps", args.judge_steps), ("max_minutes", args.judge_minutes)) if v is not None})
    except ValueError as exn:
        raise UsageError(f"--judge-steps/--judge-minutes: {exn}") from None
    try:
        config = EvalConfig(scenes=args.scenes, steps=args.steps, predict_steps=args.predict_steps, batch_size=args.batch_size, directions=directions, judge=judge_config, rgb_cfg=args.rgb_cfg, rgb_temperature=args.rgb_temperature, rgb_top_k=args.rgb_top_k, rgb_choice_temperature=args.rgb_choice_temperature, seed=args.seed)
    except ValueError as exn:  # unknown directions, or a negative caption -> rgb sampling setting
        field_name, _, rest = str(exn).partition(" ")
        raise UsageError(f"--{field_name.replace('_', '-')} {rest}" if field_name.startswith("rgb_") else f"--directions: {exn}") from None
    judge = None
    if "caption_to_rgb" in directions:
        if args.judge:
            judge = load_or_train_segmenter(args.judge, args.train_data, config.judge, tokenizers=tokenizers)
        elif args.train_data:
            judge = train_segmenter(args.train_data, config.judge, round_trip=round_trip_of(tokenizers))
        if judge is None:
            log.warning("no usable --judge file and no --train-data: caption -> rgb is not judged")
    try:
        report, _ = evaluate(model, tokenizers, args.data, config, train_dir=args.train_data, judge=judge)
    except ValueError as exn:  # held-out data or a model that does not fit the directions asked for
        raise UsageError(str(exn)) from None
    report["targets"] = check_targets(report)
    write_json(args.json, report)
    table = markdown_report(report)
    if args.md:
        Path(args.md).write_text(table + "\n")
    print(table)
    log.info("wrote %s", args.json)
    return 0


if __name__ == "__main__":
    run(main)
