"""One decoding step of the decoder-only model over static KV caches, eager or compiled.

Compiled (``GenerationConfig.compile``): ``torch.compile`` with Inductor's *freezing* (the weights
become constants), its C++ wrapper (less Python per step) and *max-autotune* of the matrix
products with Inductor's C++ GEMM template among the candidates: each of the step's one-row
products gets a kernel generated for its shape, with the weights laid out for it, chosen by timing
against the library call (on the 2-core AVX2 CPU: float32 decoding 3.62x / 2.53x HF ``generate``
at batch 1 / 8, from 1.85x / 1.79x with the library's packed GEMM; the one-off compile about
doubles; docs/generation.md). Every step has the same shapes (static caches, a one-token input), so it compiles
once per model, batch size and sequence capacity. Frozen weights are checked against the parameters'
version counters at each call: a model trained further after compiling is compiled again.
"""

from __future__ import annotations

import logging
import weakref

import torch

from fourm.models import layers

log = logging.getLogger(__name__)

_compiled = None
_frozen_versions: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[int, ...]]" = weakref.WeakKeyDictionary()
# max_autotune_gemm_backends "CPP,ATEN": Inductor's generated C++ GEMM against the library's
INDUCTOR_OPTIONS = {"freezing": True, "cpp_wrapper": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}
status = {"compiled_steps": 0, "recompiles_for_new_weights": 0, "failed": False}  # what happened, for tests and logs


def decode_step(model, ids: torch.Tensor, positions: torch.Tensor, cache_position: torch.Tensor, attention_mask: torch.Tensor, caches, span: tuple[int, int]) -> torch.Tensor:
    """ids (B, 1), positions (B, 1, 2), cache_position (1,), attention_mask (B, capacity) ->
    logits (B, hi - lo) over the target's id span."""
    return model(ids, positions=positions, attention_mask=attention_mask, past_key_values=caches, cache_position=cache_position, logits_span=span).logits[:, -1]


def _versions(model) -> tuple[int, ...]:
    return tuple(p._version for p in model.parameters())


def compiled_decode_step(model, *args) -> torch.Tensor:
    """``decode_step`` through ``torch.compile``; falls back to eager (with a warning) where
    Inductor cannot compile (for example no C++ compiler)."""
    global _compiled
    if status["failed"]:
        return decode_step(model, *args)
    import torch._dynamo
    import torch._inductor.config as inductor_config

    versions = _versions(model)
    if model in _frozen_versions and _frozen_versions[model] != versions:
        log.info("weights changed since the decoding step was compiled: compiling again")
        torch._dynamo.reset()
        _compiled = None
        status["recompiles_for_new_weights"] += 1
    if _compiled is None:
        _compiled = torch.compile(decode_step, dynamic=False)
    _frozen_versions[model] = versions
    try:
        layers.GATHER_SPAN_WEIGHT = True  # see its comment: a workaround for an Inductor bug
        try:
            with inductor_config.patch(INDUCTOR_OPTIONS):
                out = _compiled(model, *args)
        finally:
            layers.GATHER_SPAN_WEIGHT = False
        status["compiled_steps"] += 1
        return out
    except Exception as e:  # noqa: BLE001 - any compiler failure: decode eagerly instead
        status["failed"] = True
        log.warning("torch.compile failed (%s: %s); decoding without compiling", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return decode_step(model, *args)
