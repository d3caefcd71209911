#!/usr/bin/env python
"""Train an any-to-any model on token shards.

    python launch/train.py --config configs/train/tiny_encdec.yaml [--data DIR] [--out DIR] [--max-steps N]
                           [--deepspeed configs/deepspeed/zero3.json] [--resume] [--set key=value ...]

Runs the same under `python`, `torchrun --nproc_per_node N` (DDP, or DeepSpeed with --deepspeed)
and the `deepspeed` launcher. On CPU, DeepSpeed needs DS_ACCELERATOR=cpu (set automatically).

Exit status: 0 done; 2 bad input (one line on stderr), including an output directory that cannot be
written or lacks room for the checkpoints; 3 stopped after `max_bad_steps` non-finite steps in a
row (a checkpoint is written; fix the cause and `--resume`); 1 anything else.
After `kill -9` (or a preempted machine), run the same command with `--resume`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

if "--deepspeed" in sys.argv and "DS_ACCELERATOR" not in os.environ:
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"
    except ImportError:
        pass

from fourm.cli import ArgumentParser, UsageError, positive_int, run, setup_logging
from fourm.config import load_config
from fourm.data.shards import require_shards
from fourm.training.loop import TrainConfig, TrainingDiverged, train

log = logging.getLogger("train")


def main(argv=None) -> int:
    p = ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="configs/train/<name>.yaml")
    p.add_argument("--data", default=None, help="token-shard directory (pretokenize.py --out); replaces data.sources")
    p.add_argument("--out", default="runs/train", help="output directory (default runs/train)")
    p.add_argument("--max-steps", type=positive_int, default=None)
    p.add_argument("--deepspeed", default=None, help="DeepSpeed JSON (configs/deepspeed/zero2.json or zero3.json)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    args = p.parse_args(argv)
    setup_logging()
    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"max_steps={args.max_steps}")
    cfg = load_config(TrainConfig, args.config, overrides)
    if args.data is not None:
        from fourm.training.data import DataSource

        cfg.data.sources = [DataSource(path=args.data)]
    if not cfg.data.sources:
        raise UsageError("no training data: pass --data or set data.sources in the config")
    for src in cfg.data.sources:
        if "://" not in src.path and not src.path.startswith("pipe:"):
            require_shards(src.path, "--data" if args.data is not None else "data.sources")
    if args.deepspeed is not None and not os.path.isfile(args.deepspeed):
        raise UsageError(f"--deepspeed {args.deepspeed} does not exist")
    if cfg.init_from and not os.path.isdir(cfg.init_from):
        raise UsageError(f"init_from {cfg.init_from} is not a directory")
    try:
        summary = train(cfg, args.out, deepspeed_config=args.deepspeed, resume=args.resume, progress=not args.quiet)
    except TrainingDiverged as exn:  # numerical faults: one line, exit 3 (2 is bad input, 1 a crash)
        if int(os.environ.get("RANK", "0")) == 0:
            sys.stderr.write(f"train.py: stopped: {exn}\n")
        return 3
    except (ValueError, FileNotFoundError) as exn:
        raise UsageError(str(exn)) from None
    if summary["last"]:
        log.info("done: %d steps, %d tokens, loss %.4f", summary["steps"], summary["tokens"], summary["last"]["loss"])
    return 0


if __name__ == "__main__":
    run(main)
