"""The plan for scale: parameters, tokens per optimizer step and ZeRO-3 memory per GPU for a
training config (DeepSpeed's own estimator for the model states; activations are not included)."""

from __future__ import annotations

import os

import torch

from fourm.models.build import build_model, count_parameters
from fourm.training.loop import TrainConfig


def plan(cfg: TrainConfig, gpus_per_node: int, nodes: int, vocab_size: int, seq_len: int) -> dict:
    """Numbers for ``launch/plan.py`` (model built on the meta device: no memory)."""
    spec = {**cfg.model_spec(), "vocab_size": vocab_size}
    spec.setdefault("modalities", ["rgb", "depth", "semseg", "boxes", "caption"])  # the encoder-decoder's and a per-modality softmax's need them
    with torch.device("meta"):
        model = build_model(spec)
    total = count_parameters(model)
    largest = max(p.numel() for p in model.parameters())
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    gpus = gpus_per_node * nodes
    rows = {}
    for offload, label in ((False, "no offload"), (True, "optimizer+params offloaded to CPU")):
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, num_gpus_per_node=gpus_per_node, num_nodes=nodes, cpu_offload=offload, cpu_offload_params=offload)
        rows[label] = {"gpu_gib_per_gpu": gpu / 2**30, "cpu_gib_per_node": cpu / 2**30}
    tokens_per_step = cfg.data.batch_size * cfg.optim.grad_accum * gpus * seq_len
    return {
        "arch": model.config.arch,
        "parameters": total,
        "parameters_without_embeddings": count_parameters(model, exclude_embeddings=True),
        "gpus": gpus,
        "tokens_per_step": tokens_per_step,
        "steps_for_max_tokens": (cfg.max_tokens // tokens_per_step) if cfg.max_tokens else None,
        "zero3_model_states": rows,
    }
