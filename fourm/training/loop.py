"""The training loop: one loop for every engine (single process, DDP, DeepSpeed ZeRO-2/3).

Run length by steps or tokens; AdamW, warm-up + cosine; gradient accumulation and clipping;
loss per modality (4M's mean over modalities, or per token); tqdm and ``metrics.jsonl`` on rank 0;
atomic checkpoints every N steps and at the end; ``resume`` continues from the newest checkpoint
as if never stopped; the final weights go to ``OUT/final/`` as a ``from_pretrained`` directory.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from tqdm import tqdm

from fourm.config import to_dict
from fourm.models.build import build_model, save_pretrained
from fourm.models.grow import load_for_vocab
from fourm.models.decoder import IGNORE_INDEX
from fourm.models.layers import z_loss
from fourm.objectives.mixture import ObjectiveConfig
from fourm.training import checkpoint as ckpt
from fourm.training.data import StreamConfig, TokenStream, make_loader, manifest_context
from fourm.training.engine import Engine, init_distributed, load_deepspeed_config
from fourm.training.lora import LoraSettings, apply_lora, save_adapter, trainable_parameters
from fourm.training.schedule import warmup_cosine
from fourm.vocab import SharedVocab

log = logging.getLogger(__name__)


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    grad_accum: int = 1


@dataclass
class TrainConfig:
    """A training run. ``model`` overrides the preset YAML named by ``model_preset``."""

    model_preset: str = "configs/models/encdec_tiny.yaml"
    model: dict[str, Any] = field(default_factory=dict)
    data: StreamConfig = field(default_factory=StreamConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    max_steps: int = 1000
    max_tokens: int = 0  # > 0: stop at this many input + target tokens (all ranks)
    max_minutes: float = 0.0  # > 0: stop after this long; the LR decay follows whichever limit is nearer
    log_every: int = 10
    ckpt_every: int = 100
    keep_checkpoints: int = 2
    bf16: bool = True
    compile: bool = False
    activation_checkpointing: bool = False
    loss_mode: str = "modality_mean"  # modality_mean | token
    seed: int = 0
    init_from: str = ""  # a from_pretrained directory to start from (grown when the data's vocabulary extends its)
    lora: LoraSettings = field(default_factory=LoraSettings)  # enabled: adapters on a frozen init_from
    manifest: str = ""  # token-shard manifest.json, when the data are only remote URLs

    def model_spec(self) -> dict:
        """The model config: the preset YAML with ``model`` on top."""
        base = {}
        if self.model_preset:
            with open(self.model_preset) as f:
                base = yaml.safe_load(f) or {}
        return {**base, **self.model}

    def __post_init__(self) -> None:
        if self.loss_mode not in ("modality_mean", "token"):
            raise ValueError(f"loss_mode must be 'modality_mean' or 'token', got {self.loss_mode!r}")
        if self.max_steps < 1:
            raise ValueError("max_steps must be >= 1")


def lr_at(step: int, cfg: OptimConfig, total: int, min_progress: float = 0.0) -> float:
    """Linear warm-up, then cosine from lr down to lr * min_lr_ratio at ``total``; the decay is at
    least ``min_progress`` along (a time budget that ends before ``total``)."""
    progress = max((step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps), min_progress)
    return warmup_cosine(step, progress, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)


def compute_loss(logits: torch.Tensor, labels: torch.Tensor, label_modality: torch.Tensor, shift: bool, mode: str, z_weight: float) -> tuple[torch.Tensor, dict[int, float]]:
    """Loss and per-modality mean cross-entropy (modality index -> value, for logging).

    ``shift``: decoder-only (logits at t predict labels at t + 1).
    """
    if shift:
        logits, labels, label_modality = logits[:, :-1], labels[:, 1:], label_modality[:, 1:]
    keep = labels != IGNORE_INDEX
    picked = logits[keep].float()
    ce = F.cross_entropy(picked, labels[keep], reduction="none")
    mods = label_modality[keep]
    per_mod = {int(m): ce[mods == m].mean() for m in torch.unique(mods)}
    loss = torch.stack(list(per_mod.values())).mean() if mode == "modality_mean" else ce.mean()
    if z_weight:
        loss = loss + z_loss(picked, z_weight)
    return loss, per_mod


def token_manifest(cfg: TrainConfig) -> dict:
    """The manifest of the run's token shards (``manifest:`` or the first source's)."""
    candidates = ([Path(cfg.manifest)] if cfg.manifest else []) + [Path(src.path) / "manifest.json" for src in cfg.data.sources]
    for path in candidates:
        if path.is_file():
            manifest = json.loads(path.read_text())
            if manifest.get("kind") != "tokens":
                raise ValueError(f"{path.parent} holds raw shards, not token shards: run data_pipelines/pretokenize.py first")
            return manifest
    raise ValueError("training data needs a token-shard directory with a manifest.json (from pretokenize.py), or `manifest:` naming one")


def _count_tokens(batch: dict) -> int:
    if "enc_valid" in batch:
        return int(batch["enc_valid"].sum()) + int(batch["dec_valid"].sum())
    return int(batch["attention_mask"].sum())


def train(cfg: TrainConfig, out: str | Path, deepspeed_config: str | None = None, resume: bool = False, progress: bool = True) -> dict:
    """Run training into ``out``; returns a summary (steps, tokens, last losses)."""
    out = Path(out)
    rank, world = init_distributed(deepspeed_config is not None)
    manifest = token_manifest(cfg)
    vocab, grids, kinds = manifest_context(manifest)

    torch.manual_seed(cfg.seed)
    base_vocab = vocab
    if cfg.lora.enabled and not cfg.init_from:
        raise ValueError("lora.enabled needs init_from (--set init_from=DIR): the pretrained model the adapters adapt")
    if cfg.init_from:
        model, base_vocab = load_for_vocab(cfg.init_from, vocab)
    else:
        model = build_model(cfg.model_spec(), vocab=vocab)
    arch = model.config.arch
    cfg.objective.validate(arch)
    if cfg.lora.enabled:
        if deepspeed_config and load_deepspeed_config(deepspeed_config, 1, 1, 0.0).get("zero_optimization", {}).get("stage", 0) == 3:
            raise ValueError("LoRA runs under DeepSpeed ZeRO-2 (or DDP); ZeRO-3 would shard the frozen base too, which adapters do not need: use configs/deepspeed/zero2.json")
        new_modalities = [i for i, m in enumerate(vocab.modalities) if m not in base_vocab.modalities]
        model = apply_lora(model, cfg.lora, range(base_vocab.size, vocab.size), new_modalities)
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2))
    kind = "deepspeed" if deepspeed_config else ("ddp" if world > 1 else "single")
    ds_cfg = load_deepspeed_config(deepspeed_config, cfg.data.batch_size, cfg.optim.grad_accum, cfg.optim.grad_clip) if deepspeed_config else None
    engine = Engine(model, optimizer, kind, bf16=cfg.bf16, compile=cfg.compile, activation_checkpointing=cfg.activation_checkpointing, deepspeed_config=ds_cfg)

    param_bytes = [engine.parameter_bytes()]
    if dist.is_initialized():
        param_bytes = [None] * world
        dist.all_gather_object(param_bytes, engine.parameter_bytes())
    if engine.is_main:
        log.info("parameters per rank: %s MB", ", ".join(f"{b / 2**20:.1f}" for b in param_bytes))
    step, tokens, batches = 0, 0, 0
    if resume:
        latest = ckpt.latest_checkpoint(out)
        if latest is not None:
            state = ckpt.read_state(latest)
            engine.load(latest)
            ckpt.load_rng(latest)
            step, tokens, batches = state["step"], state["tokens"], state["batches_per_rank"]
            if engine.is_main:
                log.info("resuming from %s (step %d)", latest, step)
        elif engine.is_main:
            log.info("--resume: no checkpoint in %s, starting fresh", out)
    if engine.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=1) + "\n")

    stream = TokenStream(cfg.data, arch, vocab, kinds, grids, cfg.objective, rank=rank, world=world, skip=batches)
    data = iter(make_loader(stream))
    names = list(vocab.modalities)
    metrics_file = open(out / "metrics.jsonl", "a") if engine.is_main else None
    board = _tensorboard(out) if engine.is_main else None
    bar = tqdm(total=cfg.max_steps, initial=step, desc=f"train {arch}", unit="step", disable=not (progress and engine.is_main))
    window_tokens, window_start = 0, time.perf_counter()
    last: dict = {}
    z_weight = getattr(model.config, "z_loss", 0.0)
    start_time = time.perf_counter()
    start_step = step

    def time_fraction() -> float:
        if not cfg.max_minutes:
            return 0.0
        frac = (time.perf_counter() - start_time) / (cfg.max_minutes * 60)
        if dist.is_initialized():  # every rank must stop at the same step
            t = torch.tensor([frac])
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            frac = float(t)
        return frac

    tf = time_fraction()  # measured once per step (a collective under torch.distributed)
    try:
        while step < cfg.max_steps and not (cfg.max_tokens and tokens >= cfg.max_tokens) and tf < 1.0:
            # with a time budget the decay follows the nearer of the two limits
            budget = max((step - start_step) / max(1, cfg.max_steps - start_step), tf) if tf > 0 else 0.0
            lr = lr_at(step, cfg.optim, cfg.max_steps, budget)
            engine.set_lr(lr)
            losses, mod_losses = [], {}
            for micro in range(cfg.optim.grad_accum):
                batch = next(data)
                batches += 1
                label_modality = batch.pop("label_modality")
                labels = batch.pop("labels")
                n_tok = _count_tokens(batch)
                out_ = engine.forward(batch)
                loss, per_mod = compute_loss(out_.logits, labels.to(out_.logits.device), label_modality.to(out_.logits.device), arch == "decoder", cfg.loss_mode, z_weight)
                engine.backward(loss, cfg.optim.grad_accum)
                engine.step(cfg.optim.grad_clip, boundary=micro == cfg.optim.grad_accum - 1)
                losses.append(loss.detach())
                for m, v in per_mod.items():
                    mod_losses.setdefault(m, []).append(v.detach())
                window_tokens += n_tok * world
                tokens += n_tok * world
            step += 1
            bar.update()
            tf = time_fraction()
            if step % cfg.log_every == 0 or step == cfg.max_steps or tf >= 1.0:
                loss_value = float(torch.stack(losses).mean())
                if dist.is_initialized():  # the mean over ranks, for the log only
                    t = torch.tensor([loss_value])
                    dist.all_reduce(t)
                    loss_value = float(t) / world
                elapsed = time.perf_counter() - window_start
                last = {"step": step, "loss": loss_value, "lr": lr, "tokens": tokens, "tokens_per_s": window_tokens / max(elapsed, 1e-9)}
                last.update({f"loss/{names[m]}": float(torch.stack(v).mean()) for m, v in mod_losses.items() if 0 <= m < len(names)})
                window_tokens, window_start = 0, time.perf_counter()
                if metrics_file is not None:
                    metrics_file.write(json.dumps(last) + "\n")
                    metrics_file.flush()
                if board is not None:
                    for key, value in last.items():
                        if key != "step":
                            board.add_scalar(key, value, step)
                bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{last['tokens_per_s']:.0f}")
            if step % cfg.ckpt_every == 0 or step == cfg.max_steps:
                _save_checkpoint(engine, out, step, tokens, batches, cfg)
        if step % cfg.ckpt_every and step != cfg.max_steps:  # stopped by tokens or time
            _save_checkpoint(engine, out, step, tokens, batches, cfg)
    finally:
        bar.close()
        if metrics_file is not None:
            metrics_file.close()
        if board is not None:
            board.close()
    _save_final(engine, out, vocab, manifest, cfg, base_vocab)
    summary = {"steps": step, "tokens": tokens, "last": last, "world": world, "engine": kind, "parameter_bytes_per_rank": param_bytes}
    summary["trainable_parameters"], summary["base_parameters"] = trainable_parameters(engine.module) if cfg.lora.enabled else (sum(p.numel() for p in trainable),) * 2
    summary["seconds_per_step"] = (time.perf_counter() - start_time) / max(step - start_step, 1)
    summary["peak_rss_mb"] = peak_rss_mb()
    if engine.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _tensorboard(out: Path):
    """A TensorBoard writer when tensorboard is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))


