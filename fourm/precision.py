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

A matmul is not the workload: on a 2-core AMD EPYC with AVX512-BF16 a 512^3 bf16 matmul ran 2.5x
fp32's speed, yet the demo's encoder-decoder trained at 2,404 tokens/s in bf16 against 3,266 in
fp32. So the training paths (the model, the image tokenizers, the judge) decide with
``choose_autocast``: a few steps of the real workload in each dtype, taking turns, once per
workload per process, the figures logged. The matmul probe remains for the paths that have no
step of their own to time (tokenizer inference, the speed benchmarks).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)
ENV = "FOURM_CPU_BF16"
PAYS = 1.2  # bf16 / fp32 matmul speed from which bf16 autocast is used on CPU
WORKLOAD_PAYS = 1.05  # fp32 / bf16 seconds of a real step from which bf16 is chosen (a tie keeps fp32's precision)


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
    return autocast_for(device_type, autocast_dtype(device_type, wanted))


# -- deciding by timing the workload itself --------------------------------------------------------
@dataclass(frozen=True)
class PrecisionChoice:
    """What ``choose_autocast`` decided for one workload, and why (``reason``: timed, forced,
    not wanted, no native bf16, cuda). ``fp32_s`` / ``bf16_s``: median seconds of one step (timed only)."""

    workload: str
    dtype: torch.dtype | None
    reason: str
    fp32_s: float | None = None
    bf16_s: float | None = None

    def describe(self) -> str:
        chosen = "bf16 autocast" if self.dtype is torch.bfloat16 else "float32"
        if self.reason == "timed":
            return f"{self.workload}: a step {self.bf16_s * 1e3:.1f} ms in bf16 against {self.fp32_s * 1e3:.1f} ms in fp32: {chosen}"
        return f"{self.workload}: {chosen} ({self.reason})"


def time_steps(step: Callable[[torch.dtype | None, int], object], rounds: int = 8, timer: Callable[[], float] = time.perf_counter) -> tuple[float, float]:
    """Median seconds of ``step(None, i)`` (float32) and ``step(torch.bfloat16, i)`` over rounds
    i = 1..rounds, after an untimed warm-up of each (i = 0). ``i`` picks the batch: a workload whose
    shapes vary from batch to batch must be timed on batches it has not seen, since oneDNN's bf16
    kernels are built per shape (the demo's encoder-decoder on an AMX Xeon: bf16 240 ms a step on a
    batch seen before, 340 ms on new ones, fp32 280 ms either way). The two take turns in every
    round, so a burst of other load slows both; eight rounds, since four were not enough (the demo's
    model timed 427 ms in fp32 against 372 in bf16 once, and trains at 3,971 against 2,471 tokens/s)."""
    step(None, 0)
    step(torch.bfloat16, 0)
    times: dict[object, list[float]] = {None: [], torch.bfloat16: []}
    for i in range(1, rounds + 1):
        for dtype in times:
            start = timer()
            step(dtype, i)
            times[dtype].append(timer() - start)
    return statistics.median(times[None]), statistics.median(times[torch.bfloat16])


_CHOICES: dict[str, PrecisionChoice] = {}


def choose_autocast(device_type: str, wanted: bool, workload: str, step: Callable[[torch.dtype | None, int], object], rounds: int = 8, timer: Callable[[], float] = time.perf_counter) -> PrecisionChoice:
    """Whether ``workload`` runs under bf16 autocast here, decided by timing ``step(dtype, i)`` (one
    forward + backward of the real thing on its i-th batch, under ``autocast_for(device_type,
    dtype)``) both ways (``time_steps``).

    Not timed: when bf16 is not ``wanted``; on CUDA (bf16 where the GPU supports it); when
    ``FOURM_CPU_BF16`` forces it; on a CPU without native bfloat16 (hundreds of times slower,
    warned once). Timed choices are cached per ``workload`` name for the process. Every decision
    is logged."""
    if not wanted:
        return PrecisionChoice(workload, None, "not wanted")
    if device_type == "cuda":
        return PrecisionChoice(workload, torch.bfloat16 if bf16_ok("cuda") else None, "cuda")
    forced = _forced()
    if forced is not None:
        if not forced:
            _warn_once()
        choice = PrecisionChoice(workload, torch.bfloat16 if forced else None, f"forced by {ENV}")
    elif not cpu_has_native_bf16():
        _warn_once()
        choice = PrecisionChoice(workload, None, "no native bf16")
    elif workload in _CHOICES:
        return _CHOICES[workload]
    else:
        fp32, bf16 = time_steps(step, rounds=rounds, timer=timer)
        choice = PrecisionChoice(workload, torch.bfloat16 if fp32 / max(bf16, 1e-12) >= WORKLOAD_PAYS else None, "timed", fp32, bf16)
    log.info("precision: %s", choice.describe())
    if choice.reason == "timed":  # the others are cheap to decide again, and follow the environment
        _CHOICES[workload] = choice
    return choice


