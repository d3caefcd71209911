"""Writing raw WebDataset shards and their manifest, safely.

Shards are written into a staging folder ``DIR/.staging-<pid>/`` and moved into place only when
the whole dataset is complete; ``manifest.json`` is written last (via rename). So a directory with
a manifest is a complete dataset, a failed or interrupted run leaves an existing dataset as it was,
and ``--overwrite`` replaces the old dataset only once the new one is whole. Tar headers carry fixed mtime,
owner and mode, so the same samples give the same bytes.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
from pathlib import Path

import webdataset as wds

from fourm.cli import UsageError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SHARD_PATTERN = "shard-{:06d}.tar"


def open_tar_writer(path: str | os.PathLike) -> wds.TarWriter:
    """A TarWriter with fixed mtime, owner and mode (the same samples give the same bytes)."""
    return wds.TarWriter(str(path), user="fourm", group="fourm", mode=0o444, mtime=0.0)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to a temp name next to ``path`` (per process), then rename: a kill leaves the
    old file or the new one, whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented JSON to ``path`` via a temp file and a rename (never half-written)."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_manifest(out: Path, manifest: dict) -> None:
    """Write ``out/manifest.json`` atomically."""
    write_json_atomic(Path(out) / MANIFEST, manifest)


def _dataset_files(out: Path) -> list[Path]:
    return sorted(out.glob("shard-*.tar")) + ([out / MANIFEST] if (out / MANIFEST).exists() else [])


def prepare_output_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Create ``out`` if needed; refuse (UsageError) to write over an existing dataset unless
    ``overwrite``. Nothing is deleted here (see ``ShardSink.finish``)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    old = _dataset_files(out) if out.is_dir() else []
    if old and not overwrite:
        raise UsageError(f"--out {out} already holds a dataset ({len(old)} files); pass --overwrite to replace it")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exn:
        raise UsageError(f"cannot create --out {out}: {exn.strerror}") from None
    return out


class ShardSink:
    """Write samples (dicts of member suffix -> bytes plus ``__key__``) into numbered shards.

    Use as a context manager; on an exception the open ``.tmp`` shard is removed and no
    manifest is written. Call ``finish(manifest)`` to write the manifest.
    """

    def __init__(self, out: Path, shard_size: int):
        self.out = Path(out)
        self.staging = self.out / f".staging-{os.getpid()}"
        self.staging.mkdir(parents=True, exist_ok=False)
        self.shard_size = shard_size
        self.shard_counts: list[int] = []
        self._writer: wds.TarWriter | None = None
        self._tmp: Path | None = None

    def __enter__(self) -> "ShardSink":
        return self

    def _open(self) -> None:
        name = SHARD_PATTERN.format(len(self.shard_counts))
        self._tmp = self.staging / name
        self._writer = open_tar_writer(self._tmp)
        self.shard_counts.append(0)

    def _close(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        self._tmp = None

    def write(self, sample: dict) -> None:
        if self._writer is None:
            self._open()
        assert self._writer is not None
        self._writer.write(sample)
        self.shard_counts[-1] += 1
        if self.shard_counts[-1] >= self.shard_size:
            self._close()

    @property
    def num_samples(self) -> int:
        return sum(self.shard_counts)

    def finish(self, manifest: dict) -> dict:
        """Close the last shard, move the shards into place, replacing any old dataset, and
        write ``manifest.json`` (with shard names and counts added)."""
        self._close()
        old_manifest = self.out / MANIFEST
        if old_manifest.exists():  # from here on the directory is not a complete dataset
            old_manifest.unlink()
        new_names = {SHARD_PATTERN.format(i) for i in range(len(self.shard_counts))}
        for stale in self.out.glob("shard-*.tar"):
            if stale.name not in new_names:
                stale.unlink()
        for name in sorted(new_names):
            os.replace(self.staging / name, self.out / name)
        shutil.rmtree(self.staging, ignore_errors=True)
        manifest = dict(manifest)
        manifest["num_samples"] = self.num_samples
        manifest["shards"] = [
            {"name": SHARD_PATTERN.format(i), "num_samples": n} for i, n in enumerate(self.shard_counts)
        ]
        write_manifest(self.out, manifest)
        return manifest

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            if self._writer is not None:
                try:
                    self._writer.close()
                except Exception:  # the staging folder goes anyway
                    pass
                self._writer = None
            shutil.rmtree(self.staging, ignore_errors=True)


def read_manifest(directory: str | os.PathLike) -> dict:
    """Load ``DIR/manifest.json``; UsageError naming the path when it is missing or malformed."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise UsageError(f"no dataset manifest at {path}")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exn:
        raise UsageError(f"cannot read {path}: {exn}") from None


def expand_shards(spec: str | os.PathLike | list) -> list[str]:
    """Shard paths from a directory (its ``shard-*.tar``), a brace pattern, a glob or a list."""
    if isinstance(spec, (list, tuple)):
        return [u for s in spec for u in expand_shards(s)]
    spec = str(spec)
    if "://" in spec or spec.startswith("pipe:"):
        import braceexpand

        return list(braceexpand.braceexpand(spec))
    if os.path.isdir(spec):
        urls = sorted(glob.glob(os.path.join(spec, "shard-*.tar")))
    elif "{" in spec:
        import braceexpand

        urls = list(braceexpand.braceexpand(spec))
    elif any(c in spec for c in "*?["):
        urls = sorted(glob.glob(spec))
    else:
        urls = [spec]
    return urls


def require_shards(spec, flag: str = "--data") -> list[str]:
    """``expand_shards`` for a program argument: UsageError naming ``flag`` when nothing exists there."""
    urls = [u for u in expand_shards(spec) if os.path.exists(u)]
    if not urls:
        raise UsageError(f"{flag} {spec}: no shards found")
    return urls
