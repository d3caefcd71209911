#!/usr/bin/env python
"""Consolidate a training checkpoint into a from_pretrained directory for inference.

    python launch/consolidate.py --checkpoint RUN/checkpoints/step-00001000 --out DIR [--dtype fp32|bf16]
    python launch/consolidate.py --checkpoint RUN --out DIR          # the run's newest complete checkpoint

Works in one process on any machine, whatever world size and engine wrote the checkpoint (single
process, DDP, DeepSpeed ZeRO-2/3: DeepSpeed's own zero_to_fp32 gathers the shards). DIR loads
with fourm.load_model / from_pretrained and names the run's tokenizer set (tokenizers.json).

Exit status: 0 done; 2 bad input (one line on stderr); 1 anything else.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from fourm.cli import ArgumentParser, UsageError, run, setup_logging

log = logging.getLogger("consolidate")


def main(argv=None) -> int:
    p = ArgumentParser(prog="consolidate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="RUN/checkpoints/step-N, or RUN for its newest complete checkpoint")
    p.add_argument("--out", required=True, help="the from_pretrained directory to write (new or empty)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weights in fp32 (default) or rounded to bf16")
    args = p.parse_args(argv)
    setup_logging()
    from fourm.training.checkpoint import latest_checkpoint
    from fourm.training.consolidate import consolidate

    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_dir():
        raise UsageError(f"--checkpoint {checkpoint} is not a directory")
    if (checkpoint / "checkpoints").is_dir():
        found = latest_checkpoint(checkpoint)
        if found is None:
            raise UsageError(f"--checkpoint {checkpoint} holds no complete checkpoint")
        checkpoint = found
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out} is not empty")
    try:
        consolidate(checkpoint, out, args.dtype)
    except (ValueError, FileNotFoundError) as exn:
        raise UsageError(str(exn)) from None
    return 0


if __name__ == "__main__":
    run(main)
