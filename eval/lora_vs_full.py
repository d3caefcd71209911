#!/usr/bin/env python
"""LoRA against full fine-tuning on a new modality, same steps: quality, memory, time, size.

    python eval/lora_vs_full.py --base MODEL --tokens TOKENS --val RAW_VAL --train RAW_TRAIN --tokenizers SET
                                --json OUT [--steps 300] [--config configs/train/lora_normals.yaml] [--out DIR]

Both arms start from the same pretrained ``--base``, train for ``--steps`` on ``--tokens`` (token
shards from a tokenizer set grown with the new modality) with the config's objective, each in its
own process (so peak memory is each arm's own): ``lora`` as configured, ``full`` with
``lora.enabled=false`` (every weight trains; ``--full-lr``). Then both are evaluated by the suite on
the direction the config trains (``rgb_to_normals`` for the default config), and the adapter is
switched off to check that the base's outputs on an original task (rgb -> depth) are unchanged.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from fourm.cli import ArgumentParser, UsageError, markdown_table, positive_int, run, setup_logging, write_json

log = logging.getLogger("lora_vs_full")
REPO = Path(__file__).resolve().parent.parent


def _train(config: str, tokens: Path, out: Path, steps: int, overrides: list[str]) -> dict:
    """One arm in its own process; returns its summary.json."""
    if (out / "summary.json").is_file() and json.loads((out / "summary.json").read_text()).get("steps") == steps:
        log.info("%s is done already; reusing it", out)
        return json.loads((out / "summary.json").read_text())
    cmd = [sys.executable, str(REPO / "launch/train.py"), "--config", config, "--data", str(tokens), "--out", str(out), "--max-steps", str(steps), "--quiet"]
    for item in overrides:
        cmd += ["--set", item]
    log.info("training %s", out.name)
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ))
    if proc.returncode:
        raise SystemExit(f"lora_vs_full.py: error: training {out.name} failed (exit {proc.returncode})")
    return json.loads((out / "summary.json").read_text())


def main(argv=None) -> int:
    p = ArgumentParser(prog="lora_vs_full.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="the pretrained model (a from_pretrained directory)")
    p.add_argument("--tokens", required=True, help="token shards of the grown tokenizer set (training)")
    p.add_argument("--val", required=True, help="raw held-out shards holding the new modality")
    p.add_argument("--train", required=True, help="raw training shards (the evaluation's floors)")
    p.add_argument("--tokenizers", required=True, help="the grown tokenizer set")
    p.add_argument("--config", default="configs/train/lora_normals.yaml")
    p.add_argument("--direction", default="rgb_to_normals", help="the suite direction the config trains")
    p.add_argument("--steps", type=positive_int, default=300)
    p.add_argument("--full-lr", type=float, default=1e-3, help="full fine-tuning's peak learning rate (LoRA's is the config's)")
    p.add_argument("--scenes", type=positive_int, default=64)
    p.add_argument("--out", default="runs/lora_vs_full")
    p.add_argument("--json", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="a training override for both arms")
    args = p.parse_args(argv)
    setup_logging()
    for flag in ("base", "tokens", "val", "train", "tokenizers"):
        if not Path(getattr(args, flag)).is_dir():
            raise UsageError(f"--{flag} {getattr(args, flag)} is not a directory")
    if not Path(args.config).is_file():
        raise UsageError(f"--config {args.config} does not exist")
    import torch

    from fourm.eval.suite import EvalConfig, evaluate
    from fourm.generation.files import open_model
    from fourm.models.build import load_model
    from fourm.models.lora import load_adapters
    from fourm.tokenizers.tokenizer_set import TokenizerSet

    try:
        EvalConfig(directions=(args.direction,))
    except ValueError as exn:
        raise UsageError(str(exn)) from None
    out = Path(args.out)
    common = [f"init_from={Path(args.base).resolve()}", *args.overrides]
    arms = {
        "lora": _train(args.config, Path(args.tokens), out / "lora", args.steps, common),
        "full": _train(args.config, Path(args.tokens), out / "full", args.steps, [*common, "lora.enabled=false", f"optim.lr={args.full_lr}"]),
    }
    eval_cfg = EvalConfig(scenes=args.scenes, directions=(args.direction,))
    results: dict = {"steps": args.steps, "direction": args.direction, "arms": {}}
    floor = None
    for arm, summary in arms.items():
        if arm == "lora":
            model, tok = open_model(args.base, args.tokenizers, adapter=out / "lora" / "final")
        else:
            model, tok = open_model(out / "full" / "final", args.tokenizers)
        report, _ = evaluate(model, tok, args.val, eval_cfg, train_dir=args.train)
        floor = report["floor"].get(args.direction)
        results["arms"][arm] = {
            "metrics": report["model"][args.direction],
            "trainable_parameters": summary["trainable_parameters"],
            "base_parameters": summary["base_parameters"],
            "seconds_per_step": summary["seconds_per_step"],
            "peak_rss_mb": summary["peak_rss_mb"],
            "final_loss": summary["last"].get("loss"),
        }
    results["floor"] = floor
    results["ceiling"] = report["ceiling"].get(args.direction)
    adapter_file = out / "lora" / "final" / "adapter_model.safetensors"
    results["adapter_bytes"] = adapter_file.stat().st_size
    results["full_model_bytes"] = (out / "full" / "final" / "model.safetensors").stat().st_size

    # the base with the adapter switched off, on an original task: the same predictions as the base
    base_model = load_model(args.base)
    base_tok = TokenizerSet.from_pretrained(args.tokenizers)
    check = EvalConfig(scenes=min(args.scenes, 16), directions=("rgb_to_depth",))
    _, base_out = evaluate(base_model, base_tok, args.val, check)
    adapted, _ = load_adapters(args.base, [out / "lora" / "final"])
    with adapted.disable_adapter(), torch.no_grad():
        _, off_out = evaluate(adapted.get_base_model(), base_tok, args.val, check)
    same = all(torch.equal(a, b) for a, b in zip(base_out["predictions"]["depth"], off_out["predictions"]["depth"]))
    results["adapter_off_depth_identical"] = bool(same)
    write_json(args.json, results)

    metric_keys = list(results["arms"]["lora"]["metrics"])
    rows = [[arm, f"{r['trainable_parameters']:,} ({100 * r['trainable_parameters'] / r['base_parameters']:.2f}%)", *(f"{r['metrics'][k]:.3f}" for k in metric_keys), f"{r['seconds_per_step']:.2f}", f"{r['peak_rss_mb']:.0f}"] for arm, r in results["arms"].items()]
    print(markdown_table(["arm", "trainable", *metric_keys, "s/step", "peak RSS MiB"], rows))
    print(f"adapter {results['adapter_bytes'] / 2**20:.2f} MiB vs full model {results['full_model_bytes'] / 2**20:.1f} MiB; base outputs with the adapter off identical: {same}")
    return 0


if __name__ == "__main__":
    run(main)
