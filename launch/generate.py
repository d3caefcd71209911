#!/usr/bin/env python
"""Any-to-any generation from a trained model.

    python launch/generate.py --model DIR --from rgb=photo.png [--from caption="a red cube left of a blue sphere"]
                              --to depth,semseg,boxes,caption --out DIR [--steps 8] [--cfg 0] [--temperature 1]
                              [--top-k 0] [--top-p 1] [--choice-temperature 0] [--schedule cosine] [--seed 0]
                              [--scheme auto] [--tokenizers DIR] [--adapter DIR]

Targets are generated in the order given; each finished target conditions the next (a chain such as
--to caption,semseg,depth,rgb). Writes depth.png + depth.npy, semseg.png + semseg_overlay.png,
boxes.png + boxes.json, caption.txt, rgb.png, normals.png, count.txt and overview.png into --out.
rgb drawn first from a caption alone takes the text -> image settings (sampling.TEXT_TO_IMAGE) for
every control not given on the command line.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fourm.cli import ArgumentParser, UsageError, non_negative_int, positive_int, run, setup_logging
from fourm.generation.api import GenerationConfig, generate, request_config
from fourm.generation.files import load_inputs, open_model, parse_from, save_outputs
from fourm.generation.sampling import TEXT_TO_IMAGE

log = logging.getLogger("generate")


def main(argv=None) -> int:
    p = ArgumentParser(prog="generate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a from_pretrained model directory (training's OUT/final)")
    p.add_argument("--from", dest="inputs", action="append", default=[], metavar="MODALITY=VALUE", help="an input: rgb=FILE, depth=FILE.npy|png, semseg=FILE.png, normals=FILE.png, boxes=FILE.json, caption=TEXT, count=TEXT")
    p.add_argument("--to", required=True, help="comma-separated targets, generated in this order")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--tokenizers", default=None, help="tokenizer set (default: the one recorded with the model, or with --adapter)")
    p.add_argument("--adapter", default=None, help="a LoRA adapter directory (launch/train.py with lora.enabled) applied to --model")
    t2i = ", ".join(f"{k} {v}" for k, v in TEXT_TO_IMAGE.items())
    p.add_argument("--steps", type=positive_int, default=None, help=f"MaskGIT/ROAR steps per image target (default {GenerationConfig.steps})")
    p.add_argument("--cfg", type=float, default=None, help=f"classifier-free guidance scale (default {GenerationConfig.cfg_scale:g}; 0: off)")
    p.add_argument("--choice-temperature", type=float, default=None, help=f"MaskGIT: Gumbel noise on the choice of tokens to fix, annealed to 0 (default {GenerationConfig.choice_temperature:g}; 0: by confidence)")
    p.add_argument("--schedule", default=None, choices=["cosine", "linear"], help=f"MaskGIT/ROAR unmasking schedule (default {GenerationConfig.schedule})")
    p.add_argument("--temperature", type=float, default=None, help=f"sampling temperature (default {GenerationConfig.temperature:g})")
    p.add_argument("--top-k", type=non_negative_int, default=None, help=f"top-k (default {GenerationConfig.top_k}; 0: all ids). rgb drawn first from a caption alone takes the text -> image settings for what is not given: {t2i}")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--scheme", default="auto", choices=["auto", "maskgit", "roar", "autoregressive"])
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights' dtype for inference (bfloat16: half the memory traffic)")
    p.add_argument("--compile", action="store_true", help="decoder-only: torch.compile the decoding step (a one-off ~50 s on 2 cores; pays off for long or many generations)")
    args = p.parse_args(argv)
    setup_logging()
    if (args.temperature or 0) < 0 or (args.cfg or 0) < 0 or (args.choice_temperature or 0) < 0 or not 0 < args.top_p <= 1:
        raise UsageError("need --temperature, --cfg, --choice-temperature >= 0 and 0 < --top-p <= 1")
    try:
        model, tokenizers = open_model(args.model, args.tokenizers, args.dtype, args.adapter)
    except (OSError, ValueError) as exn:
        raise UsageError(str(exn)) from None
    known = tokenizers.modalities
    targets = [t.strip() for t in args.to.split(",") if t.strip()]
    if not targets:
        raise UsageError("--to names no target")
    for t in targets:
        if t not in known:
            raise UsageError(f"unknown modality {t!r} in --to; known: {', '.join(known)}")
    spec = parse_from(args.inputs, known)
    overlap = set(spec) & set(targets)
    if overlap:
        raise UsageError(f"{', '.join(sorted(overlap))} is both an input and a target")
    inputs = load_inputs(spec, tokenizers.resolution)
    config = request_config(spec, targets, scheme=args.scheme, steps=args.steps, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, cfg_scale=args.cfg, choice_temperature=args.choice_temperature, schedule=args.schedule, seed=args.seed, compile=args.compile)
    if "rgb" in config.per_target:
        log.info("caption -> rgb with the text -> image settings: %s", ", ".join(f"{k} {v}" for k, v in config.for_target("rgb").__dict__.items() if k in TEXT_TO_IMAGE))
    try:
        result = generate(model, tokenizers, inputs, targets, config)
    except (KeyError, ValueError) as exn:
        raise UsageError(str(exn).strip("'\"")) from None
    written = save_outputs(Path(args.out), inputs, result.outputs)
    for path in written:
        log.info("wrote %s", path)
    if "caption" in result.outputs:
        print(result.outputs["caption"][0])
    return 0


if __name__ == "__main__":
    run(main)
