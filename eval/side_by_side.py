#!/usr/bin/env python
"""Training levers side by side: arms trained on the same token shards for the same minutes, each
evaluated on the same held-out scenes at a few points during training, once per seed.

    python eval/side_by_side.py --demo runs/demo --minutes 6 --points 3 --seeds 0,1 \\
        --arm base --arm muon:optim.name=muon --arm lr2x:optim.lr=0.002 --out runs/levers

An arm is NAME (the base recipe: DEMO/train/config.json, the demo's resolved training config) or
NAME:key=value,key=value (overrides of it). Writes OUT/side_by_side.json (every point of every
curve), OUT/curves.png (a panel per direction) and prints the table of final figures (mean over
seeds ± half their range). Runs already in OUT with the same settings are reused.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fourm.cli import ArgumentParser, UsageError, markdown_table, positive_int, run, setup_logging

log = logging.getLogger("side_by_side")


def main(argv=None) -> int:
    p = ArgumentParser(prog="side_by_side.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", required=True, help="a make-demo output directory (tokens/, data/, tokenizers/, judge/)")
    p.add_argument("--arm", action="append", required=True, help="NAME or NAME:key=value,key=value (repeat for each arm)")
    p.add_argument("--minutes", type=float, default=6.0, help="training minutes per run")
    p.add_argument("--points", type=positive_int, default=3, help="evaluations per run, evenly spaced in minutes")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; each arm runs once per seed")
    p.add_argument("--scenes", type=positive_int, default=64, help="held-out scenes per evaluation")
    p.add_argument("--directions", default="", help="comma-separated subset of the evaluation's directions")
    p.add_argument("--config", default=None, help="the base training config (default DEMO/train/config.json)")
    p.add_argument("--set", dest="sets", action="append", default=[], help="key=value applied to every arm")
    p.add_argument("--out", required=True, help="where the runs, side_by_side.json and curves.png go")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    setup_logging()
    from fourm.eval.side_by_side import SideBySideConfig, needs_judge, parse_arm, plot_curves, run_side_by_side, summary_rows
    from fourm.eval.suite import DIRECTIONS

    try:
        arms = [parse_arm(a) for a in args.arm]
        seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
    except ValueError as exn:
        raise UsageError(str(exn) if "arm" in str(exn) else f"--seeds {args.seeds!r}: give comma-separated integers") from None
    if len({a.name for a in arms}) != len(arms):
        raise UsageError("--arm: each arm needs its own name")
    if not args.minutes > 0:
        raise UsageError("--minutes must be > 0")
    directions = tuple(d.strip() for d in args.directions.split(",") if d.strip()) or DIRECTIONS
    unknown = [d for d in directions if d not in DIRECTIONS]
    if unknown:
        raise UsageError(f"--directions: unknown {unknown}; known: {', '.join(DIRECTIONS)}")
    demo = Path(args.demo)
    config = Path(args.config) if args.config else demo / "train" / "config.json"
    for need in (demo / "tokens" / "train", demo / "data" / "val", demo / "data" / "train", demo / "tokenizers", config):
        if not need.exists():
            raise UsageError(f"--demo {demo}: missing {need} (run make demo first, or name --config)")
    cfg = SideBySideConfig(train_config=str(config), tokens=str(demo / "tokens" / "train"), val=str(demo / "data" / "val"), train_raw=str(demo / "data" / "train"),
                           tokenizers=str(demo / "tokenizers"), minutes=args.minutes, points=args.points, seeds=seeds or (0,), scenes=args.scenes,
                           directions=directions, base_overrides=tuple(args.sets))
    judge = None
    if needs_judge(directions):
        from fourm.eval.judge import JudgeConfig, load_or_train_segmenter
        from fourm.tokenizers.tokenizer_set import TokenizerSet

        judge = load_or_train_segmenter(demo / "judge" / "segmenter.safetensors", demo / "data" / "train", JudgeConfig(), tokenizers=TokenizerSet.from_pretrained(demo / "tokenizers"))
    out = Path(args.out)
    result = run_side_by_side(cfg, arms, out, judge=judge, progress=not args.quiet)
    plot_curves(result, out / "curves.png")
    header, rows = summary_rows(result)
    print(f"{result['minutes']:g} minutes a run on {result['machine']}; final figures, mean over seeds ± half their range")
    print(markdown_table(header, rows))
    log.info("curves: %s, every point: %s", out / "curves.png", out / "side_by_side.json")
    return 0


if __name__ == "__main__":
    run(main)
