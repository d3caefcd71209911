"""Checkpoints: written atomically, the last K kept, found again by ``--resume``; survive ``kill -9``.

A checkpoint is a directory ``OUT/checkpoints/step-00000100/`` holding ``state.json`` (step,
tokens, data position, counters, and the size of every other file in it), ``model.safetensors``,
``optimizer.safetensors`` + ``optimizer.json`` (AdamW state without pickle) and one
``rng*.safetensors`` per rank; under DeepSpeed, the engine's own ``ds/`` folder instead of the model
and optimizer files.

Rules that make a kill at any moment harmless:
- it is written into ``.tmp-step-...``, files fsynced, ``state.json`` last, then renamed into place;
- ``--resume`` takes the newest directory whose ``state.json`` parses and whose listed files are all
  there with their recorded sizes (a half-written, half-deleted or truncated one is passed over
  with a warning, the one before it is used);
- a directory is only ever removed after being renamed out of the ``step-*`` namespace, and the
  previous checkpoints are pruned only after the new one is in place.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fourm.models.build import save_pretrained

log = logging.getLogger(__name__)

STATE = "state.json"
PATTERN = re.compile(r"^step-(\d{8})$")


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:08d}"


def temp_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f".tmp-step-{step:08d}"


def is_complete(directory: Path) -> bool:
    """True when ``state.json`` parses and every file it lists has its recorded size."""
    try:
        state = read_state(directory)
        files = state["files"]
        return all((directory / name).is_file() and (directory / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint (see ``is_complete``), or None."""
    root = out / "checkpoints"
    if not root.is_dir():
        return None
    for path in sorted((p for p in root.iterdir() if PATTERN.match(p.name)), reverse=True):
        if is_complete(path):
            return path
        log.warning("checkpoint %s is incomplete (killed while written or removed?); passed over", path)
    return None


def _fsync_tree(directory: Path) -> None:
    """Flush every file under ``directory`` and the directories themselves to disk."""
    for root, _, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    """Rename out of the ``step-*`` namespace, then delete (a kill midway leaves only trash)."""
    trash = path.parent / f".trash-{path.name}"
    if trash.exists():
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def replace_dir(tmp: Path, final: Path) -> None:
    """Put the finished directory ``tmp`` at ``final`` (an older ``final`` is removed first)."""
    _fsync_tree(tmp)
    if final.exists():
        _remove(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)



def write_model_dir(model: torch.nn.Module, tmp: Path, target: Path, vocab, tokenizers) -> None:
    """``model`` as a ``from_pretrained`` directory at ``target``, with ``tokenizers.json`` naming the
    tokenizer set: written into ``tmp`` and renamed into place when complete."""
    save_pretrained(model, tmp, vocab=vocab)
    (tmp / "tokenizers.json").write_text(json.dumps({"tokenizers": tokenizers}) + "\n")
    replace_dir(tmp, target)

def publish(tmp: Path, final: Path, keep: int) -> None:
    """Rename a finished temp checkpoint into place; keep the newest ``keep`` complete ones (all when
    ``keep`` <= 0), remove incomplete ones and leftover temp folders."""
    replace_dir(tmp, final)
    done = sorted(p for p in final.parent.iterdir() if PATTERN.match(p.name))
    complete = [p for p in done if is_complete(p)]
    for old in [p for p in done if p not in complete] + (complete[:-keep] if keep > 0 else []):
        _remove(old)
    for stale in list(final.parent.glob(".tmp-step-*")) + list(final.parent.glob(".trash-*")):
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


def _rng_file(directory: Path, rank: int) -> Path:
    return directory / ("rng.safetensors" if rank == 0 else f"rng.rank{rank}.safetensors")


def save_rng(directory: Path, rank: int = 0) -> None:
    """This rank's torch (and CUDA) random state."""
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    save_file(states, str(_rng_file(directory, rank)))


def load_rng(directory: Path, rank: int = 0) -> None:
    path = _rng_file(directory, rank)
    if path.is_file():
        states = load_file(str(path))
        torch.set_rng_state(states["torch"])
        if "cuda" in states and torch.cuda.is_available():
            torch.cuda.set_rng_state(states["cuda"])


def write_state(directory: Path, state: dict) -> None:
    """Record ``state`` and the size of every file written so far, flushed to disk; call last."""
    files = {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file() and p.name != STATE}
    _fsync_tree(directory)
    tmp = directory / (STATE + ".tmp")
    tmp.write_text(json.dumps({**state, "files": files}, indent=1) + "\n")
    os.replace(tmp, directory / STATE)


def read_state(directory: Path) -> dict:
    return json.loads((directory / STATE).read_text())
