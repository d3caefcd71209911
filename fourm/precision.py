"""Where bfloat16 autocast pays, and the one autocast every training and tokenizer path uses.

bfloat16 is the fast path on CUDA (where the GPU supports it) and on CPUs with native bfloat16
instructions (AVX512-BF16 or AMX: 2x to 6x fp32 matmul speed). On a CPU without them (AVX2 only)
PyTorch's bfloat16 matmuls and convolutions fall back to reference kernels, measured here at
0.26 GFLOP/s against fp32's 100 GFLOP/s: 400x slower. So a ``bf16: true`` setting means "bf16 where
it is native": such CPUs run float32, with one warning. ``FOURM_CPU_BF16=1`` forces bfloat16 on any
CPU, ``FOURM_CPU_BF16=0`` turns it off everywhere on CPU.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os

import torch

log = logging.getLogger(__name__)
ENV = "FOURM_CPU_BF16"


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX tiles (what PyTorch's own dispatch checks), unless ``FOURM_CPU_BF16`` says."""
    forced = os.environ.get(ENV, "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return True
    if forced in ("0", "false", "no", "off"):
        return False
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


@functools.lru_cache(maxsize=None)
def _warn_once() -> None:
    log.warning("this CPU has no native bfloat16 (AVX512-BF16/AMX; capability %s): running float32 instead of bf16 autocast (%s=1 forces bf16)",
                torch.backends.cpu.get_cpu_capability(), ENV)


def bf16_ok(device_type: str) -> bool:
    """Whether bfloat16 autocast is the fast path on this device type (``cpu`` or ``cuda``)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return cpu_has_native_bf16()


def autocast_dtype(device_type: str, wanted: bool = True) -> torch.dtype | None:
    """``torch.bfloat16`` when it is wanted and fast here, else None (float32; warns once on CPU)."""
    if not wanted:
        return None
    if bf16_ok(device_type):
        return torch.bfloat16
    if device_type == "cpu":
        _warn_once()
    return None


def autocast(device_type: str, wanted: bool = True):
    """A bf16 autocast context where ``autocast_dtype`` says so, else a no-op context."""
    dtype = autocast_dtype(device_type, wanted)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)
