#!/usr/bin/env python
"""The main job end to end on the embedded dataset (what `make demo` runs).

    python launch/demo.py [--out runs/demo] [--minutes 30] [--started-at EPOCH] [--config configs/demo.yaml] [--set key=value ...]

Finished stages are reused by a second run. Writes OUT/report.md, OUT/report.json, OUT/samples/.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from fourm.cli import ArgumentParser, UsageError, run, setup_logging
from fourm.config import load_config
from fourm.demo import DemoConfig, run_demo, scale_to_budget

log = logging.getLogger("demo")
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def main(argv=None) -> int:
    p = ArgumentParser(prog="demo.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--minutes", type=float, default=30.0, help="time budget; stages are scaled to it (default 30)")
    p.add_argument("--started-at", type=float, default=None, help="when the budget began, in seconds since the epoch (make demo passes its own start, so install counts; default now)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML overrides of the demo config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override one config key")
    args = p.parse_args(argv)
    setup_logging()
    if args.minutes <= 0:
        raise UsageError(f"--minutes must be positive, got {args.minutes}")
    if args.started_at is not None and not time.time() - 86400 <= args.started_at <= time.time() + 60:
        raise UsageError(f"--started-at {args.started_at:g}: expected seconds since the epoch within the last day (date +%s)")
    config = scale_to_budget(load_config(DemoConfig, args.config, args.overrides), args.minutes)
    run_demo(config, Path(args.out), args.started_at)
    log.info("summary written to %s", os.path.join(args.out, "report.md"))
    print(Path(args.out, "report.md").read_text())
    return 0


if __name__ == "__main__":
    run(main)
