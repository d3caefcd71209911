"""``generate(model, tokenizers, inputs, targets, config)``: any subset of modalities in, any out.

Both architectures behind one API, batched. Targets are produced in the given order and each
finished target becomes a condition for the next (4M-style chaining: ``caption -> semseg -> depth
-> rgb``).

Encoder-decoder: image-like targets by MaskGIT (confidence-ordered unmasking on a cosine or linear
schedule) or ROAR (random order); the tokens fixed so far join the encoder input, the rest are
[MASK] queries. Sequence targets autoregressively with a decoder KV cache (the encoder runs once).
An encoder-decoder with ``rgb_pixels`` also reads an rgb condition's pixel patches: those of the
given image, or, for rgb known only as ids (generated, or passed as ids), of the ids decoded by the
rgb tokenizer (``to_pixels``); while an rgb target is generated, the tokens fixed so far get the
patches of the current estimate of the whole image, decoded.
Decoder-only: every target autoregressively with a KV cache after the packed conditions (image
tokens with their 2D positions). Classifier-free guidance batches the unconditional pass ([BOS]
as the null condition, as in training's condition dropout) with the conditional one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from fourm.generation.compiled import compiled_decode_step, decode_step
from fourm.generation.sampling import TEXT_TO_IMAGE, choice_scores, guided, sample, temperature_at, unmask_counts
from fourm.modalities import MODALITIES
from fourm.objectives.builders import image_patches
from fourm.sequence import pack_sequence
from fourm.tokenizers.pretokenize import PIXEL_MODALITIES
from fourm.tokenizers.tokenizer_set import TokenizerSet
from fourm.vocab import SharedVocab


@dataclass
class GenerationConfig:
    """Sampling controls; ``per_target`` overrides any of them for one modality
    (e.g. ``{"caption": {"temperature": 0.0}}``)."""

    scheme: str = "auto"  # auto | maskgit | roar | autoregressive
    steps: int = 8  # MaskGIT/ROAR steps per image target
    schedule: str = "cosine"  # cosine | linear
    temperature: float = 1.0
    temperature_end: float | None = None  # anneal to this over the steps
    # MaskGIT's randomised choice of which drawn tokens to fix: log-confidence plus Gumbel noise of
    # this scale, annealed linearly to 0 over the steps (MaskGIT: 4.5); 0: strictly by confidence
    choice_temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    cfg_scale: float = 0.0
    max_len: int = 96  # sequence targets
    seed: int = 0
    compile: bool = False  # decoder-only: torch.compile the decoding step (pays off from ~100 tokens)
    per_target: dict[str, dict] = field(default_factory=dict)

    def for_target(self, modality: str) -> "GenerationConfig":
        over = self.per_target.get(modality, {})
        unknown = set(over) - set(self.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown generation setting(s) for {modality}: {', '.join(sorted(unknown))}")
        return GenerationConfig(**{**{k: getattr(self, k) for k in self.__dataclass_fields__ if k != "per_target"}, **over})


def text_to_image_config(**over) -> GenerationConfig:
    """The caption -> rgb sampling of the evaluation suite, GenEval and the demo
    (``sampling.TEXT_TO_IMAGE``), with ``over`` replacing any of its settings."""
    return GenerationConfig(**{**TEXT_TO_IMAGE, **over})


def request_config(conditions, targets, **given) -> GenerationConfig:
    """A request's settings: ``given`` (``None`` values count as not given) over the defaults, and
    where the first target is rgb drawn from a caption alone, the text -> image settings for rgb in
    every control not given (``per_target["rgb"]``)."""
    config = GenerationConfig(**{k: v for k, v in given.items() if v is not None})
    targets = list(targets)
    if targets[:1] == ["rgb"] and set(conditions) == {"caption"}:
        config.per_target["rgb"] = {k: v for k, v in TEXT_TO_IMAGE.items() if given.get(k) is None}
    return config


@dataclass
class GenerationResult:
    """Per modality, per sample: shared-vocabulary ids and decoded raw values; for sequence targets
    also the probability the model gave each generated id (aligned with ``ids``; a decoded box's
    ``score`` is the geometric mean over its tokens)."""

    ids: dict[str, list[torch.Tensor]]
    outputs: dict[str, list]
    image_size: tuple[int, int]
    token_probs: dict[str, list[torch.Tensor]] = field(default_factory=dict)


def _kind(m: str) -> str:
    return MODALITIES[m].kind if m in MODALITIES else "image"


def encode_inputs(tokenizers: TokenizerSet, inputs: dict, image_size: tuple[int, int]) -> dict[str, list[torch.Tensor]]:
    """Raw batched inputs -> shared ids per modality per sample (``image_size`` places boxes)."""
    return {m: tokenizers.encode(m, raw, image_size=image_size) for m, raw in inputs.items()}


def _batch_size(inputs: dict) -> int:
    sizes = {len(v) for v in inputs.values()}
    if len(sizes) != 1:
        raise ValueError(f"inputs have different batch sizes: {sorted(sizes)}")
    return sizes.pop()


@torch.no_grad()
def generate(model, tokenizers: TokenizerSet, inputs: dict, targets: list[str], config: GenerationConfig | None = None, image_size: tuple[int, int] | None = None, batch_size: int | None = None, token_inputs: dict[str, list[torch.Tensor]] | None = None, progress: Callable[[int, str], None] | None = None) -> GenerationResult:
    """Generate ``targets`` in order from ``inputs`` (raw, batched as ``TokenizerSet.encode`` takes
    them) and ``token_inputs`` (shared ids per sample, e.g. from an earlier call); with no inputs,
    ``batch_size`` unconditional samples. ``progress(i, target)`` is called as target ``i`` starts."""
    config = config or GenerationConfig()
    known = tokenizers.modalities
    token_inputs = token_inputs or {}
    for m in list(inputs) + list(token_inputs) + list(targets):
        if m not in known:
            raise KeyError(f"unknown modality {m!r}; this model's tokenizers know: {', '.join(known)}")
    if not targets:
        raise ValueError("no target modality")
    image_size = image_size or (tokenizers.resolution, tokenizers.resolution)
    conds = {**encode_inputs(tokenizers, inputs, image_size), **{m: list(v) for m, v in token_inputs.items()}}
    pixels, to_pixels = None, None
    if getattr(model.config, "rgb_pixels", False):
        if "rgb" in inputs and "rgb" not in token_inputs:
            pixels = {"rgb": [torch.as_tensor(x) for x in inputs["rgb"]]}
        to_pixels = lambda m, v: torch.stack(tokenizers.decode(m, v))  # noqa: E731 (ids (B, N) -> (B, 3, R, R) uint8)
    token_probs: dict[str, list[torch.Tensor]] = {}
    ids = generate_ids(model, tokenizers.vocab, tokenizers.grids, conds, targets, config, batch_size, progress, pixels, to_pixels, token_probs)
    outputs = {m: tokenizers.decode(m, v, image_size=image_size, probs=token_probs.get(m)) for m, v in ids.items()}
    return GenerationResult(ids=ids, outputs=outputs, image_size=image_size, token_probs=token_probs)


@torch.no_grad()
def generate_ids(model, vocab: SharedVocab, grids: dict[str, int], conds: dict[str, list[torch.Tensor]], targets: list[str], config: GenerationConfig, batch_size: int | None = None, progress: Callable[[int, str], None] | None = None, pixels: dict[str, list[torch.Tensor]] | None = None, to_pixels: Callable[[str, torch.Tensor], torch.Tensor] | None = None, token_probs: dict[str, list[torch.Tensor]] | None = None) -> dict[str, list[torch.Tensor]]:
    """The token-level core of ``generate``: condition ids in, target ids out (no tokenizers).

    ``token_probs``: a dict that receives, per sequence target, the probability of each generated
    id (per sample, aligned with its ids).

    For an encoder-decoder with ``rgb_pixels``: ``pixels`` {modality: per sample (C, R, R) uint8},
    the images of conditions in ``conds``; ``to_pixels(modality, ids (B, N)) -> (B, C, R, R)
    uint8`` (the tokenizer's decode) gives the others theirs. Without it, rgb known only as ids is
    read by its ids alone, which such a model was not trained on."""
    conds = dict(conds)
    reads = bool(getattr(model.config, "rgb_pixels", False))
    pixels = dict(pixels or {}) if reads else {}
    to_pixels = to_pixels if reads else None

    def fill(m: str) -> None:  # rgb known as ids only: its pixels by decoding them
        if to_pixels is not None and m in PIXEL_MODALITIES and m in conds and m not in pixels:
            pixels[m] = list(to_pixels(m, torch.stack(list(conds[m]))))

    for m in list(conds):
        fill(m)
    b = _batch_size(conds) if conds else (batch_size or 1)
    generator = torch.Generator().manual_seed(config.seed)
    ids: dict[str, list[torch.Tensor]] = {}
    for i, target in enumerate(targets):
        if progress is not None:
            progress(i, target)
        cfg = config.for_target(target)
        if model.config.arch == "encdec":
            if _kind(target) == "image" and cfg.scheme in ("auto", "maskgit", "roar"):
                new = _encdec_image(model, vocab, conds, target, grids, b, cfg, generator, pixels, to_pixels)
            else:
                new = _encdec_sequence(model, vocab, conds, target, b, cfg, generator, grids, pixels)
        else:
            new = _decoder_target(model, vocab, conds, target, grids, b, cfg, generator)
        if isinstance(new, tuple):  # a sequence target: ids and their probabilities
            new, probs = new
            if token_probs is not None:
                token_probs[target] = probs
        ids[target] = new
        conds[target] = new  # chaining: a finished target conditions the next
        pixels.pop(target, None)
        if i + 1 < len(targets):  # its pixels only if a target follows to read them
            fill(target)
    return ids


# -- encoder-decoder ---------------------------------------------------------------------------------
def _pad_rows(rows: list[tuple]) -> tuple[torch.Tensor, ...]:
    """[(ids (L,), modality (L,), positions (L, 2), pixel patches (L, C) uint8 or None, their mask
    (L,) or None)] -> padded ids, modality, positions, valid, pixels (B, L, C) or None, pixel mask."""
    n = max(len(r[0]) for r in rows)
    b = len(rows)
    ids = torch.zeros(b, n, dtype=torch.long)
    mod = torch.zeros(b, n, dtype=torch.long)
    pos = torch.zeros(b, n, 2, dtype=torch.long)
    valid = torch.zeros(b, n, dtype=torch.bool)
    width = max((r[3].shape[1] for r in rows if r[3] is not None), default=0)
    pix = torch.zeros(b, n, width, dtype=torch.uint8) if width else None
    pix_mask = torch.zeros(b, n, dtype=torch.bool) if width else None
    for i, (t, m, p, x, xm) in enumerate(rows):
        ids[i, : len(t)], mod[i, : len(t)], pos[i, : len(t)], valid[i, : len(t)] = t, m, p, True
        if x is not None and pix is not None:
            pix[i, : len(t)], pix_mask[i, : len(t)] = x, xm
    return ids, mod, pos, valid, pix, pix_mask


def _encoder_rows(model, vocab: SharedVocab, conds: dict[str, list[torch.Tensor]], grids: dict[str, int], b: int, null_modality: int, partial: tuple | None = None, unconditional: bool = False, pixels: dict[str, list[torch.Tensor]] | None = None):
    """Encoder input per sample: every condition token (or the [BOS] null condition) plus the
    target tokens fixed so far (``partial`` = (modality, positions (B, K), ids (B, K)[, their
    pixel patches (B, K, C) uint8])), and with ``pixels`` the conditions' pixel patches."""
    rows = []
    for i in range(b):
        ids, mods, poss = [], [], []
        pix: list[torch.Tensor | None] = []  # per part: its patches, or None
        if not unconditional:
            for m, seqs in conds.items():
                t = seqs[i]
                mi = model.modality_index(m)
                if _kind(m) == "image":
                    g = grids[m]
                    idx = torch.arange(len(t))
                    pos = torch.stack([idx // g, idx % g], -1)
                else:
                    p = torch.arange(len(t))
                    pos = torch.stack([p, p], -1)
                ids.append(t)
                mods.append(torch.full((len(t),), mi))
                poss.append(pos)
                pix.append(torch.from_numpy(image_patches(pixels[m][i].numpy(), grids[m])) if pixels and m in pixels else None)
        if partial is not None and partial[1].shape[1]:
            m, where, vals = partial[:3]
            g = grids[m]
            ids.append(vals[i])
            mods.append(torch.full((len(vals[i]),), model.modality_index(m)))
            poss.append(torch.stack([where[i] // g, where[i] % g], -1))
            pix.append(partial[3][i] if len(partial) > 3 and partial[3] is not None else None)
        if not ids:  # the null condition of training's condition dropout: one [BOS]
            ids, mods, poss, pix = [torch.tensor([vocab.bos_id])], [torch.tensor([null_modality])], [torch.zeros(1, 2, dtype=torch.long)], [None]
        patches = mask = None
        if any(x is not None for x in pix):
            width = next(x.shape[1] for x in pix if x is not None)
            patches = torch.cat([x if x is not None else torch.zeros(len(t), width, dtype=torch.uint8) for x, t in zip(pix, ids)])
            mask = torch.cat([torch.full((len(t),), x is not None) for x, t in zip(pix, ids)])
        rows.append((torch.cat(ids), torch.cat(mods), torch.cat(poss), patches, mask))
    return rows


def _encode_rows(model, rows):
    ids, mod, pos, valid, pix, pix_mask = _pad_rows(rows)
    return model.encode(ids, mod, pos, valid, pixels=pix, pixel_mask=pix_mask), valid, pos


def _encdec_image(model, vocab, conds, target, grids, b, cfg, generator, pixels=None, to_pixels=None) -> list[torch.Tensor]:
    g = grids[target]
    n = g * g
    mi = model.modality_index(target)
    lo, hi = vocab.logit_span(target)
    known = torch.zeros(b, n, dtype=torch.bool)
    values = torch.full((b, n), vocab.mask_id, dtype=torch.long)
    counts = unmask_counts(n, cfg.steps, cfg.schedule)
    estimate = values.clone()  # the whole image as the last step left it (fixed tokens + that step's draws)
    use_cfg = cfg.cfg_scale != 0 and bool(conds)
    for step, k in enumerate(counts):
        where_known = [known[i].nonzero()[:, 0] for i in range(b)]
        kpos = torch.stack(where_known) if where_known[0].numel() else torch.zeros(b, 0, dtype=torch.long)
        kval = values.gather(1, kpos) if kpos.numel() else torch.zeros(b, 0, dtype=torch.long)
        kpix = None
        if to_pixels is not None and target in PIXEL_MODALITIES and kpos.shape[1]:  # the fixed tokens' patches, from the whole current estimate
            images = to_pixels(target, estimate)
            kpix = torch.stack([torch.from_numpy(image_patches(im.numpy(), g)) for im in images]).gather(1, kpos[..., None].expand(-1, -1, 3 * (images.shape[-1] // g) ** 2))
        rows = _encoder_rows(model, vocab, conds, grids, b, mi, (target, kpos, kval, kpix), pixels=pixels)
        if use_cfg:
            rows += _encoder_rows(model, vocab, conds, grids, b, mi, (target, kpos, kval, kpix), unconditional=True)
        enc, enc_valid, enc_pos = _encode_rows(model, rows)
        unknown = torch.stack([(~known[i]).nonzero()[:, 0] for i in range(b)])  # (B, U): same U for all
        q = unknown.repeat(2, 1) if use_cfg else unknown
        rb, u = q.shape
        dec_ids = torch.full((rb, u), vocab.mask_id)
        pos = torch.stack([q // g, q % g], -1)
        logits = model.decode(enc, enc_valid, dec_ids, torch.full((rb, u), mi), pos, torch.zeros(rb, u, dtype=torch.bool), torch.ones(rb, u, dtype=torch.bool), logits_span=(lo, hi), enc_positions=enc_pos)
        logits = guided(logits[:b], logits[b:], cfg.cfg_scale) if use_cfg else logits
        temp = temperature_at(step, len(counts), cfg.temperature, cfg.temperature_end)
        drawn, conf = sample(logits, temp, cfg.top_k, cfg.top_p, generator)
        drawn = drawn + lo
        if cfg.scheme == "roar":
            order = torch.stack([torch.randperm(u, generator=generator) for _ in range(b)])
        else:
            order = choice_scores(conf, cfg.choice_temperature * (1 - step / len(counts)), generator).argsort(dim=1, descending=True)
        pick = order[:, :k]  # (B, k) positions among the unknown
        chosen = unknown.gather(1, pick)
        values.scatter_(1, chosen, drawn.gather(1, pick))
        known.scatter_(1, chosen, True)
        estimate = values.clone().scatter_(1, unknown, drawn)
    return list(values)


def _encdec_sequence(model, vocab, conds, target, b, cfg, generator, grids, pixels=None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    mi = model.modality_index(target)
    lo, hi = vocab.logit_span(target)
    allowed = vocab.allowed_mask(target)[lo:hi]
    use_cfg = cfg.cfg_scale != 0 and bool(conds)
    rows = _encoder_rows(model, vocab, conds, grids, b, mi, pixels=pixels)
    if use_cfg:
        rows += _encoder_rows(model, vocab, conds, grids, b, mi, unconditional=True)
    enc, enc_valid, enc_pos = _encode_rows(model, rows)
    rb = enc.shape[0]
    cache, kvs = model.new_cache(), model.context_kvs(enc, enc_pos)
    token = torch.full((rb, 1), vocab.bos_id)
    out = torch.full((b, cfg.max_len), vocab.pad_id)
    out_probs = torch.zeros(b, cfg.max_len)
    done = torch.zeros(b, dtype=torch.bool)
    ones = torch.ones(rb, 1, dtype=torch.bool)
    for t in range(cfg.max_len):
        pos = torch.full((rb, 1, 2), t)
        logits = model.decode(enc, enc_valid, token, torch.full((rb, 1), mi), pos, ones, ones, cache=cache, context_kvs=kvs, logits_span=(lo, hi))[:, -1]
        logits = logits.float().masked_fill(~allowed, float("-inf"))  # no span-masking sentinels
        logits = guided(logits[:b], logits[b:], cfg.cfg_scale) if use_cfg else logits
        nxt, prob = sample(logits, cfg.temperature, cfg.top_k, cfg.top_p, generator)
        nxt = nxt + lo
        nxt = torch.where(done, torch.full_like(nxt, vocab.pad_id), nxt)
        out[:, t], out_probs[:, t] = nxt, prob
        done |= nxt == vocab.eos_id
        if bool(done.all()):
            break
        token = nxt.repeat(2)[:, None] if use_cfg else nxt[:, None]
    return _cut_at_eos(out, out_probs, vocab)


def _cut_at_eos(out: torch.Tensor, probs: torch.Tensor, vocab) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Generated rows (B, L) and their ids' probabilities -> per row, the ids before the first
    [EOS] without [PAD] (``SharedVocab.content_index``; [BOS] is never generated), and the
    matching probabilities."""
    kept = [vocab.content_index(row) for row in out]
    return [row[k] for row, k in zip(out, kept)], [p[k] for p, k in zip(probs, kept)]


# -- decoder-only ----------------------------------------------------------------------------------
def _decoder_target(model, vocab, conds, target, grids, b, cfg, generator) -> list[torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]:
    lo, hi = vocab.logit_span(target)  # logits only for the target's id range
    allowed = vocab.allowed_mask(target)[lo:hi]
    use_cfg = cfg.cfg_scale != 0 and bool(conds)
    seqs = []
    for unconditional in ([False, True] if use_cfg else [False]):
        for i in range(b):
            segments = [] if unconditional else [(m, conds[m][i]) for m in conds]
            packed = pack_sequence(segments, vocab, grids)
            start = int(packed.positions[-1, 0]) + 1 if len(packed.ids) else 0
            ids = torch.cat([packed.ids, torch.tensor([vocab.begin_id(target)])])
            pos = torch.cat([packed.positions, torch.tensor([[start, start]])])
            seqs.append((ids, pos))
    rb = len(seqs)
    n = max(len(s[0]) for s in seqs)
    ids = torch.full((rb, n), vocab.pad_id)
    pos = torch.zeros(rb, n, 2, dtype=torch.long)
    mask = torch.zeros(rb, n, dtype=torch.long)
    for i, (s, p) in enumerate(seqs):  # left padding so every row ends at the same step
        ids[i, n - len(s) :], pos[i, n - len(s) :], mask[i, n - len(s) :] = s, p, 1
    next_pos = pos[:, -1, 0] + 1  # (rb,)
    image = _kind(target) == "image"
    g = grids.get(target, 0)
    length = g * g if image else cfg.max_len
    cache = model.new_cache(n + length, static=True)  # fixed shapes: one compiled step serves all
    mask = torch.cat([mask, torch.ones(rb, length, dtype=torch.long)], 1)  # (rb, capacity): generated tokens are real
    logits = model(ids, positions=pos, attention_mask=mask, past_key_values=cache, cache_position=torch.arange(n), logits_to_keep=1, logits_span=(lo, hi)).logits[:, -1]
    step = compiled_decode_step if cfg.compile else decode_step
    out = torch.full((b, length), vocab.pad_id)
    out_probs = torch.zeros(b, length)
    done = torch.zeros(b, dtype=torch.bool)
    for t in range(length):
        logits = logits.float().masked_fill(~allowed, float("-inf"))
        logits = guided(logits[:b], logits[b:], cfg.cfg_scale) if use_cfg else logits
        temp = temperature_at(t, length, cfg.temperature, cfg.temperature_end) if image else cfg.temperature
        nxt, prob = sample(logits, temp, cfg.top_k, cfg.top_p, generator)
        nxt = nxt + lo
        if not image:
            nxt = torch.where(done, torch.full_like(nxt, vocab.pad_id), nxt)
            done |= nxt == vocab.eos_id
        out[:, t], out_probs[:, t] = nxt, prob
        if (not image and bool(done.all())) or t == length - 1:
            break
        # the token just drawn is token t of the target: its position follows pack_sequence's layout
        if image:
            r, c = divmod(t, g)
            p = torch.stack([next_pos + r, next_pos + c], -1)
        else:
            p = (next_pos + t)[:, None].expand(rb, 2)
        step_ids = nxt.repeat(2) if use_cfg else nxt
        logits = step(model, step_ids[:, None], p[:, None], torch.tensor([n + t]), mask, cache, (lo, hi))
    return list(out) if image else _cut_at_eos(out, out_probs, vocab)
