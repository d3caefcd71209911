"""The training loop: one loop for every engine (single process, DDP, DeepSpeed ZeRO-2/3).

Run length by steps, tokens or minutes; AdamW or Muon + AdamW (``optimizers``), warm-up + cosine; gradient accumulation and clipping;
loss per modality (4M's mean over modalities, or per token); tqdm and ``metrics.jsonl`` on rank 0;
atomic checkpoints every N steps and at the end; ``resume`` continues from the newest checkpoint
as if never stopped; the final weights go to ``OUT/final/`` as a ``from_pretrained`` directory.

Faults (see also ``checkpoint``, ``run_dir`` and ``data``): the run directory is checked for
writability and free space before training starts; ``kill -9`` at any moment loses at most the
steps since the last checkpoint, and ``resume`` rewinds ``metrics.jsonl`` to it so no step is
logged twice; a step whose loss or gradient is not finite is skipped (no optimizer update) and
counted (``bad_steps``), and ``max_bad_steps`` such steps in a row stop the run with a checkpoint
and ``TrainingDiverged``; skipped and repaired samples are counted per reason in ``metrics.jsonl``
(``skipped/<reason>``, ``repaired/<reason>``) and in ``summary.json``.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from fourm.config import to_dict
from fourm.data.object_labels import OBJECT_LABELS
from fourm.data.shards import write_text_atomic
from fourm.models.build import build_model
from fourm.models.grow import load_for_vocab
from fourm.models.layers import row_cross_entropy
from fourm.models.lora import LoraSettings, apply_lora, save_adapter, trainable_parameters
from fourm.objectives.mixture import ObjectiveConfig
from fourm.precision import StepTrial
from fourm.schedule import warmup_cosine
from fourm.sequence import IGNORE_INDEX
from fourm.training import checkpoint as ckpt
from fourm.training import reshard, run_dir
from fourm.training.data import StreamConfig, TokenStream, label_sizes, make_loader, manifest_context, pixel_sizes
from fourm.training.data_position import LIVE, SAMPLE_IDS, DataPosition, Origin, resumed_position
from fourm.training.engine import Engine, end_distributed, init_distributed, load_deepspeed_config
from fourm.training.optimizers import OptimConfig, make_optimizer
from fourm.training.shard_check import check_model_vocab, check_shards_fit
from fourm.vocab import SharedVocab

log = logging.getLogger(__name__)


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
    # a timed precision choice is confirmed on the run's first 70 steps (``fourm.precision.StepTrial``)
    precision_trial: bool = True
    compile: bool = False
    activation_checkpointing: bool = False
    loss_mode: str = "modality_mean"  # modality_mean | token
    seed: int = 0
    init_from: str = ""  # a from_pretrained directory to start from (grown when the data's vocabulary extends its)
    lora: LoraSettings = field(default_factory=LoraSettings)  # enabled: adapters on a frozen init_from
    manifest: str = ""  # token-shard manifest.json, when the data are only remote URLs
    max_bad_steps: int = 5  # stop (with a checkpoint) after this many non-finite steps in a row; 0: never
    # > 0 (with max_minutes): also write OUT/snapshots/min-M.MM/, a from_pretrained directory with its
    # snapshot.json (step, tokens, minutes), each time this many training minutes pass: a curve's points
    snapshot_every_minutes: float = 0.0
    # a deadline for training and the work after it (make demo's budget): > 0 (with max_minutes),
    # the wall-clock time (seconds since the epoch) by which both must be done. Once the run's own
    # steps have been timed (``deadline_minutes``), max_minutes grows so that training ends
    # ``after_seconds`` + ``after_steps`` of its step times before the deadline, where that is later
    # than max_minutes would end it; it never shrinks
    deadline: float = 0.0
    after_steps: float = 0.0
    after_seconds: float = 0.0

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
        if self.max_bad_steps < 0:
            raise ValueError("max_bad_steps must be >= 0")
        if self.snapshot_every_minutes < 0 or (self.snapshot_every_minutes and not self.max_minutes):
            raise ValueError("snapshot_every_minutes must be >= 0, and > 0 only with a max_minutes budget")
        if min(self.deadline, self.after_steps, self.after_seconds) < 0 or (self.deadline and not self.max_minutes):
            raise ValueError("deadline, after_steps and after_seconds must be >= 0, and a deadline needs a max_minutes budget")


PROBE_BATCHES = 9  # the precision probe's warm-up batch and eight timed ones (shapes vary by batch)
# steps of a run timed for its deadline (``TrainConfig.deadline``): after the precision trial's 70
DEADLINE_TIMED = (100, 160)
AUTOCAST_NAMES = {"bfloat16": torch.bfloat16, "float32": None}  # as checkpoints record the run's precision


class TrainingDiverged(RuntimeError):
    """``max_bad_steps`` steps in a row had a non-finite loss or gradient; a checkpoint was written."""


FAULT_ENV = "FOURM_FAULT_NAN_STEPS"  # fault injection for tests: "3,4" makes the loss NaN at steps 3 and 4


def _injected_faults() -> set[int]:
    return {int(v) for v in os.environ.get(FAULT_ENV, "").split(",") if v.strip()}


def lr_at(step: int, cfg: OptimConfig, total: int, min_progress: float = 0.0) -> float:
    """Linear warm-up, then cosine from lr down to lr * min_lr_ratio at ``total``; the decay is at
    least ``min_progress`` along (a time budget that ends before ``total``)."""
    progress = max((step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps), min_progress)
    return warmup_cosine(step, progress, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)


def compute_loss(logits: torch.Tensor, labels: torch.Tensor, label_modality: torch.Tensor, shift: bool, mode: str, z_weight: float, ordinal: tuple[list[list[int]], float] | None = None) -> tuple[torch.Tensor, dict[int, float]]:
    """Loss and per-modality mean cross-entropy (modality index -> value, for logging).

    ``shift``: decoder-only (logits at t predict labels at t + 1); ``ordinal``: the model config's
    ``ordinal()`` (soft targets for coordinate ids, ``fourm.models.layers.ordinal_kl``).
    """
    if shift:
        logits, labels, label_modality = logits[:, :-1], labels[:, 1:], label_modality[:, 1:]
    keep = labels != IGNORE_INDEX
    picked = logits[keep].float()
    ce = row_cross_entropy(picked, labels[keep], ordinal)
    return reduce_token_losses(ce, label_modality[keep], torch.logsumexp(picked, dim=-1) if z_weight else None, mode, z_weight)


def reduce_token_losses(ce: torch.Tensor, mods: torch.Tensor, lse: torch.Tensor | None, mode: str, z_weight: float) -> tuple[torch.Tensor, dict[int, float]]:
    """Per-token cross-entropy ce (N,) of modalities mods (N,) -> (loss, per-modality means);
    ``lse`` (N,): the logsumexp of each token's logits, for the z-loss."""
    per_mod = {int(m): ce[mods == m].mean() for m in torch.unique(mods)}
    loss = torch.stack(list(per_mod.values())).mean() if mode == "modality_mean" else ce.mean()
    if z_weight:
        loss = loss + z_weight * lse.pow(2).mean()
    return loss, per_mod


