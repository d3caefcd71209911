#!/usr/bin/env python
"""Does the model read its condition? Teacher-forced loss of each target given the scene's own
source modality against given another scene's (``fourm.eval.condition_gap``).

    python eval/condition_gap.py --model DIR --tokens DIR --json OUT [--source rgb]
        [--targets caption,boxes,depth,semseg] [--scenes 64] [--shift 1]

--tokens: held-out token shards made with the model's tokenizer set (``runs/demo/tokens/val``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from fourm.cli import ArgumentParser, UsageError, markdown_table, positive_int, run, setup_logging, write_json
from fourm.data.shards import require_shards

log = logging.getLogger("condition_gap")


def main(argv=None) -> int:
    p = ArgumentParser(prog="condition_gap.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a from_pretrained model directory")
    p.add_argument("--tokens", required=True, help="held-out token shards (a directory with a manifest)")
    p.add_argument("--json", required=True, help="write the figures here")
    p.add_argument("--source", default="rgb", help="the condition modality (default rgb)")
    p.add_argument("--targets", default="caption,boxes,depth,semseg", help="comma-separated target modalities")
    p.add_argument("--scenes", type=positive_int, default=64)
    p.add_argument("--shift", type=positive_int, default=1, help="'another scene' is the one this many places on (default 1)")
    args = p.parse_args(argv)
    setup_logging()
    from fourm.eval.condition_gap import condition_gap, read_token_samples
    from fourm.modalities import MODALITIES
    from fourm.training.shard_check import ShardMismatch, check_modality_held
    from fourm.models.grow import load_for_vocab
    from fourm.training.data import manifest_context

    require_shards(args.tokens, "--tokens")
    try:
        manifest = json.loads((Path(args.tokens) / "manifest.json").read_text())
        vocab, grids, kinds = manifest_context(manifest)
    except (OSError, ValueError, KeyError) as exn:
        raise UsageError(f"--tokens {args.tokens}: no readable token-shard manifest ({type(exn).__name__}: {exn})") from None
    try:  # the model's modalities in the data's order (a manifest lists them sorted)
        model, model_vocab = load_for_vocab(args.model, vocab)
    except (OSError, ValueError) as exn:
        raise UsageError(f"--model {args.model} with --tokens {args.tokens}: {exn}") from None
    if model_vocab.size != vocab.size:  # a grown model's new rows are untrained: its gaps would mean nothing
        raise UsageError(f"--tokens {args.tokens} were made with another vocabulary ({vocab.size} ids) than the model's ({model_vocab.size})")
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if not targets or args.source in targets:
        raise UsageError(f"--targets: name at least one modality other than the source {args.source}")
    unknown = [m for m in [args.source, *targets] if m not in MODALITIES]
    if unknown:
        raise UsageError(f"--source/--targets: unknown modality {', '.join(unknown)} (fourm does not know it); known: {', '.join(MODALITIES)}")
    try:
        for flag, modality in [("--source", args.source), *(("--targets", t) for t in targets)]:
            check_modality_held(manifest, args.tokens, modality, f"{flag} asks for {modality!r}")
    except ShardMismatch as exn:
        raise UsageError(str(exn)) from None
    samples = read_token_samples(args.tokens, vocab, kinds, grids, args.scenes)
    report = {"model": args.model, "tokens": args.tokens, "source": args.source, "shift": args.shift, "targets": {}}
    for target in targets:
        try:
            report["targets"][target] = condition_gap(model, samples, vocab, grids, kinds, args.source, target, args.shift)
        except ValueError as exn:
            raise UsageError(str(exn)) from None
    write_json(args.json, report)
    rows = [[t, f"{r['own']:.4f}", f"{r['other']:.4f}", f"{r['gap']:.4f}", str(r["samples"])] for t, r in report["targets"].items()]
    print(markdown_table([f"{args.source} → target", "loss, own scene", "loss, another scene", "gap (nats/token)", "scenes"], rows))
    return 0


if __name__ == "__main__":
    run(main)
