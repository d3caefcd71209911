#!/usr/bin/env python
"""Export a decoder-only fourm model to a Hugging Face checkpoint directory.

    python launch/export_hf.py --model DIR --out HFDIR

QK-norm "none" exports as LlamaForCausalLM, "layernorm" as ChameleonForConditionalGeneration;
`transformers` loads HFDIR with from_pretrained. The vocabulary JSON is copied alongside.
"""

from __future__ import annotations

import logging
import os
import shutil

from fourm.cli import ArgumentParser, UsageError, run, setup_logging
from fourm.models.build import load_model
from fourm.models.hf import export_hf
from fourm.vocab import VOCAB_FILE

log = logging.getLogger("export_hf")


def main(argv=None) -> int:
    p = ArgumentParser(prog="export_hf.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a save_pretrained directory of a decoder-only model")
    p.add_argument("--out", required=True, help="output directory for the Hugging Face checkpoint")
    args = p.parse_args(argv)
    setup_logging()
    try:
        model = load_model(args.model)
    except (FileNotFoundError, ValueError) as exn:
        raise UsageError(str(exn)) from None
    if model.config.arch != "decoder":
        raise UsageError(f"{args.model} holds an {model.config.arch!r} model; only decoder-only models export to Hugging Face")
    if model.config.qk_norm not in ("none", "layernorm"):
        raise UsageError(f"qk_norm {model.config.qk_norm!r} has no Hugging Face counterpart (use 'none' for Llama or 'layernorm' for Chameleon)")
    if os.path.exists(args.out) and os.listdir(args.out):
        raise UsageError(f"--out {args.out} is not empty")
    export_hf(model, args.out)
    if os.path.isfile(os.path.join(args.model, VOCAB_FILE)):
        shutil.copy(os.path.join(args.model, VOCAB_FILE), os.path.join(args.out, "fourm_" + VOCAB_FILE))
    log.info("exported to %s", args.out)
    return 0


if __name__ == "__main__":
    run(main)
