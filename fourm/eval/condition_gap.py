"""Does a model read its condition? The teacher-forced loss of a target given each sample's own
condition, against the same loss given another sample's condition (the conditions rolled by
``shift``). A gap near 0 says the target is predicted from its own statistics alone, however
fluent the generations look (a captioner that writes one sentence for every image has gap 0).

    condition_gap(model, samples, vocab, grids, kinds, source="rgb", target="caption") -> dict

Both architectures: the encoder-decoder sees the source whole in its encoder and predicts the
whole target (``prefix_plans``); the decoder-only model gets ``[source][target]`` as a PrefixLM
sequence (``decoder_example``). The loss is the mean cross-entropy over the target's labelled
tokens (content and, for sequences, the end token), in nats.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fourm.objectives.builders import collate_decoder, collate_encdec, decoder_example, encdec_example, prefix_plans
from fourm.vocab import SharedVocab

PIXELS = ".pixels"  # a sample's key suffix for a modality's pixel image (``read_token_samples``)


def _batch(model, pairs: list[tuple[dict, dict]], vocab: SharedVocab, grids: dict[str, int], kinds: dict[str, str], source: str, target: str) -> dict:
    """(condition sample, target sample) pairs -> one collated batch (``label_modality`` kept only
    for the decoder-only model, whose per-modality softmax reads it)."""
    rng = np.random.default_rng(0)  # unused with shuffle=False and a given n_condition
    examples = []
    for cond, tgt in pairs:
        tokens = {source: cond[source], target: tgt[target]}
        if model.config.arch == "encdec":
            # a model that reads rgb as pixels too gets the condition's pixels (samples carry them
            # as "<modality>.pixels" when read by ``read_token_samples``)
            pixels = {source: cond[source + PIXELS]} if getattr(model.config, "rgb_pixels", False) and source + PIXELS in cond else None
            examples.append(encdec_example(tokens, prefix_plans(tokens, kinds, rng, n_condition=1, shuffle=False), vocab, grids, pixels=pixels))
        else:
            examples.append(decoder_example(tokens, vocab, grids, rng, n_condition=1, shuffle=False))
    batch = (collate_encdec if model.config.arch == "encdec" else collate_decoder)(examples)
    if model.config.arch == "encdec":
        batch.pop("label_modality")
    return batch


@torch.no_grad()
def target_loss(model, batch: dict) -> tuple[float, int]:
    """Summed cross-entropy (nats) over the labelled tokens of a collated batch, and their count:
    the models' own per-token losses (``loss_labels``, the training loop's path; the decoder-only
    model shifts the labels itself), without (B, T, V) logits."""
    ce = model(**{k: v for k, v in batch.items() if k != "labels"}, loss_labels=batch["labels"]).ce
    return float(ce.sum()), int(ce.numel())


def condition_gap(model, samples: list[dict[str, np.ndarray]], vocab: SharedVocab, grids: dict[str, int], kinds: dict[str, str], source: str = "rgb", target: str = "caption", shift: int = 1, batch_size: int = 32) -> dict:
    """Losses of ``target`` given each sample's own ``source`` and given the ``shift``-th next
    sample's; samples: token dicts (``{modality: ids}``) holding both modalities.

    Returns {"own", "other", "gap" (= other - own; > 0 when the condition is read), "samples"}.
    """
    order = getattr(model.config, "modalities", None)  # the models' modality indices
    if order and list(order) != list(vocab.modalities):
        raise ValueError(f"the model lists its modalities as {', '.join(order)}, the data as {', '.join(vocab.modalities)}: load it with fourm.models.grow.load_for_vocab(directory, vocab)")
    usable = [s for s in samples if source in s and target in s]
    if len(usable) < 2:
        raise ValueError(f"need at least 2 samples with both {source} and {target}, got {len(usable)}")
    n = len(usable)
    totals = {"own": [0.0, 0], "other": [0.0, 0]}
    for start in range(0, n, batch_size):
        idx = range(start, min(start + batch_size, n))
        for name, offset in (("own", 0), ("other", shift)):
            batch = _batch(model, [(usable[(i + offset) % n], usable[i]) for i in idx], vocab, grids, kinds, source, target)
            loss, count = target_loss(model, batch)
            totals[name][0] += loss
            totals[name][1] += count
    own, other = (totals[k][0] / totals[k][1] for k in ("own", "other"))
    return {"own": own, "other": other, "gap": other - own, "samples": n}


def read_token_samples(directory: str | Path, vocab: SharedVocab, kinds: dict[str, str], grids: dict[str, int], limit: int) -> list[dict[str, np.ndarray]]:
    """The first ``limit`` readable samples of token shards, as ``{modality: ids}``, plus
    ``{"rgb.pixels": (3, R, R) uint8}`` where the shards keep the rgb images."""
    import webdataset as wds

    from fourm.data.codecs import CorruptMember
    from fourm.data.loader import SkippedSample
    from fourm.data.shards import expand_shards
    from fourm.training.data import decode_pixels, decode_tokens

    samples = []
    for sample in wds.tarfile_to_samples()(iter({"url": u} for u in expand_shards(str(directory)))):
        try:
            tokens = decode_tokens(sample, vocab, kinds, grids)
            samples.append({**tokens, **{m + PIXELS: image for m, image in decode_pixels(sample, tokens, grids).items()}})
        except (CorruptMember, SkippedSample):  # a damaged sample is skipped, as the training stream does
            continue
        if len(samples) >= limit:
            break
    return samples
