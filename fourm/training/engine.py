"""Engines: one place where distribution and precision are applied to a single-device model.

- ``single``: one process.
- ``ddp``: torch DistributedDataParallel under ``torchrun`` (gloo on CPU, NCCL on CUDA).
- ``deepspeed``: ZeRO-2/3 from a JSON config (``configs/deepspeed/``); on CPU it needs
  ``DS_ACCELERATOR=cpu`` (set here when no CUDA device is present) and uses gloo.

Order, fixed: activation checkpointing -> torch.compile -> distribution wrapper. Precision: bf16
autocast around the forward on CPU and CUDA (DeepSpeed's own bf16 section on CUDA).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from fourm.precision import autocast_dtype
from fourm.training.checkpoint import optimizer_from_files, optimizer_to_files

log = logging.getLogger(__name__)


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's environment."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def init_distributed(use_deepspeed: bool) -> tuple[int, int]:
    """Start the process group when launched with several ranks; returns (rank, world)."""
    rank, world, local = dist_env()
    if world > 1 and not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local)
        backend = "nccl" if cuda else "gloo"
        if use_deepspeed:
            import deepspeed

            deepspeed.init_distributed(dist_backend=backend)
        else:
            dist.init_process_group(backend=backend)
    return rank, world


def _apply_activation_checkpointing(model: torch.nn.Module) -> None:
    from torch.utils.checkpoint import checkpoint

    for blocks in ("blocks", "encoder", "decoder"):
        for block in getattr(model, blocks, []) or []:
            forward = block.forward
            block.forward = lambda *a, _f=forward, **k: checkpoint(_f, *a, use_reentrant=False, **k)


def load_deepspeed_config(path: str, micro_batch: int, grad_accum: int, grad_clip: float) -> dict:
    """Read a DeepSpeed JSON and fill what the training config decides ("auto" or absent)."""
    with open(path) as f:
        cfg = json.load(f)
    cfg["train_micro_batch_size_per_gpu"] = micro_batch
    cfg["gradient_accumulation_steps"] = grad_accum
    cfg.setdefault("gradient_clipping", grad_clip)
    if cfg["gradient_clipping"] == "auto":
        cfg["gradient_clipping"] = grad_clip
    cfg.pop("train_batch_size", None)
    cfg["zero_allow_untested_optimizer"] = True
    if not torch.cuda.is_available():  # CPU: fp32 master weights, bf16 via autocast
        cfg["bf16"] = {"enabled": False}
        cfg["fp16"] = {"enabled": False}
    return cfg


class Engine:
    """Wraps model + optimizer for the chosen distribution; the loop talks only to this."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, kind: str, bf16: bool = True, compile: bool = False, activation_checkpointing: bool = False, deepspeed_config: dict | None = None):
        self.kind = kind
        self.rank, self.world, local = dist_env()
        self.device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
        self.autocast_dtype = autocast_dtype(self.device.type, bf16)
        self.module = model.to(self.device)
        if activation_checkpointing:
            _apply_activation_checkpointing(self.module)
        runnable: torch.nn.Module = torch.compile(self.module) if compile else self.module
        self.optimizer = optimizer
        self.ds = None
        if kind == "deepspeed":
            import deepspeed

            self.ds, self.optimizer, _, _ = deepspeed.initialize(model=runnable, optimizer=optimizer, config=deepspeed_config)
            self.runnable = self.ds
        elif kind == "ddp":
            self.runnable = torch.nn.parallel.DistributedDataParallel(runnable, device_ids=[local] if self.device.type == "cuda" else None)
        else:
            self.runnable = runnable
        self.zero_stage = int((deepspeed_config or {}).get("zero_optimization", {}).get("stage", 0)) if kind == "deepspeed" else 0

    def parameter_bytes(self) -> int:
        """Bytes of model parameters this rank holds (its ZeRO-3 partition under stage 3)."""
        return sum((p.ds_tensor if hasattr(p, "ds_tensor") else p).numel() * p.element_size() for p in self.module.parameters())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def forward(self, batch: dict):
        batch = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        with self.autocast():
            return self.runnable(**batch)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def backward(self, loss: torch.Tensor, grad_accum: int) -> None:
        if self.ds is not None:
            self.ds.backward(loss)
        else:
            (loss / grad_accum).backward()

    def step(self, grad_clip: float, boundary: bool) -> float | None:
        """Optimizer step at an accumulation boundary; returns the gradient norm there."""
        if self.ds is not None:
            self.ds.step()  # DeepSpeed counts micro-steps and clips itself
            return None
        if not boundary:
            return None
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), grad_clip) if grad_clip > 0 else None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm) if norm is not None else None

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    # -- checkpoints ------------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        """Model and optimizer into ``directory`` (every rank calls this)."""
        if self.ds is not None:
            self.ds.save_checkpoint(str(directory / "ds"), tag="state")
            return
        if self.is_main:
            save_file({k: v.detach().contiguous() for k, v in self.module.state_dict().items()}, str(directory / "model.safetensors"))
            optimizer_to_files(self.optimizer, directory)

    def load(self, directory: Path) -> None:
        if self.ds is not None:
            self.ds.load_checkpoint(str(directory / "ds"), tag="state", load_module_strict=True, load_optimizer_states=True, load_lr_scheduler_states=False)
            return
        self.module.load_state_dict(load_file(str(directory / "model.safetensors"), device=str(self.device)))
        optimizer_from_files(self.optimizer, directory)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole model's weights on rank 0 (gathered from ZeRO-3 shards), None elsewhere."""
        if self.ds is not None and self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
                state = {k: v.detach().clone().cpu() for k, v in self.module.state_dict().items()} if self.is_main else None
            return state
        if not self.is_main:
            return None
        return {k: v.detach().clone().cpu() for k, v in self.module.state_dict().items()}
