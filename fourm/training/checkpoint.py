"""Checkpoints: written atomically, the last K kept, found again by ``--resume``.

A checkpoint is a directory ``OUT/checkpoints/step-00000100/`` holding ``state.json`` (step,
tokens, data position, scheduler, config), ``model.safetensors``, ``optimizer.safetensors`` +
``optimizer.json`` (AdamW state without pickle) and ``rng.safetensors``; under DeepSpeed, the
engine's own ``ds/`` folder instead of the model and optimizer files. It is written into
``.tmp-step-...`` and renamed when complete, so a half-written checkpoint is never picked.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STATE = "state.json"
PATTERN = re.compile(r"^step-(\d{8})$")


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:08d}"


def temp_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f".tmp-step-{step:08d}"


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint (has ``state.json``), or None."""
    root = out / "checkpoints"
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if PATTERN.match(p.name) and (p / STATE).is_file())
    return done[-1] if done else None


def publish(tmp: Path, final: Path, keep: int) -> None:
    """Rename a finished temp checkpoint into place and prune all but the newest ``keep``."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    done = sorted(p for p in final.parent.iterdir() if PATTERN.match(p.name))
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in final.parent.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)


def optimizer_to_files(optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Optimizer state as safetensors (tensors) + JSON (everything else)."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{name}"] = value.detach().contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    save_file(tensors, str(directory / "optimizer.safetensors"))
    (directory / "optimizer.json").write_text(json.dumps({"param_groups": sd["param_groups"], "scalars": scalars}))


def optimizer_from_files(optimizer: torch.optim.Optimizer, directory: Path) -> None:
    meta = json.loads((directory / "optimizer.json").read_text())
    tensors = load_file(str(directory / "optimizer.safetensors"))
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_rng(directory: Path) -> None:
    save_file({"torch": torch.get_rng_state()}, str(directory / "rng.safetensors"))


def load_rng(directory: Path) -> None:
    path = directory / "rng.safetensors"
    if path.is_file():
        torch.set_rng_state(load_file(str(path))["torch"])


def write_state(directory: Path, state: dict) -> None:
    (directory / STATE).write_text(json.dumps(state, indent=1) + "\n")


def read_state(directory: Path) -> dict:
    return json.loads((directory / STATE).read_text())
