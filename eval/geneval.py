#!/usr/bin/env python
"""The GenEval-style text -> image benchmark on the rendered scenes (``fourm.eval.geneval``).

    python eval/geneval.py --model DIR --judge SEGMENTER.safetensors [--tokenizers DIR]
        [--prompts 64] [--seed 0] [--tasks single_object,...] [--steps 8] [--cfg-scale 200]
        [--choice-temperature 4.5] [--schedule linear] [--temperature 1] [--top-k 0] [--gen-seed 0]
        [--batch-size 16] [--json OUT] [--grid OUT.png]

Six tasks (single object, two objects, counting, colours, position, colour attribution), --prompts
prompts a task, one generated image a prompt; per task the model's score beside the judge on the
true images, the floor (true images of other prompts) and the ceiling (the rgb tokenizer's round
trips of the true images). Without --model: the judge on true images, floor and ceiling only
(--tokenizers then names the tokenizer set); without --judge, only what the renderer's own
segmentation can judge (true images, floor, ceiling).
"""

from __future__ import annotations

import logging
from pathlib import Path

from fourm.cli import ArgumentParser, UsageError, non_negative_float, non_negative_int, positive_int, run, setup_logging, write_json

log = logging.getLogger("geneval")


def main(argv=None) -> int:
    from fourm.eval.geneval import TASKS
    from fourm.generation.sampling import TEXT_TO_IMAGE

    p = ArgumentParser(prog="geneval.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a from_pretrained model directory (omit: judge, floor and ceiling only)")
    p.add_argument("--tokenizers", default=None, help="tokenizer set (default: the one recorded with the model)")
    p.add_argument("--judge", default=None, help="the judge's segmenter (.safetensors, eval/evaluate.py or make demo trains one)")
    p.add_argument("--prompts", type=positive_int, default=64, help="prompts a task (default 64)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="the prompt set's seed (default 0)")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    d = TEXT_TO_IMAGE  # the evaluation suite's caption -> rgb sampling
    p.add_argument("--steps", type=positive_int, default=d["steps"], help=f"MaskGIT steps (default {d['steps']})")
    p.add_argument("--cfg-scale", type=non_negative_float, default=d["cfg_scale"], help=f"classifier-free guidance scale (0: none; default {d['cfg_scale']:g})")
    p.add_argument("--choice-temperature", type=non_negative_float, default=d["choice_temperature"], help=f"Gumbel noise on MaskGIT's choice of tokens to fix (0: by confidence; default {d['choice_temperature']:g})")
    p.add_argument("--schedule", choices=["cosine", "linear"], default=d["schedule"], help=f"MaskGIT unmasking schedule (default {d['schedule']})")
    p.add_argument("--temperature", type=non_negative_float, default=d["temperature"], help=f"sampling temperature (0: greedy; default {d['temperature']:g})")
    p.add_argument("--top-k", type=non_negative_int, default=d["top_k"], help=f"top-k (0: all ids; default {d['top_k']})")
    p.add_argument("--gen-seed", type=non_negative_int, default=0, help="the sampling seed (default 0)")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--json", default=None, help="write every figure and each prompt's verdict here")
    p.add_argument("--grid", default=None, help="write the pass/fail picture here (.png)")
    p.add_argument("--grid-prompts", type=positive_int, default=8, help="prompts a task in the picture (default 8)")
    args = p.parse_args(argv)
    setup_logging()
    from PIL import Image

    from fourm.eval.geneval import GenevalConfig, generate_images, grid_picture, make_prompts, markdown, run_geneval, true_images

    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise UsageError(f"--tasks: unknown {', '.join(repr(t) for t in unknown) or 'empty list'}; known: {', '.join(TASKS)}")
    if args.grid and Path(args.grid).suffix.lower() != ".png":
        raise UsageError(f"--grid {args.grid}: expected a .png path")
    if args.model is None and args.tokenizers is None and args.judge is None:
        raise UsageError("nothing to measure: give --model (and --judge), or --judge and/or --tokenizers for the judge's and the tokenizer's figures")
    model, tokenizers = None, None
    try:
        if args.model is not None:
            from fourm.generation.files import open_model

            model, tokenizers = open_model(args.model, args.tokenizers)
        elif args.tokenizers is not None:
            from fourm.tokenizers.tokenizer_set import TokenizerSet

            tokenizers = TokenizerSet.from_pretrained(args.tokenizers)
    except (OSError, ValueError) as exn:
        raise UsageError(str(exn)) from None
    if tokenizers is not None and "rgb" not in tokenizers.images:
        raise UsageError(f"the tokenizer set has no rgb tokenizer (it has: {', '.join(tokenizers.modalities)})")
    segmenter = None
    if args.judge is not None:
        from safetensors import SafetensorError

        from fourm.eval.judge import load_segmenter

        if not Path(args.judge).is_file():
            raise UsageError(f"--judge {args.judge}: no such file")
        try:
            segmenter = load_segmenter(args.judge)
        except (OSError, ValueError, SafetensorError) as exn:  # another format, or not a safetensors file
            raise UsageError(f"--judge {args.judge}: {exn}") from None
    elif model is not None:
        log.warning("no --judge: the model's images cannot be judged; reporting what the renderer's segmentation can")

    res = tokenizers.resolution if tokenizers is not None else 64
    prompts = make_prompts(GenevalConfig(prompts=args.prompts, seed=args.seed, res=res, tasks=tasks), progress=True)
    log.info("%d prompts (%d a task) at %d px", len(prompts), args.prompts, res)
    generated = None
    if model is not None and segmenter is not None:
        from fourm.generation.api import text_to_image_config

        gen = text_to_image_config(steps=args.steps, cfg_scale=args.cfg_scale, choice_temperature=args.choice_temperature, schedule=args.schedule, temperature=args.temperature, top_k=args.top_k, seed=args.gen_seed)
        generated = generate_images(model, tokenizers, prompts, gen, args.batch_size, progress=True)
    result = run_geneval(prompts, segmenter, tokenizers, generated)
    table = markdown(result.figures)
    print(table)
    if args.json:
        settings = {k: getattr(args, k) for k in ("model", "tokenizers", "judge", "prompts", "seed", "steps", "cfg_scale", "choice_temperature", "schedule", "temperature", "top_k", "gen_seed")}
        per_prompt = [{"prompt": q.prompt, **q.spec.to_json(), **{part: {"passed": v[i].passed, "reading": v[i].reading} for part, v in result.verdicts.items()}} for i, q in enumerate(prompts)]
        write_json(args.json, {"settings": settings, "figures": result.figures, "prompts": per_prompt})
        log.info("wrote %s", args.json)
    if args.grid:
        part = "model" if generated is not None else ("true_images" if segmenter is not None else "true_images_renderer")
        images = generated if generated is not None else true_images(prompts)[0]
        Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid_picture(prompts, images, result.verdicts[part], args.grid_prompts)).save(args.grid)
        log.info("wrote %s (%s)", args.grid, part.replace("_", " "))
    return 0


if __name__ == "__main__":
    run(main)