class StepTrial:
    """Confirms a timed choice on the run's own training steps, where a probe of a few steps can
    mislead (a burst of other load during its seconds; kernels built for shapes the probe never
    met; the optimizer and the data loader, which it leaves out). After ``settle`` steps in the
    chosen dtype, ``blocks`` blocks of ``block`` steps alternate between the other dtype and the
    chosen one (so a burst of load slows both); then the dtype of the lower median seconds per
    token is kept, bf16 only where fp32 takes ``WORKLOAD_PAYS`` times as long, as the probe decides.
    Every step is a real training step: the cost is the other dtype's extra time over its
    ``blocks // 2 * block`` steps.

    ``dtype()``: the dtype the next step runs in; ``record(seconds, tokens)`` after it;
    ``decided``: the trial is over and ``dtype()`` is the kept one."""

    def __init__(self, chosen: torch.dtype | None, settle: int = 10, block: int = 15, blocks: int = 4):
        if settle < 0 or block < 1 or blocks < 2 or blocks % 2:
            raise ValueError(f"a step trial needs settle >= 0, block >= 1 and an even blocks >= 2, got {settle}, {block}, {blocks}")
        self.chosen, self.other = chosen, (None if chosen is torch.bfloat16 else torch.bfloat16)
        self.settle, self.block, self.blocks = settle, block, blocks
        self.steps = 0
        self.per_token: dict[object, list[float]] = {None: [], torch.bfloat16: []}
        self.kept: torch.dtype | None = chosen
        self.decided = False

    def dtype(self) -> torch.dtype | None:
        if self.decided or self.steps < self.settle:
            return self.kept
        return self.other if (self.steps - self.settle) // self.block % 2 == 0 else self.chosen

    def record(self, seconds: float, tokens: int) -> None:
        if self.decided:
            return
        if self.steps >= self.settle:
            self.per_token[self.dtype()].append(seconds / max(tokens, 1))
        self.steps += 1
        if self.steps >= self.settle + self.block * self.blocks:
            fp32, bf16 = self.medians()
            self.kept = torch.bfloat16 if fp32 / max(bf16, 1e-15) >= WORKLOAD_PAYS else None
            self.decided = True

    def medians(self) -> tuple[float, float]:
        """Median seconds per token so far in fp32 and in bf16 (inf where none)."""
        return tuple(statistics.median(self.per_token[d]) if self.per_token[d] else float("inf") for d in (None, torch.bfloat16))


def training_step(module: torch.nn.Module, loss_of: Callable[[int], torch.Tensor], device_type: str = "cpu") -> Callable[[torch.dtype | None, int], None]:
    """``step(dtype, i)`` for ``choose_autocast``: ``loss_of(i)`` (the i-th probe batch's loss) under autocast to ``dtype``, backward,
    ``module``'s gradients cleared, its buffers (a VQ codebook's EMA) and torch's RNG put back: a
    probe changes no later result."""

    def step(dtype: torch.dtype | None, i: int) -> None:
        rng = torch.get_rng_state()
        buffers = [(b, b.detach().clone()) for b in module.buffers()]
        with autocast_for(device_type, dtype):
            loss = loss_of(i)
        loss.backward()
        module.zero_grad(set_to_none=True)
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        torch.set_rng_state(rng)

    return step


def autocast_for(device_type: str, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype``, or a no-op context for None (float32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)
