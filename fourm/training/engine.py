"""Engines: one place where distribution and precision are applied to a single-device model.

- ``single``: one process.
- ``ddp``: torch DistributedDataParallel under ``torchrun`` (gloo on CPU, NCCL on CUDA).
- ``deepspeed``: ZeRO-2/3 from a JSON config (``configs/deepspeed/``); on CPU it needs
  ``DS_ACCELERATOR=cpu`` (set here when no CUDA device is present) and uses gloo.

Order, fixed: activation checkpointing -> torch.compile -> distribution wrapper. Precision: bf16
autocast around the forward on CPU and CUDA (DeepSpeed's own bf16 section on CUDA), where timing
the real step both ways says it pays (``Engine.choose_precision``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from fourm.config import output_path
from fourm.precision import PrecisionChoice, autocast_dtype, autocast_for, choose_autocast
from fourm.training.checkpoint import optimizer_from_files, optimizer_to_files
from fourm.weights import load_fitting

log = logging.getLogger(__name__)


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's environment."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def init_distributed(use_deepspeed: bool) -> tuple[int, int]:
    """Start the process group when launched with several ranks; returns (rank, world). Whoever
    calls this when no group exists ends it with ``end_distributed``."""
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


def end_distributed(completed: bool, use_deepspeed: bool) -> None:
    """Close the process group: after a barrier when every rank ``completed`` (a failed rank's
    peers would wait there forever), so no rank tears its group down under another's last
    collective. Left open, the group's communication threads end during the interpreter's own
    shutdown instead, which aborted a finished two-rank DeepSpeed run once in CI ("terminate called
    without an active exception", SIGABRT after "done")."""
    if not dist.is_initialized():
        return
    if completed:
        dist.barrier()
    if use_deepspeed:  # also drops DeepSpeed's references to its groups
        import deepspeed.comm

        deepspeed.comm.destroy_process_group()
    else:
        dist.destroy_process_group()
    log.debug("process group closed")


def _apply_activation_checkpointing(model: torch.nn.Module) -> None:
    from torch.utils.checkpoint import checkpoint

    for blocks in ("blocks", "encoder", "decoder"):
        for block in getattr(model, blocks, []) or []:
            forward = block.forward
            block.forward = lambda *a, _f=forward, **k: checkpoint(_f, *a, use_reentrant=False, **k)


# DeepSpeed config keys naming where DeepSpeed writes: kept inside the run directory
DS_OUTPUT_PATHS = (
    ("tensorboard", "output_path"), ("tensorboard", "job_name"), ("csv_monitor", "output_path"), ("csv_monitor", "job_name"),
    ("flops_profiler", "output_file"), ("autotuning", "results_dir"), ("autotuning", "exps_dir"),
    ("zero_optimization", "offload_param", "nvme_path"), ("zero_optimization", "offload_optimizer", "nvme_path"),
)


def _confine_output_paths(cfg: dict, run_dir: Path | None) -> None:
    """Reject DeepSpeed output paths that are absolute or climb out (``..``); make the others
    relative to ``run_dir``. An enabled monitor without ``output_path`` writes to ``run_dir/deepspeed``
    (DeepSpeed's default would be the working directory)."""
    for section in ("tensorboard", "csv_monitor"):
        monitor = cfg.get(section)
        if isinstance(monitor, dict) and monitor.get("enabled") and not monitor.get("output_path"):
            monitor["output_path"] = "deepspeed"
    for keys in DS_OUTPUT_PATHS:
        parent = cfg
        for key in keys[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else None
        if not isinstance(parent, dict) or parent.get(keys[-1]) in (None, ""):
            continue
        where = output_path(run_dir or ".", parent[keys[-1]], "deepspeed config " + ".".join(keys))
        if run_dir is not None and keys[-1] != "job_name":  # a job name is a folder under output_path
            parent[keys[-1]] = str(where)


def load_deepspeed_config(path: str, micro_batch: int, grad_accum: int, grad_clip: float, run_dir: Path | None = None) -> dict:
    """Read a DeepSpeed JSON and fill what the training config decides ("auto" or absent); output
    paths in it are confined to ``run_dir`` (see ``_confine_output_paths``)."""
    with open(path) as f:
        cfg = json.load(f)
    _confine_output_paths(cfg, run_dir)
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


@contextlib.contextmanager
def weights_only_torch_load():
    """Every ``torch.load`` inside (DeepSpeed's, which asks for ``weights_only=False``) runs with
    ``weights_only=True``: tensors, containers and the few DeepSpeed classes its ZeRO-2/3 checkpoints
    hold (plain data); a file that needs anything else is refused instead of running its code."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    saved = {k: os.environ.pop(k, None) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals([ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]):
            yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value


class Engine:
    """Wraps model + optimizer for the chosen distribution; the loop talks only to this."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, kind: str, bf16: bool = True, compile: bool = False, activation_checkpointing: bool = False, deepspeed_config: dict | None = None):
        self.kind = kind
        self.rank, self.world, local = dist_env()
        self.device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
        self.bf16 = bf16
        # DeepSpeed's partitioned parameters run only inside its engine: there the matmul probe
        # decides; the other engines time the real step (``choose_precision``, which the loop calls)
        self.autocast_dtype = autocast_dtype(self.device.type, bf16) if kind == "deepspeed" else None
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

    def parameter_bytes(self, whole: bool = False) -> int:
        """Bytes of model parameters this rank holds (its ZeRO-3 partition under stage 3), or with
        ``whole`` those of the whole model (what one rank alone would hold)."""
        if whole:
            return sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in self.module.parameters())
        return sum((p.ds_tensor if hasattr(p, "ds_tensor") else p).numel() * p.element_size() for p in self.module.parameters())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        return autocast_for(self.device.type, self.autocast_dtype)

    def choose_precision(self, workload: str, step: Callable[[torch.dtype | None], object]) -> PrecisionChoice | None:
        """Set the autocast dtype by timing ``step(dtype)`` (a forward + backward of the real batch,
        ``fourm.precision.choose_autocast``); under torch.distributed rank 0's choice holds on every
        rank. None under DeepSpeed, whose choice was made at construction."""
        if self.kind == "deepspeed":
            return None
        choice = choose_autocast(self.device.type, self.bf16, workload, step)
        dtype = choice.dtype
        if dist.is_initialized():  # ranks timing alike may still disagree by a hair: one choice for all
            flag = torch.tensor([int(dtype is torch.bfloat16)], device=self.device if dist.get_backend() == "nccl" else "cpu")
            dist.broadcast(flag, src=0)
            dtype = torch.bfloat16 if int(flag) else None
        self.autocast_dtype = dtype
        return choice

    def forward(self, batch: dict):
        batch = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        with self.autocast():
            return self.runnable(**batch)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:  # ``lr_scale``: a group's own ratio (Muon's)
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def backward(self, loss: torch.Tensor, grad_accum: int) -> None:
        if self.ds is not None:
            self.ds.backward(loss)
        else:
            (loss / grad_accum).backward()

    def step(self, grad_clip: float, boundary: bool, finite_loss: bool = True) -> bool | None:
        """Optimizer step at an accumulation boundary; returns whether it was applied there (None
        between boundaries).

        A non-finite gradient norm, or ``finite_loss`` False on any rank, skips the update and
        clears the gradients. Under DeepSpeed the decision is DeepSpeed's own (ZeRO-2/3 skip a step
        whose gradient norm is not finite, on every rank alike).
        """
        if self.ds is not None:
            self.ds.step()  # DeepSpeed counts micro-steps and clips itself
            return self.ds.was_step_applied() if boundary else None
        if not boundary:
            return None
        params = [p for p in self.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(())
        ok = torch.tensor([float(finite_loss and bool(torch.isfinite(norm)))])
        if dist.is_initialized():  # gradients agree across ranks after DDP's all-reduce; losses may not
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        applied = bool(ok)
        if applied:
            if grad_clip > 0:
                torch.nn.utils.clip_grads_with_norm_(params, grad_clip, norm)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return applied

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

    def load(self, directory: Path, universal: bool = False) -> None:
        """Weights and optimizer state from a checkpoint; ValueError (naming the first difference)
        when its tensors do not fit this model. ``universal``: through DeepSpeed's universal form
        of it (``reshard.universal_checkpoint``; the engine was built with ``load_universal``)."""
        hint = "resume with the model config the run started with"
        if self.ds is None:
            load_fitting(self.module, load_file(str(directory / "model.safetensors"), device=str(self.device)), f"checkpoint {directory} does not fit the model", hint=hint)
            optimizer_from_files(self.optimizer, directory)
            return
        try:
            with weights_only_torch_load():
                self.ds.load_checkpoint(str(directory / "ds"), tag="state_universal" if universal else "state", load_module_strict=True, load_optimizer_states=True, load_lr_scheduler_states=False)
        except RuntimeError as exn:  # DeepSpeed's own loading: its error text is all there is to go by
            lines = [line.strip() for line in str(exn).splitlines() if line.strip()]
            if not lines or "state_dict" not in lines[0]:
                raise
            raise ValueError(f"checkpoint {directory} does not fit the model ({lines[1] if len(lines) > 1 else lines[0]}): {hint}") from None

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
