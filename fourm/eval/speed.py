"""Speed measurements for ``eval/bench.py``: each returns plain numbers, timed with
``time.perf_counter`` after a warm-up, best of ``repeats``."""

from __future__ import annotations

import time

import torch

from fourm.generation.api import GenerationConfig, generate_ids
from fourm.models.build import build_model
from fourm.models.sequence import pack_sequence
from fourm.vocab import SharedVocab

BENCH_SPACES = {"text": 512, "box_coords": 1000, "rgb": 1000, "depth": 1000, "semseg": 1000}


def _best(fn, repeats: int) -> float:
    return _best_interleaved([fn], repeats)[0]


def _best_interleaved(fns: list, repeats: int) -> list[float]:
    """Best time of each function, the functions taking turns (after one warm-up call each) so
    that a slow spell of a shared machine hits them alike."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


@torch.no_grad()
def decoding_vs_hf(batch: int, new_tokens: int = 64, prompt: int = 24, preset: str = "configs/models/decoder_tiny.yaml", repeats: int = 3, overrides: tuple = ("qk_norm=none",), dtype: str = "float32", compile: bool = False) -> dict:
    """Greedy KV-cache decoding of ``new_tokens`` image tokens after a caption prompt: our decode
    loop vs ``transformers`` ``generate`` on the same weights (exported to LlamaForCausalLM), both
    models cast to ``dtype``; ``compile`` compiles our decoding step (its one-off compile time is
    reported apart, not counted in tokens/s). The token streams differ (fourm gives image tokens 2D
    RoPE positions, the Llama export 1D ones, and HF scores the whole vocabulary where fourm scores
    the rgb id range only); the work per token is the same transformer."""
    from fourm.models.hf import to_hf

    vocab = SharedVocab.build(BENCH_SPACES)
    torch.manual_seed(0)
    model = build_model(preset, vocab=vocab, overrides=list(overrides)).eval()
    hf = to_hf(model)
    model.to(getattr(torch, dtype))
    hf.to(getattr(torch, dtype))
    g = int(new_tokens**0.5)
    caption = [vocab.to_global("text", torch.randint(0, 512, (prompt,))) for _ in range(batch)]
    cfg = GenerationConfig(temperature=0.0, compile=compile)
    start = time.perf_counter()
    generate_ids(model, vocab, {"rgb": g}, {"caption": caption}, ["rgb"], cfg)
    first_call = time.perf_counter() - start
    packed = pack_sequence([("caption", caption[0])], vocab)
    ids = torch.cat([packed.ids, torch.tensor([vocab.begin_id("rgb")])])[None].repeat(batch, 1)
    mask = torch.ones_like(ids)

    def run_hf():
        return hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=g * g, min_new_tokens=g * g, do_sample=False, pad_token_id=0)

    ours, theirs = _best_interleaved([lambda: generate_ids(model, vocab, {"rgb": g}, {"caption": caption}, ["rgb"], cfg), run_hf], repeats)
    n = batch * g * g
    return {
        "batch": batch,
        "dtype": dtype,
        "compiled": compile,
        "new_tokens": g * g,
        "ours_tokens_per_s": n / ours,
        "hf_tokens_per_s": n / theirs,
        "speedup": theirs / ours,
        "first_call_s": first_call,
    }


@torch.no_grad()
def maskgit_images_per_s(batch: int = 8, steps: int = 8, preset: str = "configs/models/encdec_tiny.yaml", repeats: int = 3) -> dict:
    """Caption -> 64-token rgb image by MaskGIT with the encoder-decoder: ms per image; every step
    is one encoder and one decoder pass."""
    vocab = SharedVocab.build(BENCH_SPACES)
    torch.manual_seed(0)
    model = build_model(preset, vocab=vocab).eval()
    caption = [vocab.to_global("text", torch.randint(0, 512, (24,))) for _ in range(batch)]
    cfg = GenerationConfig(temperature=1.0, steps=steps)
    calls = {"n": 0}
    forward = model.decode

    def counting(*a, **k):
        calls["n"] += 1
        return forward(*a, **k)

    model.decode = counting
    seconds = _best(lambda: generate_ids(model, vocab, {"rgb": 8}, {"caption": caption}, ["rgb"], cfg), repeats)
    passes = calls["n"] // (repeats + 1)
    return {"batch": batch, "steps": steps, "decoder_passes_per_image": passes, "ms_per_image": 1000 * seconds / batch, "images_per_s": batch / seconds}
