"""A training checkpoint -> a ``from_pretrained`` directory, in one process, whatever the world
size and engine that wrote it (``launch/consolidate.py``).

The weights come from the checkpoint itself: a single-process or DDP checkpoint's
``model.safetensors``, or DeepSpeed's own consolidation of a ZeRO-2/3 checkpoint's shards
(``deepspeed.utils.zero_to_fp32``, fp32 master weights, read with ``weights_only``). The model is
rebuilt as the run built it (its ``config.json`` and ``model_spec.json``, the token shards'
vocabulary), so the directory is what ``OUT/final`` would have been at that step; ``bf16`` rounds
the weights to bfloat16 (half the bytes; ``from_pretrained`` loads them into an fp32 model).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from fourm.training import checkpoint as ckpt

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def checkpoint_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The whole model's fp32 weights in ``checkpoint`` (a ``step-N`` directory)."""
    if (checkpoint / "ds").is_dir():
        if not torch.cuda.is_available():  # DeepSpeed's consolidation needs no GPU
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        from fourm.training.engine import weights_only_torch_load

        with weights_only_torch_load():
            return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint / "ds"), tag="state")
    return load_file(str(checkpoint / "model.safetensors"))


def consolidate(checkpoint: Path, out: Path, dtype: str = "fp32") -> None:
    """Write checkpoint ``checkpoint`` (``RUN/checkpoints/step-N``) as a ``from_pretrained``
    directory ``out`` in ``dtype`` (fp32 | bf16).

    Raises:
        ValueError: not a complete checkpoint of a fourm run, a LoRA run's (its adapter is
            ``RUN/final``), or weights that do not fit the run's model.
    """
    from fourm.config import load_config
    from fourm.training.data import manifest_context
    from fourm.training.loop import TrainConfig, _model, token_manifest
    from fourm.weights import load_fitting

    run = checkpoint.parent.parent
    if not ckpt.is_complete(checkpoint) or not (run / "config.json").is_file():
        raise ValueError(f"{checkpoint} is not a complete checkpoint of a training run (RUN/checkpoints/step-N with RUN/config.json)")
    cfg = load_config(TrainConfig, json.loads((run / "config.json").read_text()))
    if cfg.lora.enabled:
        raise ValueError(f"{run} trained LoRA adapters: its adapter is {run / 'final'} (launch/merge_lora.py merges it into its base)")
    manifest = token_manifest(cfg)
    vocab = manifest_context(manifest)[0]
    model = _model(cfg, run, vocab, True, None)[0]
    load_fitting(model, checkpoint_weights(checkpoint), f"checkpoint {checkpoint} does not fit the run's model")
    model.to(DTYPES[dtype])
    tmp = out.parent / f".tmp-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    ckpt.write_model_dir(model, tmp, out, vocab, manifest.get("tokenizers"))
    log.info("%s (step %d) written to %s in %s", checkpoint, ckpt.read_state(checkpoint)["step"], out, dtype)