AUX_LOSS_KEY = -2  # the dense auxiliary loss (weighted) among the per-modality losses (logged as loss/aux)


def model_loss(engine, batch: dict, labels: torch.Tensor, label_modality: torch.Tensor, arch: str, mode: str, z_weight: float) -> tuple[torch.Tensor, dict[int, float]]:
    """Forward + loss of one batch, without (B, T, V) logits: the model's ``loss_labels`` path runs
    the output layer only at labelled positions (the encoder-decoder, and a decoder-only model
    with ``modality_softmax``, also only over each modality's id span, where its logits are
    finite). The same values as ``compute_loss`` on full logits (tested)."""
    extra = {"label_modality": label_modality} if arch == "decoder" else {}  # the decoder's per-modality softmax reads it
    out = engine.forward({**batch, **extra, "loss_labels": labels})
    mods = label_modality.to(out.ce.device)
    mods = (mods[:, 1:] if arch == "decoder" else mods).reshape(-1)[out.index]
    loss, per_mod = reduce_token_losses(out.ce, mods, out.lse, mode, z_weight)
    if out.get("aux_loss") is not None:  # the encoder's dense auxiliary loss (EncDecConfig.aux_labels)
        loss = loss + out.aux_loss
        per_mod[AUX_LOSS_KEY] = out.aux_loss
    return loss, per_mod


def _workload_name(cfg: TrainConfig, arch: str, trainable: list[torch.nn.Parameter], world: int) -> str:
    """The key precision choices are cached under: what the step's cost depends on."""
    return f"{arch} training step: {sum(p.numel() for p in trainable) / 1e6:.2f} M trainable parameters, batch {cfg.data.batch_size}, {world} rank(s)"


def _probe_step(engine: Engine, batches: list[dict], arch: str, mode: str, z_weight: float):
    """``step(dtype, i)`` for ``Engine.choose_precision``: forward, loss and backward of the i-th of
    ``batches`` (cycling) on the bare module (no optimizer step, no DDP hooks)."""
    from types import SimpleNamespace

    from fourm.precision import training_step

    bare = SimpleNamespace(forward=lambda b: engine.module(**{k: (v.to(engine.device) if isinstance(v, torch.Tensor) else v) for k, v in b.items()}))

    def loss_of(i: int) -> torch.Tensor:
        batch = batches[i % len(batches)]
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "label_modality", SAMPLE_IDS, LIVE)}
        return model_loss(bare, inputs, batch["labels"], batch["label_modality"], arch, mode, z_weight)[0]

    return training_step(engine.module, loss_of, engine.device.type)


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
    """Run training into ``out``; returns a summary (steps, tokens, last losses). Under a launcher
    with several ranks it starts the process group and closes it before returning (a group the
    caller started stays open)."""
    owns_group = not dist.is_initialized()
    completed = False
    try:
        summary = _train(cfg, Path(out), deepspeed_config, resume, progress)
        completed = True
        return summary
    finally:
        if owns_group:
            end_distributed(completed, deepspeed_config is not None)


