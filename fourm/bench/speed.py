"""Speed measurements for ``eval/bench.py``: each returns plain numbers, timed with
``time.perf_counter`` after a warm-up, best of ``repeats``."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from fourm.generation.api import GenerationConfig, generate_ids
from fourm.models import layers
from fourm.models.build import build_model
from fourm.precision import autocast
from fourm.sequence import pack_sequence
from fourm.vocab import SharedVocab

REPO = Path(__file__).resolve().parents[2]
BENCH_SPACES = {"text": 512, "box_coords": 1000, "rgb": 1000, "depth": 1000, "semseg": 1000}


def _best(fn, repeats: int) -> float:
    return _best_interleaved([fn], repeats)[0]


def _rounds(fns: list, repeats: int) -> list[list[float]]:
    """Seconds of each call, rounds[r][i] for function i in round r, the functions taking turns
    (after one warm-up call each) so that a slow spell of a shared machine hits them alike."""
    for fn in fns:
        fn()
    rounds = []
    for _ in range(repeats):
        times = []
        for fn in fns:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        rounds.append(times)
    return rounds


def _best_of(rounds: list[list[float]]) -> list[float]:
    """Best time of each function over ``_rounds``' rounds."""
    return [min(column) for column in zip(*rounds)]


def _best_interleaved(fns: list, repeats: int) -> list[float]:
    """Best time of each function over ``_rounds``."""
    return _best_of(_rounds(fns, repeats))


