"""Typed configs: one dataclass per component; YAML files and ``--set key=value`` are overrides of it.

Unknown keys and wrong types are errors (OmegaConf structured configs), and so are values a
dataclass's ``__post_init__`` rejects with ValueError; all are reported as UsageError. An output
path named inside a config goes through ``output_path``: relative to the run directory, never
outside it.
"""

from __future__ import annotations

import os
from dataclasses import is_dataclass
from pathlib import Path
from typing import Sequence, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fourm.cli import UsageError

T = TypeVar("T")


def load_config(cls: type[T], source: str | os.PathLike | dict | None = None, overrides: Sequence[str] = ()) -> T:
    """Build ``cls`` from its defaults, then a YAML path or dict, then ``key=value`` overrides.

    Example:
        >>> cfg = load_config(DemoConfig, "configs/demo.yaml", ["data.res=128"])
    """
    assert is_dataclass(cls)
    try:
        merged = OmegaConf.structured(cls)
        if source is not None:
            if isinstance(source, dict):
                layer = OmegaConf.create(source)
            else:
                if not os.path.isfile(source):
                    raise UsageError(f"config file {source} does not exist")
                layer = OmegaConf.load(source)
            merged = OmegaConf.merge(merged, layer)
        for item in overrides:
            if "=" not in item:
                raise UsageError(f"--set expects key=value, got {item!r}")
        if overrides:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as exn:
        key = getattr(exn, "full_key", None)
        where = f" key {key}" if key else ""
        raise UsageError(f"bad config{where}: {str(exn).splitlines()[0]}") from None
    except ValueError as exn:  # a dataclass's own __post_init__ validation
        raise UsageError(f"bad config: {exn}") from None


def to_dict(config) -> dict:
    """A dataclass config as a plain dict (for saving next to outputs)."""
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)  # type: ignore[return-value]


def output_path(run_dir: str | os.PathLike, value: str, key: str) -> Path:
    """Where a config's output path ``value`` (named by ``key``) writes: inside ``run_dir``.

    An output path named in a config is relative to the run directory and stays inside it, so a
    config from someone else cannot make a run write elsewhere.

    Raises:
        UsageError: ``value`` is absolute or climbs out of the run directory (``..``).
    """
    if not isinstance(value, str) or os.path.isabs(value) or ".." in Path(value).parts:
        raise UsageError(f"{key}: output path {value!r} must be relative to the run directory and stay inside it (no absolute path, no '..')")
    return Path(run_dir) / value
