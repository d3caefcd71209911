"""The run directory (``--out``): checked before training starts, rewound when a run resumes.

- ``check_writable``: the directory can be created and written (fails in seconds, not after an hour).
- ``check_free_space``: the disk holds the checkpoints the run keeps, plus the one being written and
  the final model (``checkpoint_bytes`` estimates one from the parameter count, ``bytes_needed``
  adds them up).
- ``rewind_metrics``: ``metrics.jsonl`` back to the step a run (re)starts from, so that steps logged
  after the last checkpoint of a killed run are not counted twice; a torn last line is dropped.
- ``model_spec``: the model config a run builds; a resumed run keeps the one it started with
  (``model_spec.json``), so a preset edited in between does not change the model half-way.
Small files (config, summary, the rewound log) are written whole or not at all with
``fourm.data.shards.write_text_atomic``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from fourm.data.shards import write_text_atomic

log = logging.getLogger(__name__)

MODEL_SPEC = "model_spec.json"  # the resolved model config (preset + overrides) a run was built from


def check_writable(out: Path) -> None:
    """Create ``out`` and write a probe file in it.

    Raises:
        ValueError: the directory cannot be created or written (read-only, a file in the way, ...).
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-probe-") as probe:
            probe.write(b"probe")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exn:
        raise ValueError(f"output directory {out} is not writable: {exn.strerror or exn}") from None


def checkpoint_bytes(model: torch.nn.Module) -> int:
    """Bytes of one checkpoint: fp32 weights, plus two AdamW moments for each trainable weight."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return 4 * (total + 2 * trainable)


def bytes_under(path: Path) -> int:
    """Bytes of the files under ``path`` (0 when absent)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def bytes_needed(out: Path, one_checkpoint: int, kept: int, final: int) -> int:
    """More bytes the run will write to ``out``: ``kept`` checkpoints plus the one being written,
    and the final model, less what its earlier checkpoints and final model (a resumed run's) hold
    already, for those are replaced; at least one checkpoint."""
    already = bytes_under(out / "checkpoints") + bytes_under(out / "final")
    return max(one_checkpoint, (kept + 1) * one_checkpoint + final - already)


def check_free_space(out: Path, need: int) -> None:
    """Raises ValueError when the disk under ``out`` has fewer than ``need`` bytes free."""
    free = shutil.disk_usage(out).free
    if free < need:
        raise ValueError(f"only {free / 2**20:.1f} MiB free under {out}; the run needs about {need / 2**20:.1f} MiB (checkpoints kept + the one being written + the final model): free space or choose another --out")


def rewind_metrics(path: Path, step: int) -> int:
    """Keep the records of ``metrics.jsonl`` with ``step <= step`` (and only whole JSON lines);
    rewritten atomically. Returns the number of records dropped."""
    if not path.is_file():
        return 0
    text = path.read_text()
    kept, dropped = [], 0
    for line in text.splitlines():
        try:
            record = json.loads(line)
            keep = isinstance(record, dict) and int(record["step"]) <= step
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += bool(line.strip())
    if dropped or not text.endswith("\n"):  # no torn line for the next record to run into
        write_text_atomic(path, "".join(line + "\n" for line in kept))
    return dropped



def model_spec(out: Path, current: dict, overrides: dict, resuming: bool) -> dict:
    """The model config a run builds.

    Args:
        out: the run directory.
        current: the preset YAML with this command's ``model`` overrides on top
            (``TrainConfig.model_spec()``).
        overrides: this command's explicit ``model`` overrides (``--set model.KEY=VALUE``).
        resuming: the run continues from a checkpoint in ``out``.
    Returns:
        ``current`` for a fresh run. A resumed run gets the config it was started with
        (``out/model_spec.json``) with ``overrides`` on top: a preset edited since (a pulled change
        of a default, say) does not change the model half-way, and the keys where it now differs
        are logged. A run started before this file existed resumes with ``current``.
    Raises:
        ValueError: ``model_spec.json`` is unreadable or not a JSON object.
    """
    path = out / MODEL_SPEC
    if not resuming:
        return current
    if not path.is_file():
        log.warning("%s is missing (a run started by an older fourm): resuming with the current preset", path)
        return current
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as exn:
        raise ValueError(f"{path} is unreadable ({exn}): restore it, or remove it to resume with the current preset") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{path} is not a JSON object: restore it, or remove it to resume with the current preset")
    spec = {**saved, **overrides}
    changed = sorted(k for k in set(spec) | set(current) if spec.get(k) != current.get(k))
    if changed:
        log.warning("the model preset differs from the config this run started with (%s); the run keeps its own: %s (--set model.KEY=VALUE on --resume changes one)", path, ", ".join(f"{k}={spec.get(k)!r} (preset now {current.get(k)!r})" for k in changed))
    return spec
