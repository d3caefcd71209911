#!/usr/bin/env python
"""Same-budget comparisons on the demo's data: the any-to-any model against a specialist of the
same size trained only on rgb -> depth (the 4M paper's question), and the encoder-decoder against
the decoder-only architecture.

    python eval/compare.py --demo runs/demo --minutes 8 --json OUT [--arms encdec,specialist,decoder]

Each arm trains from scratch for the same wall-clock minutes on ``DEMO/tokens/train`` and is
evaluated by the suite on ``DEMO/data/val`` (floors from ``DEMO/data/train``).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from fourm.cli import ArgumentParser, UsageError, markdown_table, positive_int, run, setup_logging, write_json

log = logging.getLogger("compare")
REPO = Path(__file__).resolve().parent.parent
ARMS = {
    "encdec": ("configs/train/tiny_encdec.yaml", "configs/models/encdec_tiny.yaml", None),
    "specialist": ("configs/train/tiny_specialist_depth.yaml", "configs/models/encdec_tiny.yaml", ("rgb_to_depth",)),
    "decoder": ("configs/train/tiny_decoder.yaml", "configs/models/decoder_tiny.yaml", None),
}


def main(argv=None) -> int:
    p = ArgumentParser(prog="compare.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", required=True, help="a make-demo output directory (tokens/, data/, tokenizers/)")
    p.add_argument("--minutes", type=float, default=8.0, help="training minutes per arm")
    p.add_argument("--arms", default="encdec,specialist,decoder")
    p.add_argument("--scenes", type=positive_int, default=64)
    p.add_argument("--json", required=True)
    p.add_argument("--out", default=None, help="where the arms' runs go (default DEMO/compare)")
    args = p.parse_args(argv)
    setup_logging()
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in arms if a not in ARMS]
    if bad or not arms:
        raise UsageError(f"unknown arm(s) {bad}; known: {', '.join(ARMS)}")
    if args.minutes <= 0:
        raise UsageError("--minutes must be > 0")
    demo = Path(args.demo)
    for need in ("tokens/train", "data/val", "data/train", "tokenizers"):
        if not (demo / need).exists():
            raise UsageError(f"--demo {demo}: missing {demo / need} (run make demo first)")
    from fourm.config import load_config
    from fourm.eval.judge import JudgeConfig, load_or_train_segmenter
    from fourm.eval.suite import EvalConfig, evaluate
    from fourm.generation.files import open_model
    from fourm.training.data import DataSource
    from fourm.training.loop import TrainConfig, train

    from fourm.tokenizers.tokenizer_set import TokenizerSet

    judge = load_or_train_segmenter(demo / "judge" / "segmenter.safetensors", demo / "data" / "train", JudgeConfig(), tokenizers=TokenizerSet.from_pretrained(demo / "tokenizers"))
    out = Path(args.out) if args.out else demo / "compare"
    results = {}
    for arm in arms:
        cfg_path, preset, directions = ARMS[arm]
        cfg = load_config(TrainConfig, REPO / cfg_path, [f"max_minutes={args.minutes}", "max_steps=1000000", f"model_preset={REPO / preset}"])
        cfg.data.sources = [DataSource(path=str(demo / "tokens" / "train"))]
        start = time.perf_counter()
        summary = train(cfg, out / arm, resume=False)
        model, tok = open_model(out / arm / "final", demo / "tokenizers")
        report, _ = evaluate(model, tok, demo / "data" / "val", EvalConfig(scenes=args.scenes, **({"directions": directions} if directions else {})), train_dir=demo / "data" / "train", judge=judge)
        results[arm] = {"steps": summary["steps"], "tokens": summary["tokens"], "train_seconds": round(time.perf_counter() - start, 1), "model": report["model"], "floor": report["floor"]}
        log.info("%s: %s", arm, json.dumps(report["model"].get("rgb_to_depth")))
    write_json(args.json, {"minutes": args.minutes, "arms": results})
    rows = []
    for arm, r in results.items():
        m = r["model"]
        get = lambda d, k: f"{m[d][k]:.3f}" if d in m else "-"  # noqa: E731
        rows.append([arm, str(r["steps"]), get("rgb_to_depth", "delta1"), get("rgb_to_depth", "abs_rel"), get("rgb_to_semseg", "miou"), get("rgb_to_boxes", "map50"), get("rgb_to_caption", "f1"), get("caption_to_rgb", "accuracy")])
    print(markdown_table(["arm", "steps", "depth δ1", "depth AbsRel", "semseg mIoU", "boxes mAP@0.5", "caption F1", "caption→rgb acc."], rows))
    return 0


if __name__ == "__main__":
    run(main)
