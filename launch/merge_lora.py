#!/usr/bin/env python
"""Merge a LoRA adapter into its base model: a plain ``from_pretrained`` directory.

    python launch/merge_lora.py --model BASE --adapter ADAPTER --out DIR

The base is grown first when the adapter added modalities (its vocabulary extends the base's);
the merged model's logits equal the base + adapter ones (within float rounding). DIR gets
model.safetensors, config.json, vocab.json and tokenizers.json (the adapter's tokenizer set). It is
written under a temporary name and renamed at the end: a failure leaves nothing behind.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from fourm.cli import ArgumentParser, UsageError, run, setup_logging
from fourm.models.build import save_pretrained
from fourm.models.lora import load_adapters

log = logging.getLogger("merge_lora")


def main(argv=None) -> int:
    p = ArgumentParser(prog="merge_lora.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the base model directory the adapter was trained on")
    p.add_argument("--adapter", required=True, help="an adapter directory (a LoRA run's OUT/final)")
    p.add_argument("--out", required=True, help="output directory for the merged model (must not exist or be empty)")
    args = p.parse_args(argv)
    setup_logging()
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out} exists and is not an empty directory")
    try:
        model, vocab = load_adapters(args.model, [args.adapter])
    except (OSError, ValueError) as exn:
        raise UsageError(str(exn)) from None
    merged = model.merge_and_unload()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        save_pretrained(merged, tmp, vocab=vocab)
        shutil.copy(Path(args.adapter) / "tokenizers.json", tmp / "tokenizers.json")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("merged %s + %s into %s", args.model, args.adapter, out)
    return 0


if __name__ == "__main__":
    run(main)