def _paired(rounds: list[list[float]], slow: int, fast: int) -> float:
    """How many times faster function ``fast`` ran than ``slow``: the median over rounds of the
    ratio of their times in one round. On a VM whose speed drifts by a fifth from one step to
    the next, this is steadier than the ratio of best times (calls of one round see the same
    spell)."""
    return statistics.median(r[slow] / r[fast] for r in rounds)


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
    is one encoder and one decoder pass. A model that reads rgb as pixels (``rgb_pixels``, the
    preset's) gets, as ``generate`` gives it, the fixed tokens' patches from the rgb tokenizer's
    decode of each step's estimate: an untrained tokenizer of the demo's shape
    (``configs/tokenizers/rgb.yaml``); ``rgb_decodes`` counts its calls in one generation (each
    decodes the whole batch)."""
    from fourm.tokenizers.image import ImageTokenizer
    from fourm.tokenizers.training import load_training_config

    vocab = SharedVocab.build(BENCH_SPACES)
    torch.manual_seed(0)
    model = build_model(preset, vocab=vocab).eval()
    caption = [vocab.to_global("text", torch.randint(0, 512, (24,))) for _ in range(batch)]
    cfg = GenerationConfig(temperature=1.0, steps=steps)
    calls = {"n": 0, "decodes": 0}
    forward = model.decode

    def counting(*a, **k):
        calls["n"] += 1
        return forward(*a, **k)

    model.decode = counting
    to_pixels = None
    if getattr(model.config, "rgb_pixels", False):
        rgb = ImageTokenizer(load_training_config(REPO / "configs" / "tokenizers" / "rgb.yaml", [])[1].tokenizer).eval()

        def to_pixels(m, ids):  # ids (B, N) -> (B, 3, R, R) uint8, as ``generate``'s
            calls["decodes"] += 1
            return rgb.decode(vocab.to_local(m, ids))

    seconds = _best(lambda: generate_ids(model, vocab, {"rgb": 8}, {"caption": caption}, ["rgb"], cfg, to_pixels=to_pixels), repeats)
    passes = calls["n"] // (repeats + 1)
    return {"batch": batch, "steps": steps, "decoder_passes_per_image": passes, "rgb_decodes": calls["decodes"] // (repeats + 1), "ms_per_image": 1000 * seconds / batch, "images_per_s": batch / seconds}


# -- training, data and the machine's peak ---------------------------------------------------------
def matmul_peak_tflops(dtype: str = "bfloat16", n: int = 4096, repeats: int = 3) -> float:
    """TFLOP/s of one large square matmul: the physical limit MFU is read against (timed as the
    training dtype's probe times it, ``fourm.precision.matmul_seconds``)."""
    from fourm.precision import matmul_seconds

    return 2 * n**3 / matmul_seconds([getattr(torch, dtype)], n, repeats)[0] / 1e12


def untrained_tokenizer_set(raw_dir: Path):
    """A small, untrained TokenizerSet: a text tokenizer fitted to ``raw_dir``'s captions and box
    labels, and randomly initialised image tokenizers (for benchmarks and tests that need token
    shards but not trained tokenizers)."""
    from fourm.data.loader import LoaderConfig, build_loader
    from fourm.tokenizers.image import ImageTokenizer, ImageTokenizerConfig
    from fourm.tokenizers.text import TextTokenizer, TextTokenizerConfig
    from fourm.tokenizers.tokenizer_set import TokenizerSet

    loader, _ = build_loader(raw_dir, LoaderConfig(modalities=("caption", "boxes"), batch_size=256, shuffle=0, num_workers=0))
    batch = next(iter(loader))
    text = TextTokenizer.train(batch["caption"] + [b["label"] for boxes in batch["boxes"] for b in boxes], TextTokenizerConfig(min_frequency=1))
    torch.manual_seed(0)
    images = {m: ImageTokenizer(ImageTokenizerConfig(modality=m, channels=[8, 16, 16])).eval() for m in ("rgb", "depth", "semseg")}
    return TokenizerSet(text=text, images=images)


def untrained_token_shards(root: Path, scenes: int = 256) -> Path:
    """Render ``scenes`` scenes and pretokenize them with ``untrained_tokenizer_set``."""
    from fourm.data.synth.generate import generate_dataset
    from fourm.tokenizers.pretokenize import pretokenize

    root = Path(root)
    generate_dataset(root / "raw", scenes, res=64, seed=3, shard_size=max(1, scenes // 4), workers=1, progress=False)
    untrained_tokenizer_set(root / "raw").save_pretrained(root / "tok")
    pretokenize(root / "tok", root / "raw", root / "tokens", shard_size=max(1, scenes // 4), progress=False)
    return root / "tokens"


def _stream(tokens_dir: Path, train_config: str, overrides: list[str]):
    """(TrainConfig, vocab, an endless batch iterator) over ``tokens_dir`` as the training loop reads it."""
    from fourm.config import load_config
    from fourm.training.data import DataSource, TokenStream, make_loader, manifest_context, pixel_sizes
    from fourm.training.loop import TrainConfig, token_manifest
    from fourm.training.shard_check import check_shards_fit

    cfg = load_config(TrainConfig, train_config, overrides)
    cfg.data.sources = [DataSource(path=str(tokens_dir))]
    manifest = token_manifest(cfg)
    check_shards_fit(manifest, str(tokens_dir), cfg.objective)
    vocab, grids, kinds = manifest_context(manifest)
    spec = cfg.model_spec()
    arch = spec["arch"]
    cfg.objective.validate(arch)
    pixels = bool(spec.get("rgb_pixels")) and "rgb" in pixel_sizes(manifest)  # as the training loop reads them
    return cfg, vocab, iter(make_loader(TokenStream(cfg.data, arch, vocab, kinds, grids, cfg.objective, pixels=pixels)))


def _optimizer_step(module, loss_fn):
    """A training step of ``module``: ``loss_fn()``, backward, AdamW, gradients cleared. The fused
    AdamW, as both our training loop and Hugging Face's Trainer (its default with torch >= 2.8) run it."""
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4, fused=True)

    def step():
        loss_fn().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _step_fn(model, batch: dict, shift: bool):
    """One training step (forward, loss, backward, AdamW) as the training loop does it: bf16
    autocast where native, the encoder-decoder's loss on its fast path (``loop.model_loss``)."""
    from types import SimpleNamespace

    from fourm.training.loop import model_loss

    inputs = {k: v for k, v in batch.items() if k not in ("labels", "label_modality")}

    def forward(b):
        with autocast("cpu"):
            return model(**b)

    return _optimizer_step(model, lambda: model_loss(SimpleNamespace(forward=forward), inputs, batch["labels"], batch["label_modality"], "decoder" if shift else "encdec", "token_mean", 0.0)[0])


def _flops(fn) -> float:
    """Matmul/attention FLOPs of one call (forward and backward), by PyTorch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def training_vs_hf(tokens_dir: Path, peak_tflops: float, repeats: int = 3, batch_size: int = 16, overrides: tuple = ("qk_norm=none",), compile: bool = False) -> dict:
    """Decoder-only training step, ours vs ``transformers.LlamaForCausalLM`` of the identical shape
    (the same weights through the Llama export), same batch, bf16 autocast both: tokens/s and MFU
    of the best of ``repeats`` steps, the ratios as the median of paired rounds (``_paired``).
    A model with ``modality_softmax`` (the presets') is also timed with the whole vocabulary's
    softmax -> ``whole_softmax``. ``compile``: also both through ``torch.compile`` (the training
    loop's ``compile: true``), all steps taking turns (the one-off compiles happen in the untimed
    warm-up) -> ``compiled``."""
    from fourm.models.hf import to_hf

    cfg, vocab, data = _stream(tokens_dir, "configs/train/tiny_decoder.yaml", [f"data.batch_size={batch_size}", "data.num_workers=0"])
    batch = next(data)
    torch.manual_seed(0)
    model = build_model(cfg.model_spec(), vocab=vocab, overrides=list(overrides)).train()
    hf = to_hf(model).train()
    hf_batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": batch["labels"]}

    def hf_step_fn(module):
        def loss():
            with autocast("cpu"):
                return module(**hf_batch).loss

        return _optimizer_step(module, loss)

    ours_step, hf_step = _step_fn(model, batch, shift=True), hf_step_fn(hf)
    per_modality = model.config.modality_softmax
    # the reference: the same model with Chameleon's softmax over the whole vocabulary, as HF's Llama computes it
    steps = [ours_step, hf_step] + ([_with_setting(model.config, "modality_softmax", False, ours_step)] if per_modality else [])
    if compile:
        steps += [_step_fn(torch.compile(model), batch, shift=True), hf_step_fn(torch.compile(hf))]
    rounds = _rounds(steps, repeats)
    times = _best_of(rounds)
    n = int(batch["attention_mask"].sum())
    flops, hf_flops = _flops(ours_step), _flops(hf_step)  # the eager steps: compiling leaves the FLOPs as they are
    out = {"batch": batch_size, "seq_len": int(batch["input_ids"].shape[1]), "tokens": n, "ours_tokens_per_s": n / times[0], "hf_tokens_per_s": n / times[1], "speedup": _paired(rounds, 1, 0),
           "ours_mfu": flops / times[0] / (peak_tflops * 1e12), "hf_mfu": hf_flops / times[1] / (peak_tflops * 1e12), "modality_softmax": per_modality}
    if per_modality:  # the same model with Chameleon's softmax over the whole vocabulary
        out["whole_softmax"] = {"ours_tokens_per_s": n / times[2], "speedup": _paired(rounds, 1, 2), "modality_softmax_speedup": _paired(rounds, 2, 0)}
    if compile:
        c = 3 if per_modality else 2
        out["compiled"] = {"ours_tokens_per_s": n / times[c], "hf_tokens_per_s": n / times[c + 1], "speedup": _paired(rounds, c + 1, c), "speedup_vs_hf_eager": _paired(rounds, 1, c),
                           "ours_mfu": flops / times[c] / (peak_tflops * 1e12), "hf_mfu": hf_flops / times[c + 1] / (peak_tflops * 1e12)}
    return out


def _with_setting(owner, name: str, value, step):
    """``step`` run with ``owner.name`` set to ``value`` and put back as it was afterwards: the
    benchmark's references (``layers.SKIP_PADDING`` off: what skipping padding pays; a config's
    ``modality_softmax`` off: what the per-modality softmax pays)."""

    def run():
        before = getattr(owner, name)
        setattr(owner, name, value)
        try:
            step()
        finally:
            setattr(owner, name, before)

    return run


def training_encdec(tokens_dir: Path, peak_tflops: float, repeats: int = 3, batch_size: int = 32) -> dict:
    """Encoder-decoder training step with the 4M objective, and the same model with plain
    next-token (no condition: every modality a target) for reference: tokens/s, MFU; each also
    with padding not skipped (``padded_tokens_per_s``, the two taking turns) and the batch's
    share of real tokens."""
    out = {}
    for name, objective in (("4m", "{4m: 1.0}"), ("next_token", "{next_token: 1.0}")):
        cfg, vocab, data = _stream(tokens_dir, "configs/train/tiny_encdec.yaml", [f"data.batch_size={batch_size}", "data.num_workers=0", f"objective.weights={objective}"])
        batch = next(data)
        torch.manual_seed(0)
        model = build_model(cfg.model_spec(), vocab=vocab).train()
        step = _step_fn(model, batch, shift=False)
        rounds = _rounds([step, _with_setting(layers, "SKIP_PADDING", False, step)], repeats)
        seconds, padded = _best_of(rounds)
        n = int(batch["enc_valid"].sum() + batch["dec_valid"].sum())
        out[name] = {"batch": batch_size, "tokens": n, "tokens_per_s": n / seconds, "mfu": _flops(step) / seconds / (peak_tflops * 1e12), "samples_per_s": batch_size / seconds,
                     "real_fraction": n / (batch["enc_valid"].numel() + batch["dec_valid"].numel()), "padded_tokens_per_s": n / padded, "skip_padding_speedup": _paired(rounds, 1, 0)}
    return out


def loader_samples_per_s(tokens_dir: Path, batches: int = 30, batch_size: int = 32, workers: int = 1) -> float:
    """The training loop's token-shard reader (decode + objective + collate), samples/s."""
    _, _, data = _stream(tokens_dir, "configs/train/tiny_encdec.yaml", [f"data.batch_size={batch_size}", f"data.num_workers={workers}"])
    next(data)
    start = time.perf_counter()
    for _ in range(batches):
        next(data)
    return batches * batch_size / (time.perf_counter() - start)


def tokenizer_images_per_s(tokenizer_dir: Path, batch: int = 64, repeats: int = 3) -> dict:
    """Encode rate of each image tokenizer of a set (uint8/float inputs of its resolution)."""
    from fourm.tokenizers.tokenizer_set import TokenizerSet

    tok = TokenizerSet.from_pretrained(tokenizer_dir)
    r = tok.resolution
    inputs = {"rgb": torch.randint(0, 256, (batch, 3, r, r), dtype=torch.uint8), "depth": torch.rand(batch, 1, r, r) * 20 + 1, "semseg": torch.randint(0, 5, (batch, r, r))}
    with torch.no_grad():
        return {m: batch / _best(lambda m=m: tok.encode(m, inputs[m]), repeats) for m in tok.images}


def tokenizer_dir_of(tokens_dir: Path) -> Path:
    """The tokenizer set a token-shard directory was made with (its manifest records it)."""
    manifest = json.loads((Path(tokens_dir) / "manifest.json").read_text())
    return Path(manifest["tokenizers"])


def zero3_parameter_memory(tokens_dir: Path, work: Path, timeout: float = 600, one_rank_run: bool = True) -> dict:
    """Parameter bytes per rank under DeepSpeed ZeRO-3 (gloo, ``DS_ACCELERATOR=cpu``) with 1 and
    2 ranks: one training step of the tiny encoder-decoder through ``launch/train.py``. Without
    ``one_rank_run`` (the tiny mode: each torchrun start costs ~45 s on 2 cores) the one-rank figure
    is the 2-rank run's whole-model parameter bytes, which is what a single rank holds."""
    import os
    import subprocess
    import sys

    summaries = {}
    for n in (1, 2) if one_rank_run else (2,):
        run_dir = Path(work) / f"zero3_{n}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port", str(29400 + os.getpid() % 500 + n), str(REPO / "launch" / "train.py"),
               "--config", str(REPO / "configs" / "train" / "tiny_encdec.yaml"), "--data", str(tokens_dir), "--out", str(run_dir), "--max-steps", "1",
               "--deepspeed", str(REPO / "configs" / "deepspeed" / "zero3.json"), "--set", "data.num_workers=0", "--set", "data.batch_size=2", "--quiet"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "DS_ACCELERATOR": "cpu"}, cwd=REPO)
        if proc.returncode != 0:
            raise RuntimeError(f"ZeRO-3 run with {n} rank(s) failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
        summaries[n] = json.loads((run_dir / "summary.json").read_text())
    two = summaries[2]["parameter_bytes_per_rank"]
    one = summaries[1]["parameter_bytes_per_rank"][0] if one_rank_run else summaries[2]["parameter_bytes_whole"]
    return {"one_rank_bytes": one, "one_rank": "measured" if one_rank_run else "whole model in the 2-rank run", "two_ranks_bytes": two, "ratio": max(two) / one}
