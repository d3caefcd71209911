"""Growing a trained model's vocabulary: new modalities appended, no existing id renumbered.

A tokenizer set grown with ``SharedVocab.grow`` (a new image-like modality's codebook, or a new
task's begin/end tags) keeps every old id. ``grow_model`` gives a pretrained model the matching
shape: token embedding and output rows appended, and (encoder-decoder) one modality embedding per
new modality. New rows start as the mean of the old ones (Hugging Face's ``mean_resizing``), a
deterministic choice: the same base grown twice is bit-identical, so an adapter that trained the
new rows can be applied to a base grown again at load time.

The old rows are copied, so every output of the grown model on old ids equals the base model's.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import torch

from fourm.models.build import ARCHS, config_from_vocab
from fourm.vocab import VOCAB_FILE, SharedVocab

log = logging.getLogger(__name__)


def check_extends(old: SharedVocab, new: SharedVocab) -> None:
    """ValueError unless ``new`` keeps every id of ``old`` (same specials, spaces and tags)."""
    hint = "ids were renumbered (grow the tokenizer set with tokenizers/train.py --grow instead of laying it out again)"
    if new.specials != old.specials:
        raise ValueError(f"the new vocabulary has other special tokens than the model's: {hint}")
    for space, (start, size) in old.spaces.items():
        if new.spaces.get(space) != [start, size]:
            raise ValueError(f"space {space!r} is {new.spaces.get(space)} in the new vocabulary but {[start, size]} in the model's: {hint}")
    for modality, spaces in old.modalities.items():
        if new.modalities.get(modality) != spaces:
            raise ValueError(f"modality {modality!r} uses {new.modalities.get(modality)} in the new vocabulary, {spaces} in the model's")


def new_token_ids(old: SharedVocab, new: SharedVocab) -> list[int]:
    """Ids of ``new`` that ``old`` lacks (appended at the end, so ``range(old.size, new.size)``)."""
    check_extends(old, new)
    return list(range(old.size, new.size))


def _append_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """(N, D) -> (N + rows, D): the old rows, then ``rows`` copies of their mean."""
    mean = weight.detach().float().mean(0, keepdim=True).to(weight.dtype)
    return torch.cat([weight.detach(), mean.expand(rows, -1)], 0)


def grow_model(model: torch.nn.Module, old: SharedVocab, new: SharedVocab) -> torch.nn.Module:
    """A new model of the same architecture sized for ``new`` (see the module docstring).

    Args:
        model: a DecoderLM or EncoderDecoder built for ``old``.
        old, new: the model's vocabulary and one that extends it (``check_extends``).
    Returns:
        the grown model (a new module, same mode and dtype); ``model`` itself is left as it was.
    """
    check_extends(old, new)
    if model.config.vocab_size != old.size:
        raise ValueError(f"the model has {model.config.vocab_size} ids, its vocabulary {old.size}")
    fields = {k: v for k, v in config_from_vocab(new).items() if hasattr(model.config, k)}
    config = dataclasses.replace(model.config, **fields)
    added = new.size - old.size
    grown = ARCHS[config.arch][1](config).to(next(model.parameters()).dtype)
    state = dict(model.state_dict())
    state["embed.weight"] = _append_rows(state["embed.weight"], added)
    if not config.tie_embeddings:
        state["lm_head.weight"] = _append_rows(state["lm_head.weight"], added)
    else:
        state["lm_head.weight"] = state["embed.weight"]
    if "modality_embeddings.weight" in state:
        # rows follow the new config's modality order (a manifest may list modalities sorted):
        # an old modality keeps its row, a new one starts at the mean of the old rows
        old_mods, new_mods = list(model.config.modalities), list(config.modalities)
        table = _append_rows(state["modality_embeddings.weight"], 1)
        state["modality_embeddings.weight"] = table[[old_mods.index(m) if m in old_mods else len(old_mods) for m in new_mods]]
    grown.load_state_dict(state)
    return grown.train(model.training)


def fit_to_vocab(model: torch.nn.Module, old: SharedVocab, new: SharedVocab) -> torch.nn.Module:
    """``model`` (built for ``old``) ready for examples laid out with ``new``: itself when the ids and
    the model's modality order agree, else ``grow_model``'s copy. The order matters on its own: an
    encoder-decoder indexes its modality embeddings and id ranges (a decoder-only model with
    ``modality_softmax`` its id ranges) by position in
    ``config.modalities``, examples by position in their vocabulary, and a token manifest lists
    modalities sorted while a model built from a tokenizer set keeps the set's order.
    """
    order = getattr(model.config, "modalities", None)  # empty in a decoder-only model saved without them
    if old.to_json() == new.to_json() and (not order or list(order) == list(new.modalities)):
        return model
    return grow_model(model, old, new)


def load_for_vocab(directory: str | os.PathLike, vocab: SharedVocab) -> tuple[torch.nn.Module, SharedVocab]:
    """Load a pretrained model for data tokenized with ``vocab``: as it is when the vocabularies
    match, grown or re-ordered (``fit_to_vocab``) when ``vocab`` extends the model's or lists its
    modalities in another order.

    Returns:
        (model, the vocabulary the model was trained on).
    """
    from fourm.models.build import load_model

    model = load_model(directory)
    path = Path(directory) / VOCAB_FILE
    if not path.is_file():
        if model.config.vocab_size != vocab.size:
            raise ValueError(f"{directory} has no {VOCAB_FILE} and {model.config.vocab_size} ids; the data have {vocab.size}")
        order = getattr(model.config, "modalities", None)
        if not order or sorted(order) != sorted(vocab.modalities):
            return model, vocab
        # the same ids taken on trust (as ever without the file), the modalities in the model's order
        old = dataclasses.replace(vocab, modalities={m: vocab.modalities[m] for m in order})
        return fit_to_vocab(model, old, vocab), old
    old = SharedVocab.load(path)
    fitted = fit_to_vocab(model, old, vocab)
    if fitted is not model:
        log.info("fitting %s to the data's vocabulary: %d -> %d ids (new modalities: %s), modalities in the data's order", directory, old.size, vocab.size, ", ".join(m for m in vocab.modalities if m not in old.modalities) or "none")
    return fitted, old
