"""Where bfloat16 autocast pays, and the one autocast every training and tokenizer path uses.

bfloat16 is the fast path on CUDA (where the GPU supports it) and on CPUs with AMX (about 6x fp32
matmul speed). On a CPU without native bfloat16 instructions (AVX2 only) PyTorch's bfloat16 matmuls
and convolutions fall back to reference kernels, measured here at 0.26 GFLOP/s against fp32's 100
GFLOP/s: 400x slower. AVX512-BF16 without AMX sits between: on one such 2-core VM a bf16 matmul ran
at half fp32's speed (0.17 against 0.32 TFLOP/s at 4096^3) and training at 2,355 tokens/s against
4,636. So on a CPU with native bfloat16 a short matmul probe (512^3, a few milliseconds, once per
process) decides: bf16 only where it is at least ``PAYS`` times faster. A ``bf16: true`` setting
means "bf16 where it pays": other CPUs run float32, with one warning. ``FOURM_CPU_BF16=1`` forces
bfloat16 on any CPU, ``FOURM_CPU_BF16=0`` turns it off everywhere on CPU.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Sequence

import torch

log = logging.getLogger(__name__)
ENV = "FOURM_CPU_BF16"
PAYS = 1.2  # bf16 / fp32 matmul speed from which bf16 autocast is used on CPU


def _forced() -> bool | None:
    forced = os.environ.get(ENV, "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return True
    if forced in ("0", "false", "no", "off"):
        return False
    return None


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX tiles (what PyTorch's own dispatch checks): the hardware's answer, which
    ``FOURM_CPU_BF16`` does not change (it forces ``cpu_bf16_pays``, the one switch)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def matmul_seconds(dtypes: Sequence[torch.dtype], n: int = 512, repeats: int = 5) -> list[float]:
    """Best of ``repeats`` timings of one n x n matmul in each of ``dtypes`` (after a warm-up), the
    dtypes taking turns in every round: a burst of other work on the machine (a data loader's
    workers starting) then slows them alike instead of one alone."""
    pairs = [(torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)) for dt in dtypes]
    for a, b in pairs:
        a @ b
    best = [float("inf")] * len(pairs)
    for _ in range(repeats):
        for i, (a, b) in enumerate(pairs):
            start = time.perf_counter()
            a @ b
            best[i] = min(best[i], time.perf_counter() - start)
    return best


@functools.lru_cache(maxsize=None)
def cpu_bf16_pays() -> bool:
    """Whether bf16 autocast is the fast path on this CPU: forced by ``FOURM_CPU_BF16``, else
    native bfloat16 and a bf16 matmul at least ``PAYS`` times as fast as fp32 (measured once)."""
    forced = _forced()
    if forced is not None:
        return forced
    if not cpu_has_native_bf16():
        return False
    fp32, bf16 = matmul_seconds([torch.float32, torch.bfloat16], repeats=10)
    pays = fp32 / bf16 >= PAYS
    log.info("bf16 matmul %.2f ms against fp32 %.2f ms (512^3): %s", bf16 * 1e3, fp32 * 1e3, "bf16 autocast" if pays else "float32")
    return pays


@functools.lru_cache(maxsize=None)
def _warn_once() -> None:
    if _forced() is False:
        log.warning("%s=0: running float32 instead of bf16 autocast", ENV)
    elif cpu_has_native_bf16():
        log.warning("bfloat16 is native on this CPU but not faster than float32 (no AMX; capability %s): running float32 instead of bf16 autocast (%s=1 forces bf16)",
                    torch.backends.cpu.get_cpu_capability(), ENV)
    else:
        log.warning("this CPU has no native bfloat16 (AVX512-BF16/AMX; capability %s): running float32 instead of bf16 autocast (%s=1 forces bf16)",
                    torch.backends.cpu.get_cpu_capability(), ENV)


def bf16_ok(device_type: str) -> bool:
    """Whether bfloat16 autocast is the fast path on this device type (``cpu`` or ``cuda``)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return cpu_bf16_pays()


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