@dataclass
class _Progress:
    """The counts a checkpoint saves and a resume restores (``autocast``: the precision a resumed
    run started with, kept so that it resumes as if never stopped)."""

    step: int = 0
    tokens: int = 0
    batches: int = 0  # per rank
    bad_steps: int = 0
    bad_in_row: int = 0
    autocast: str | None = None

    def counters(self) -> dict[str, int]:
        return {"bad_steps": self.bad_steps, "bad_in_row": self.bad_in_row}


@dataclass
class _Run:
    """What the set-up builds and every later part reads."""

    cfg: TrainConfig
    out: Path
    world: int
    kind: str  # single | ddp | deepspeed
    manifest: dict
    vocab: SharedVocab
    base_vocab: SharedVocab  # the vocabulary of ``init_from`` (``vocab`` when training from scratch)
    engine: Engine
    arch: str
    trainable: list[torch.nn.Parameter]
    param_bytes: list[int]
    stream: TokenStream
    z_weight: float
    position: DataPosition = field(default_factory=lambda: DataPosition(Origin()))
    layout: reshard.Layout = field(default_factory=reshard.Layout)


def _train(cfg: TrainConfig, out: Path, deepspeed_config: str | None, resume: bool, progress: bool) -> dict:
    run, done = _set_up(cfg, out, deepspeed_config, resume)
    data, trial = _choose_precision(run, iter(make_loader(run.stream)), done.autocast)
    report = _Report(run, done.step, progress)
    start_time, start_step = time.perf_counter(), done.step
    tf = _time_fraction(cfg, start_time)  # measured once per step (a collective under torch.distributed)
    faults = _injected_faults()
    next_snapshot = cfg.snapshot_every_minutes
    timed = [start_step + n for n in DEADLINE_TIMED] if cfg.deadline and start_step == 0 else []
    timed_start = 0.0
    try:
        while done.step < cfg.max_steps and not (cfg.max_tokens and done.tokens >= cfg.max_tokens) and tf < 1.0:
            lr = _step_lr(cfg, done.step, start_step, tf)
            run.engine.set_lr(lr)
            if trial is not None:
                run.engine.autocast_dtype = trial.dtype()
                step_start = time.perf_counter()
            losses, mod_losses, applied, seen = _train_step(run, done, data, faults)
            if trial is not None:
                trial.record(time.perf_counter() - step_start, seen)
                if trial.decided:
                    _keep_trial(run, trial)
                    trial = None
            done.step += 1
            report.bar.update()
            report.window_tokens += seen
            diverged = _count_bad_step(run, done, applied)
            if timed and done.step == timed[0]:
                timed_start = time.perf_counter()
            elif timed and done.step == timed[1]:
                _extend_to_deadline(cfg, start_time, (time.perf_counter() - timed_start) / (timed[1] - timed[0]))
                timed = []
            tf = _time_fraction(cfg, start_time)
            if done.step % cfg.log_every == 0 or done.step == cfg.max_steps or tf >= 1.0 or diverged:
                report.log(done, lr, losses, mod_losses)
            next_snapshot = _save_due(run, done, tf, diverged, next_snapshot)
            if diverged:
                raise TrainingDiverged(f"{done.bad_in_row} steps in a row (max_bad_steps) had a non-finite loss or gradient, the last at step {done.step}: lower optim.lr or check the data; checkpoint {ckpt.checkpoint_dir(out, done.step)}")
        if done.step % cfg.ckpt_every and done.step != cfg.max_steps:  # stopped by tokens or time
            _save_checkpoint(run, done)
    finally:
        report.close()
    return _finish(run, done, report.last, start_time, start_step)


# -- set-up ------------------------------------------------------------------------------------------


