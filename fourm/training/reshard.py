"""Resuming on another layout: another world size, batch size, gradient accumulation or number of
data workers than the checkpoint was written with.

What carries over, whatever changed: the step and token counts, the learning-rate schedule (a
function of the step, so the rate goes on from where it was, without a jump), the weights, the
AdamW moments and the data position (``data_position``: no sample of an epoch trained twice, none
left out). What each change takes:

- the stream's layout (world size, batch size, data workers, shuffle buffer) changed: the stream is
  resharded from the checkpoint's record of what was trained; unchanged, it is replayed exactly;
- DeepSpeed at another world size: the checkpoint is converted once into DeepSpeed's universal
  format (``deepspeed.checkpoint.ds_to_universal``, into ``ds/state_universal/`` beside the
  original, renamed into place when complete) and loaded with ``checkpoint.load_universal``;
- single process and DDP: the checkpoint (whole weights and optimizer state, safetensors) fits
  any world size as it is;
- DeepSpeed against DDP or a single process, or another ZeRO stage: not honoured, one line that
  says what to do instead (``ValueError``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import SimpleNamespace

log = logging.getLogger(__name__)

UNIVERSAL_TAG = "state_universal"  # DeepSpeed's universal checkpoint, under the checkpoint's ds/
STREAM_FIELDS = ("world", "batch_size", "num_workers", "shuffle_buffer")  # what the stream's order depends on


@dataclass(frozen=True)
class Layout:
    """How a run is laid out across processes and batches (recorded in every checkpoint)."""

    engine: str = "single"  # single | ddp | deepspeed
    zero_stage: int = 0
    world: int = 1
    batch_size: int = 1  # per rank
    grad_accum: int = 1
    num_workers: int = 0
    shuffle_buffer: int = 0

    @property
    def global_batch(self) -> int:
        """Samples an optimizer step takes, all ranks together."""
        return self.world * self.batch_size * self.grad_accum

    def describe(self) -> str:
        engine = f"DeepSpeed ZeRO-{self.zero_stage}" if self.engine == "deepspeed" else {"ddp": "DDP", "single": "one process"}.get(self.engine, self.engine)
        return f"{engine}, {self.world} rank(s) x batch {self.batch_size} x accumulation {self.grad_accum}"

    @classmethod
    def from_state(cls, state: dict) -> Layout:
        """The layout a checkpoint's ``state.json`` records; one written before layouts were
        recorded gives its world size and engine, the rest unknown (taken as unchanged)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in state.get("layout", {"engine": state.get("engine", "single"), "world": state.get("world", 1)}).items() if k in known})

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class ResumePlan:
    """What a resume on ``now`` from a checkpoint written on ``saved`` does."""

    saved: Layout
    now: Layout
    universal: bool  # DeepSpeed: load through the universal checkpoint
    reshard: bool  # the data stream is resharded (its layout changed), not replayed
    changes: list[str]

    def log_choice(self, step: int, tokens: int, lr: float) -> None:
        if not self.changes:
            return
        log.info("resume on another layout (%s): %s -> %s", ", ".join(self.changes), self.saved.describe(), self.now.describe())
        log.info(
            "resume: step %d and %d tokens carry over; the learning-rate schedule goes on by step (%.3g for step %d, no jump); %d samples a step from now on (were %d); data stream %s; %s",
            step, tokens, lr, step + 1, self.now.global_batch, self.saved.global_batch,
            "resharded from the checkpoint's record of what was trained (no sample of an epoch twice)" if self.reshard else "replayed (its layout is unchanged)",
            "weights and optimizer state through DeepSpeed's universal checkpoint" if self.universal else "weights and optimizer state as saved",
        )


def plan_resume(state: dict, now: Layout, checkpoint: Path) -> ResumePlan:
    """Compare the layout checkpoint ``checkpoint`` (its ``state.json`` is ``state``) was written
    on with ``now``.

    Raises:
        ValueError: a change that cannot be honoured (one line: what to do instead).
    """
    saved = Layout.from_state(state)
    recorded = "layout" in state
    if (saved.engine == "deepspeed") != (now.engine == "deepspeed"):
        hint = f"--deepspeed configs/deepspeed/zero{saved.zero_stage or 3}.json (any number of ranks)" if saved.engine == "deepspeed" else "no --deepspeed (torchrun or python, any number of ranks)"
        raise ValueError(f"checkpoint {checkpoint} was written by {saved.describe()}, this run is {now.describe()}: resume with {hint}, or start a new run from its weights (launch/consolidate.py, then --set init_from=DIR)")
    if now.engine == "deepspeed" and recorded and saved.zero_stage != now.zero_stage:
        raise ValueError(f"checkpoint {checkpoint} was written under ZeRO-{saved.zero_stage}, this run asks for ZeRO-{now.zero_stage}: resume with configs/deepspeed/zero{saved.zero_stage}.json, or start a new run from its weights (launch/consolidate.py, then --set init_from=DIR)")
    changes = [f"{name} {getattr(saved, name)} -> {getattr(now, name)}" for name in ("world", "batch_size", "grad_accum", "num_workers", "shuffle_buffer") if (recorded or name == "world") and getattr(saved, name) != getattr(now, name)]
    reshard = any((recorded or name == "world") and getattr(saved, name) != getattr(now, name) for name in STREAM_FIELDS)
    if reshard and "data" not in state:
        raise ValueError(f"checkpoint {checkpoint} was written by an older fourm without a world-size-independent data position: resume it on its own layout ({saved.describe()})")
    return ResumePlan(saved, now, universal=now.engine == "deepspeed" and saved.world != now.world, reshard=reshard, changes=changes)


def universal_checkpoint(ds_dir: Path) -> Path:
    """DeepSpeed's universal form of the checkpoint ``ds_dir/state`` (made once, on the calling
    rank: call it on rank 0 with the others waiting at a barrier): converted into a temp folder by
    ``deepspeed.checkpoint.ds_to_universal`` and renamed to ``ds_dir/state_universal`` when complete;
    returns that folder."""
    out = ds_dir / UNIVERSAL_TAG
    if out.is_dir():
        return out
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    from fourm.training.engine import weights_only_torch_load

    tmp = ds_dir / f".tmp-{UNIVERSAL_TAG}"
    shutil.rmtree(tmp, ignore_errors=True)
    args = SimpleNamespace(input_folder=str(ds_dir / "state"), output_folder=str(tmp), num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    chatter = io.StringIO()  # ds_to_universal prints its progress: kept for the debug log
    with weights_only_torch_load(), contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
        ds_to_universal(args)
    log.debug("ds_to_universal: %s", chatter.getvalue())
    os.replace(tmp, out)
    log.info("converted %s to DeepSpeed's universal checkpoint %s", ds_dir / "state", out)
    return out