def _save_checkpoint(engine: Engine, out: Path, step: int, tokens: int, batches: int, cfg: TrainConfig) -> None:
    tmp, final = ckpt.temp_dir(out, step), ckpt.checkpoint_dir(out, step)
    if engine.is_main:
        tmp.mkdir(parents=True, exist_ok=True)
    engine.barrier()
    engine.save(tmp)
    engine.barrier()
    if engine.is_main:
        ckpt.save_rng(tmp)
        ckpt.write_state(tmp, {"step": step, "tokens": tokens, "batches_per_rank": batches, "world": engine.world, "engine": engine.kind})
        ckpt.publish(tmp, final, cfg.keep_checkpoints)
    engine.barrier()


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def _save_final(engine: Engine, out: Path, vocab: SharedVocab, manifest: dict, cfg: TrainConfig, base_vocab: SharedVocab) -> None:
    if cfg.lora.enabled:  # the adapter alone, in peft's format (the base stays where it is)
        if engine.is_main:
            save_adapter(engine.module, out / "final", vocab, base_vocab.size, tokenizers=manifest.get("tokenizers"), base=cfg.init_from)
            log.info("adapter written to %s", out / "final")
        engine.barrier()
        return
    state = engine.full_state_dict()
    if engine.is_main:
        model = type(engine.module)(engine.module.config)
        model.load_state_dict(state)
        save_pretrained(model, out / "final", vocab=vocab)
        (out / "final" / "tokenizers.json").write_text(json.dumps({"tokenizers": manifest.get("tokenizers")}) + "\n")
        log.info("final model written to %s", out / "final")
    engine.barrier()