def _set_up(cfg: TrainConfig, out: Path, deepspeed_config: str | None, resume: bool) -> tuple[_Run, _Progress]:
    """Checks (shards, writability, free space) before anything is built or written, then the
    model, its engine, the resumed counts, the run's files and the token stream."""
    rank, world = init_distributed(deepspeed_config is not None)
    manifest = token_manifest(cfg)
    shards = ", ".join(src.path for src in cfg.data.sources) or cfg.manifest
    check_shards_fit(manifest, shards, cfg.objective)  # before anything is built or written
    if cfg.init_from:
        check_model_vocab(cfg.init_from, manifest_context(manifest)[0], shards)
    run_dir.check_writable(out)  # every rank, before the model is built: fails in seconds, not at the first checkpoint
    vocab, grids, kinds = manifest_context(manifest)

    torch.manual_seed(cfg.seed)
    latest = ckpt.latest_checkpoint(out) if resume else None  # looked up once: it reads and checks every checkpoint's files
    model, base_vocab, spec = _model(cfg, out, vocab, latest is not None, deepspeed_config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    kept = cfg.keep_checkpoints if cfg.keep_checkpoints > 0 else cfg.max_steps // cfg.ckpt_every + 1
    run_dir.check_free_space(out, run_dir.bytes_needed(out, run_dir.checkpoint_bytes(model), kept, 4 * sum(p.numel() for p in model.parameters())))
    kind = "deepspeed" if deepspeed_config else ("ddp" if world > 1 else "single")
    if cfg.optim.name == "muon" and kind == "deepspeed":
        raise ValueError("optim.name=muon runs on one process or under DDP; DeepSpeed steps its own optimizer: use optim.name=adamw there")
    optimizer = make_optimizer(model, cfg.optim, fused=kind != "deepspeed")
    ds_cfg = load_deepspeed_config(deepspeed_config, cfg.data.batch_size, cfg.optim.grad_accum, cfg.optim.grad_clip, run_dir=out) if deepspeed_config else None
    layout = reshard.Layout(kind, int((ds_cfg or {}).get("zero_optimization", {}).get("stage", 0)), world, cfg.data.batch_size, cfg.optim.grad_accum, cfg.data.num_workers, cfg.data.shuffle_buffer)
    plan = _plan_resume(latest, layout, ds_cfg, rank) if latest is not None else None
    engine = Engine(model, optimizer, kind, bf16=cfg.bf16, compile=cfg.compile, activation_checkpointing=cfg.activation_checkpointing, deepspeed_config=ds_cfg)

    param_bytes = [engine.parameter_bytes()]
    if dist.is_initialized():
        param_bytes = [None] * world
        dist.all_gather_object(param_bytes, engine.parameter_bytes())
    if engine.is_main:
        log.info("parameters per rank: %s MB", ", ".join(f"{b / 2**20:.1f}" for b in param_bytes))
    done = _resume(engine, latest, rank, out, plan) if resume else _Progress()
    state = ckpt.read_state(latest) if latest is not None else {}
    position = resumed_position(latest, state["data"], plan.reshard, done.batches) if "data" in state else DataPosition(Origin())
    if engine.is_main:
        _write_run_files(cfg, out, spec, done.step)
        if plan is not None:
            plan.log_choice(done.step, done.tokens, lr_at(done.step, cfg.optim, cfg.max_steps))
    stream = _token_stream(cfg, model.config, manifest, vocab, kinds, grids, rank, world, done.batches - position.origin.batches, position.origin)
    run = _Run(cfg, out, world, kind, manifest, vocab, base_vocab, engine, model.config.arch, trainable, param_bytes, stream, getattr(model.config, "z_loss", 0.0), position, layout)
    return run, done


def _plan_resume(latest: Path, layout: reshard.Layout, ds_cfg: dict | None, rank: int) -> reshard.ResumePlan:
    """How the run resumes from checkpoint ``latest`` on ``layout`` (``reshard.plan_resume``); a
    DeepSpeed checkpoint of another world size is converted to the universal form first (rank 0,
    the others waiting) and ``ds_cfg`` told to load that."""
    plan = reshard.plan_resume(ckpt.read_state(latest), layout, latest)
    if plan.universal:
        ds_cfg.setdefault("checkpoint", {})["load_universal"] = True
        if rank == 0:
            reshard.universal_checkpoint(latest / "ds")
        if dist.is_initialized():
            dist.barrier()
    return plan


def _model(cfg: TrainConfig, out: Path, vocab: SharedVocab, resuming: bool, deepspeed_config: str | None) -> tuple[torch.nn.Module, SharedVocab, dict | None]:
    """(the model to train, the vocabulary of its base, the model spec written to the run directory
    or None with ``init_from``): ``init_from`` grown to ``vocab`` or a new model (the run
    directory's spec when resuming), then LoRA adapters on it when enabled."""
    spec = None
    if cfg.lora.enabled and not cfg.init_from:
        raise ValueError("lora.enabled needs init_from (--set init_from=DIR): the pretrained model the adapters adapt")
    if cfg.init_from:
        model, base_vocab = load_for_vocab(cfg.init_from, vocab)
    else:
        spec = run_dir.model_spec(out, cfg.model_spec(), cfg.model, resuming)
        model, base_vocab = build_model(spec, vocab=vocab), vocab
    cfg.objective.validate(model.config.arch)
    if cfg.lora.enabled:
        if deepspeed_config and load_deepspeed_config(deepspeed_config, 1, 1, 0.0).get("zero_optimization", {}).get("stage", 0) == 3:
            raise ValueError("LoRA runs under DeepSpeed ZeRO-2 (or DDP); ZeRO-3 would shard the frozen base too, which adapters do not need: use configs/deepspeed/zero2.json")
        new_modalities = [i for i, m in enumerate(vocab.modalities) if m not in base_vocab.modalities]
        model = apply_lora(model, cfg.lora, range(base_vocab.size, vocab.size), new_modalities)
    return model, base_vocab, spec


def _resume(engine: Engine, latest: Path | None, rank: int, out: Path, plan: reshard.ResumePlan | None) -> _Progress:
    """The counts of checkpoint ``latest``, whose weights, optimizer state and RNG are loaded; fresh
    counts when ``out`` holds no checkpoint."""
    if latest is None:
        if engine.is_main:
            log.info("--resume: no checkpoint in %s, starting fresh", out)
        return _Progress()
    state = ckpt.read_state(latest)
    engine.load(latest, universal=plan.universal)
    ckpt.load_rng(latest, rank)  # a rank the checkpoint did not have keeps its seeded state
    done = _Progress(state["step"], state["tokens"], state["batches_per_rank"], state.get("bad_steps", 0), state.get("bad_in_row", 0), state.get("autocast"))
    if engine.is_main:
        log.info("resuming from %s (step %d)", latest, done.step)
    return done


def _write_run_files(cfg: TrainConfig, out: Path, spec: dict | None, step: int) -> None:
    """Rank 0: ``config.json``, the model spec, and ``metrics.jsonl`` rewound to ``step``."""
    write_text_atomic(out / "config.json", json.dumps(to_dict(cfg), indent=1) + "\n")
    if not cfg.init_from:
        write_text_atomic(out / run_dir.MODEL_SPEC, json.dumps(spec, indent=1) + "\n")
    dropped = run_dir.rewind_metrics(out / "metrics.jsonl", step)
    if dropped:
        log.info("metrics.jsonl: %d records after step %d dropped (they are done again)", dropped, step)


def _token_stream(cfg: TrainConfig, model_config, manifest: dict, vocab: SharedVocab, kinds: dict[str, str], grids: dict[str, int], rank: int, world: int, skip: int, origin: Origin) -> TokenStream:
    """This rank's examples from ``origin``, the first ``skip`` batches (done before a resume) skipped; rgb pixels
    too for a model that reads them, once the shards' pixels fit its patches."""
    pixels = bool(getattr(model_config, "rgb_pixels", False))
    if pixels:
        size = pixel_sizes(manifest).get("rgb")
        if not size:
            raise ValueError("the model reads rgb inputs as pixels too (rgb_pixels) but the token shards hold no rgb pixels: pretokenize them again (data_pipelines/pretokenize.py keeps rgb.pixels.npy)")
        if size != model_config.pixel_patch * grids["rgb"]:
            raise ValueError(f"the token shards' rgb pixels are {size}x{size} on a {grids['rgb']}x{grids['rgb']} token grid, patches of {size // grids['rgb']} pixels, but the model reads patches of {model_config.pixel_patch}: --set model.pixel_patch={size // grids['rgb']}")
    labels = getattr(model_config, "aux_labels", "")
    if labels:
        size = label_sizes(manifest).get(labels)
        if not size:
            raise ValueError(f"the model's dense auxiliary loss reads {labels} class maps (aux_labels) but the token shards hold none: pretokenize them again (data_pipelines/pretokenize.py keeps {labels}.labels.npy)")
        if size != model_config.pixel_patch * grids["rgb"]:
            raise ValueError(f"the token shards' {labels} maps are {size}x{size}, patches of {size // grids['rgb']} pixels on the rgb grid, but the model's aux head predicts patches of {model_config.pixel_patch}")
        classes = manifest.get("object_classes") if labels == OBJECT_LABELS else None
        if classes and len(classes) > model_config.aux_classes:
            raise ValueError(f"the token shards' {labels} maps have {len(classes)} classes but the model's aux head predicts {model_config.aux_classes}: --set model.aux_classes={len(classes)}")
    box_from = int(getattr(model_config, "aux_box_from", 0))
    if box_from and labels != OBJECT_LABELS:
        raise ValueError(f"the model's box term (aux_box_from) reads object boxes from the object label maps, not {labels!r} maps: --set model.aux_labels={OBJECT_LABELS}")
    return TokenStream(cfg.data, model_config.arch, vocab, kinds, grids, cfg.objective, rank=rank, world=world, skip=skip, pixels=pixels, labels=labels, origin=origin, positions=True, box_from=box_from)


def _choose_precision(run: _Run, data, resumed_autocast: str | None) -> tuple[object, StepTrial | None]:
    """The step's precision: the one a resumed run started with, else chosen by timing the first
    batches' steps both ways; returns ``data`` with those batches still to be trained on, and for
    a timed choice the ``StepTrial`` that confirms it on the run's first steps."""
    engine, cfg = run.engine, run.cfg
    if resumed_autocast in AUTOCAST_NAMES and engine.kind != "deepspeed" and cfg.bf16:
        engine.autocast_dtype = AUTOCAST_NAMES[resumed_autocast]
        if engine.is_main:
            log.info("precision: %s, as the run started (its checkpoint says so)", resumed_autocast)
        return data, None
    firsts = list(itertools.islice(data, PROBE_BATCHES))
    trial = None
    if firsts:
        choice = engine.choose_precision(_workload_name(cfg, run.arch, run.trainable, run.world), _probe_step(engine, firsts, run.arch, cfg.loss_mode, run.z_weight))
        data = itertools.chain(firsts, data)
        if choice is not None and choice.reason == "timed" and cfg.precision_trial:
            trial = StepTrial(engine.autocast_dtype)
    return data, trial


def _keep_trial(run: _Run, trial: StepTrial) -> None:
    """Run the rest in the dtype ``trial`` kept (rank 0's, on every rank), and log why."""
    dtype = trial.dtype()
    if dist.is_initialized():
        flag = torch.tensor([int(dtype is torch.bfloat16)])
        dist.broadcast(flag, src=0)
        dtype = torch.bfloat16 if int(flag) else None
    run.engine.autocast_dtype = dtype
    if run.engine.is_main:
        fp32, bf16 = trial.medians()
        n = len(trial.per_token[None])
        log.info("precision on the run's own steps (%d a dtype): bf16 %.1f us a token against fp32 %.1f: %s%s", n, bf16 * 1e6, fp32 * 1e6, "bf16 autocast" if dtype is torch.bfloat16 else "float32", "" if dtype is trial.chosen else ", not the probe's choice")


# -- one step ----------------------------------------------------------------------------------------


def deadline_minutes(max_minutes: float, elapsed: float, now: float, deadline: float, after_seconds: float, after_steps: float, step_seconds: float) -> float:
    """A time-budgeted run's minutes given its deadline: ``max_minutes``, or more where the run can
    go on until ``after_seconds + after_steps * step_seconds`` before ``deadline`` (``now`` and
    ``deadline`` in seconds since the epoch, ``elapsed`` seconds of the run so far)."""
    left = deadline - now - after_seconds - after_steps * step_seconds
    return max(max_minutes, (elapsed + left) / 60)


def _extend_to_deadline(cfg: TrainConfig, start_time: float, step_seconds: float) -> None:
    """``cfg.max_minutes`` lengthened to ``deadline_minutes`` (the least over ranks: every rank must
    stop at the same step), logged."""
    minutes = deadline_minutes(cfg.max_minutes, time.perf_counter() - start_time, time.time(), cfg.deadline, cfg.after_seconds, cfg.after_steps, step_seconds)
    if dist.is_initialized():
        t = torch.tensor([minutes])
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        minutes = float(t)
    if minutes > cfg.max_minutes:
        log.info("a step takes %.3f s: the run trains %.2f minutes instead of %.2f and ends %.0f s + %g steps' time before its deadline", step_seconds, minutes, cfg.max_minutes, cfg.after_seconds, cfg.after_steps)
        cfg.max_minutes = round(minutes, 3)


def _time_fraction(cfg: TrainConfig, start_time: float) -> float:
    """The share of ``max_minutes`` spent (0 without a time budget), the largest over ranks: every
    rank must stop at the same step."""
    if not cfg.max_minutes:
        return 0.0
    frac = (time.perf_counter() - start_time) / (cfg.max_minutes * 60)
    if dist.is_initialized():
        t = torch.tensor([frac])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        frac = float(t)
    return frac


def _step_lr(cfg: TrainConfig, step: int, start_step: int, tf: float) -> float:
    """The learning rate of ``step``: with a time budget the decay follows the nearer of the two limits."""
    budget = max((step - start_step) / max(1, cfg.max_steps - start_step), tf) if tf > 0 else 0.0
    return lr_at(step, cfg.optim, cfg.max_steps, budget)


def _train_step(run: _Run, done: _Progress, data, faults: set[int]) -> tuple[list[torch.Tensor], dict[int, list[torch.Tensor]], bool, int]:
    """One optimizer step over ``grad_accum`` micro-batches (their batches and tokens counted in
    ``done``) -> (the micro-batches' losses, per-modality losses, whether the update was applied
    (not for a non-finite loss or gradient), tokens of all ranks)."""
    cfg, engine = run.cfg, run.engine
    losses, mod_losses, finite, applied, seen = [], {}, True, True, 0
    for micro in range(cfg.optim.grad_accum):
        batch = next(data, None)
        if batch is None:
            raise ValueError(f"the training data ran out: no usable samples left (skipped: {run.stream.skipped.report()})")
        done.batches += 1
        run.position.record(batch, done.step + 1)
        label_modality = batch.pop("label_modality")
        labels = batch.pop("labels")
        n_tok = _count_tokens(batch)
        loss, per_mod = model_loss(engine, batch, labels, label_modality, run.arch, cfg.loss_mode, run.z_weight)
        if done.step + 1 in faults:
            loss = loss * float("nan")
        finite = finite and bool(torch.isfinite(loss.detach()))
        engine.backward(loss, cfg.optim.grad_accum)
        applied = engine.step(cfg.optim.grad_clip, boundary=micro == cfg.optim.grad_accum - 1, finite_loss=finite)
        losses.append(loss.detach())
        for m, v in per_mod.items():
            mod_losses.setdefault(m, []).append(v.detach())
        seen += n_tok * run.world
        done.tokens += n_tok * run.world
    return losses, mod_losses, applied, seen


# -- faults ------------------------------------------------------------------------------------------


def _count_bad_step(run: _Run, done: _Progress, applied: bool) -> bool:
    """Count a step whose update was skipped (non-finite); True once ``max_bad_steps`` came in a row."""
    done.bad_in_row = 0 if applied else done.bad_in_row + 1
    done.bad_steps += not applied
    if not applied and run.engine.is_main:
        log.warning("step %d: non-finite loss or gradient; optimizer step skipped (%d in a row, %d in all)", done.step, done.bad_in_row, done.bad_steps)
    return bool(run.cfg.max_bad_steps) and done.bad_in_row >= run.cfg.max_bad_steps


# -- logging -----------------------------------------------------------------------------------------


class _Report:
    """Rank 0's record of the run: ``metrics.jsonl`` (appended to), TensorBoard (when installed) and
    the tqdm bar. ``log`` writes one record: the mean losses of the step, and tokens per second
    over the steps since the last record (``window_tokens``, counted by the loop)."""

    def __init__(self, run: _Run, step: int, progress: bool):
        self.run = run
        self.names = list(run.vocab.modalities)
        main = run.engine.is_main
        self.metrics_file = open(run.out / "metrics.jsonl", "a") if main else None
        self.board = _tensorboard(run.out, step + 1) if main else None
        self.bar = tqdm(total=run.cfg.max_steps, initial=step, desc=f"train {run.arch}", unit="step", disable=not (progress and main))
        self.window_tokens, self.window_start = 0, time.perf_counter()
        self.last: dict = {}

    def log(self, done: _Progress, lr: float, losses: list[torch.Tensor], mod_losses: dict[int, list[torch.Tensor]]) -> None:
        loss_value = float(torch.stack(losses).mean())
        if dist.is_initialized():  # the mean over ranks, for the log only
            t = torch.tensor([loss_value])
            dist.all_reduce(t)
            loss_value = float(t) / self.run.world
        elapsed = time.perf_counter() - self.window_start
        last = {"step": done.step, "loss": _finite_or_none(loss_value), "lr": lr, "tokens": done.tokens, "tokens_per_s": self.window_tokens / max(elapsed, 1e-9)}
        names = {**dict(enumerate(self.names)), AUX_LOSS_KEY: "aux"}
        last.update({f"loss/{names[m]}": _finite_or_none(float(torch.stack(v).mean())) for m, v in mod_losses.items() if m in names})
        last.update(_data_counts(self.run.stream, done.bad_steps))
        self.last = last
        self.window_tokens, self.window_start = 0, time.perf_counter()
        if self.metrics_file is not None:
            self.metrics_file.write(json.dumps(last) + "\n")
            self.metrics_file.flush()
        if self.board is not None:
            for key, value in last.items():
                if key != "step" and value is not None:
                    self.board.add_scalar(key, value, done.step)
        self.bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{last['tokens_per_s']:.0f}")

    def close(self) -> None:
        self.bar.close()
        if self.metrics_file is not None:
            self.metrics_file.close()
        if self.board is not None:
            self.board.close()


# -- checkpoints and snapshots -----------------------------------------------------------------------


def _save_due(run: _Run, done: _Progress, tf: float, diverged: bool, next_snapshot: float) -> float:
    """After a step: the snapshot due every ``snapshot_every_minutes`` of a time budget, and the
    checkpoint due every ``ckpt_every`` steps, at the last step and on divergence. Returns the
    minute of the next snapshot."""
    cfg = run.cfg
    if cfg.snapshot_every_minutes and tf * cfg.max_minutes >= next_snapshot and tf < 1.0:
        _save_snapshot(run.engine, run.out, run.vocab, run.manifest, cfg, run.base_vocab, {"step": done.step, "tokens": done.tokens, "minutes": round(tf * cfg.max_minutes, 3)})
        next_snapshot += cfg.snapshot_every_minutes
    if done.step % cfg.ckpt_every == 0 or done.step == cfg.max_steps or diverged:
        _save_checkpoint(run, done)
    return next_snapshot


# -- the end -----------------------------------------------------------------------------------------


def _finish(run: _Run, done: _Progress, last: dict, start_time: float, start_step: int) -> dict:
    """The final weights (``OUT/final``), the data's skip counts, and the summary (``summary.json``)."""
    cfg, engine, stream = run.cfg, run.engine, run.stream
    _save_final(engine, run.out, run.vocab, run.manifest, cfg, run.base_vocab)
    counts = _data_counts(stream, done.bad_steps)
    if engine.is_main:
        log.info("data: skipped samples: %s; optimizer steps skipped (non-finite): %d", stream.skipped.report(), done.bad_steps)
    summary = {"steps": done.step, "tokens": done.tokens, "last": last, "world": run.world, "engine": run.kind, "parameter_bytes_per_rank": run.param_bytes, "parameter_bytes_whole": engine.parameter_bytes(whole=True)}
    summary["bad_steps"] = done.bad_steps
    summary["skipped"] = {k.split("/", 1)[1]: v for k, v in counts.items() if k.startswith("skipped/")}
    summary["repaired"] = {k.split("/", 1)[1]: v for k, v in counts.items() if k.startswith("repaired/")}
    summary["trainable_parameters"], summary["base_parameters"] = trainable_parameters(engine.module) if cfg.lora.enabled else (sum(p.numel() for p in run.trainable),) * 2
    summary["seconds_per_step"] = (time.perf_counter() - start_time) / max(done.step - start_step, 1)
    summary["peak_rss_mb"] = peak_rss_mb()
    if engine.is_main:
        write_text_atomic(run.out / "summary.json", json.dumps(summary, indent=1) + "\n")
    return summary


def _finite_or_none(value: float) -> float | None:
    """``value``, or None (JSON null) when it is NaN or infinite."""
    return value if math.isfinite(value) else None


def _data_counts(stream: TokenStream, bad_steps: int) -> dict[str, int]:
    """``skipped/<reason>`` and ``repaired/<reason>`` (non-zero ones, summed over ranks; ``skipped/total``
    always) and ``bad_steps``, for ``metrics.jsonl``."""
    skipped, repaired = stream.skipped.as_dict(), stream.skipped.repairs()
    keys = [f"skipped/{r}" for r in skipped] + [f"repaired/{r}" for r in repaired]
    values = torch.tensor(list(skipped.values()) + list(repaired.values()), dtype=torch.int64)
    if dist.is_initialized():  # every rank reads its own shards
        dist.all_reduce(values)
    counts = {k: int(v) for k, v in zip(keys, values.tolist()) if v or k == "skipped/total"}
    return {**counts, "bad_steps": bad_steps}


def _tensorboard(out: Path, purge_step: int):
    """A TensorBoard writer when tensorboard is installed, else None; events from ``purge_step`` on
    (logged by a killed run after its last checkpoint) are discarded."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"), purge_step=purge_step)


def _save_checkpoint(run: _Run, done: _Progress) -> None:
    """``OUT/checkpoints/step-N``: every rank's share, its RNG, the counts, the layout and the data
    position; published (renamed into place, old ones pruned) once complete."""
    engine, out, cfg, step = run.engine, run.out, run.cfg, done.step
    tmp, final = ckpt.temp_dir(out, step), ckpt.checkpoint_dir(out, step)
    if engine.is_main:
        if tmp.exists():  # left by a killed run
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    engine.barrier()
    engine.save(tmp)
    ckpt.save_rng(tmp, engine.rank)
    data = run.position.save(tmp, cfg.data.num_workers, engine.is_main)
    engine.barrier()
    if engine.is_main:
        autocast = next(name for name, dtype in AUTOCAST_NAMES.items() if dtype is engine.autocast_dtype)
        ckpt.write_state(tmp, {"step": step, "tokens": done.tokens, "batches_per_rank": done.batches, "world": engine.world, "engine": engine.kind, "autocast": autocast, **done.counters(), "layout": run.layout.as_dict(), "data": data})
        ckpt.publish(tmp, final, cfg.keep_checkpoints)
    engine.barrier()


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def _save_snapshot(engine: Engine, out: Path, vocab: SharedVocab, manifest: dict, cfg: TrainConfig, base_vocab: SharedVocab, record: dict) -> None:
    """``OUT/snapshots/min-M.MM``: the weights as ``final`` holds them, and ``snapshot.json``."""
    name = f"min-{record['minutes']:07.3f}"
    _save_final(engine, out, vocab, manifest, cfg, base_vocab, target=Path("snapshots") / name)
    if engine.is_main:
        write_text_atomic(out / "snapshots" / name / "snapshot.json", json.dumps(record) + "\n")
        log.info("snapshot %s: step %d", name, record["step"])


def _save_final(engine: Engine, out: Path, vocab: SharedVocab, manifest: dict, cfg: TrainConfig, base_vocab: SharedVocab, target: Path = Path("final")) -> None:
    """``OUT/final`` (or ``OUT/target``), written into ``OUT/.tmp-final`` and renamed when complete."""
    target = out / target
    if engine.is_main:
        target.parent.mkdir(parents=True, exist_ok=True)
    tmp = out / ".tmp-final"
    if engine.is_main and tmp.exists():  # left by a killed run
        shutil.rmtree(tmp)
    if cfg.lora.enabled:  # the adapter alone, in peft's format (the base stays where it is)
        if engine.is_main:
            save_adapter(engine.module, tmp, vocab, base_vocab.size, tokenizers=manifest.get("tokenizers"), base=cfg.init_from)
            ckpt.replace_dir(tmp, target)
            log.info("adapter written to %s", target)
        engine.barrier()
        return
    state = engine.full_state_dict()
    if engine.is_main:
        model = type(engine.module)(engine.module.config)
        model.load_state_dict(state)
        ckpt.write_model_dir(model, tmp, target, vocab, manifest.get("tokenizers"))
        log.info("model written to %s", target)
    engine.barrier()
