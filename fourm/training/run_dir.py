"""The run directory (``--out``): checked before training starts, rewound when a run resumes.

- ``check_writable``: the directory can be created and written (fails in seconds, not after an hour).
- ``check_free_space``: the disk holds the checkpoints the run keeps, plus the one being written and
  the final model (``checkpoint_bytes`` estimates one from the parameter count, ``bytes_needed``
  adds them up).
- ``rewind_metrics``: ``metrics.jsonl`` back to the step a run (re)starts from, so that steps logged
  after the last checkpoint of a killed run are not counted twice; a torn last line is dropped.
Small files (config, summary, the rewound log) are written whole or not at all with
``fourm.data.shards.write_text_atomic``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from fourm.data.shards import write_text_atomic


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

