"""Chameleon-style decoder-only model: one sequence ``[BOS] <mod> ids </mod> <mod2> ...``, causal or
PrefixLM attention, image tokens with 2D (row, col) RoPE positions.

The forward is shaped like Hugging Face's: ``model(input_ids, labels=None, ...)`` returns an object
with ``.logits`` and ``.loss`` (next-token cross-entropy, labels shifted inside, -100 ignored).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from fourm.models.config import TransformerConfig
from fourm.models.layers import CAUSAL, Block, KVCache, RMSNorm, Unpadded, modality_tables, output_logits, rope_cos_sin, row_cross_entropy, span_cross_entropy, token_cross_entropy, z_loss
from fourm.models.masks import causal_mask, padding_mask, prefix_lm_mask
from fourm.models.outputs import CausalLMOutput
from fourm.models.pretrained import Pretrained
from fourm.sequence import IGNORE_INDEX


@dataclass
class DecoderConfig(TransformerConfig):
    """A decoder-only model (see ``TransformerConfig`` for the shared fields).

    ``modality_softmax``: train each token's softmax over its modality's ids only (the ids
    generation samples it from, plus the span-masking sentinels for captions and boxes, as the
    encoder-decoder's; 4M's per-modality output), not over the whole vocabulary as Chameleon
    does; [BOS] and the begin/end tags keep the whole vocabulary (the end tag counts for the
    modality it closes but is not one of its ids). The output layer then runs, per modality, on
    its span of rows. Needs ``modalities`` and ``modality_ranges`` (filled from the vocabulary)
    and the tokens' modalities at the loss (``label_modality``). Logits outside a token's
    modality are then untrained: constrain sampling to the target modality (fourm's generation
    does)."""

    ARCH: ClassVar[str] = "decoder"
    arch: str = "decoder"
    n_layers: int = 4
    modality_softmax: bool = False


class DecoderLM(nn.Module, Pretrained):
    """Token embedding -> blocks -> RMSNorm -> LM head."""

    config_class = DecoderConfig

    def __init__(self, config: DecoderConfig):
        super().__init__()
        if config.vocab_size < 1:
            raise ValueError("vocab_size must be set (from the tokenizer set's vocabulary)")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        bc = config.block_config()
        self.blocks = nn.ModuleList(Block(bc) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        if config.modality_softmax:
            if not config.modalities:
                raise ValueError("modality_softmax needs the modalities and their id ranges (build the model with the vocabulary)")
            # one row per modality, and a last one, the whole vocabulary, for [BOS], tags and padding
            allowed, spans = modality_tables(config.vocab_size, config.modalities + ["(tags)"], {**config.modality_ranges, "(tags)": [[0, config.vocab_size]]})
            self.register_buffer("allowed", allowed, persistent=False)
            self.spans = spans
        init_weights(self, config.zero_init_out)

    def new_cache(self, capacity: int = 256, static: bool = False) -> list[KVCache]:
        """Per-layer KV caches; ``static`` ones (fixed shapes, for compiled decoding) hold
        ``capacity`` positions and are written at ``cache_position``."""
        return [KVCache(capacity, static) for _ in self.blocks]

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        prefix_len: torch.Tensor | None = None,
        past_key_values: list[KVCache] | None = None,
        logits_to_keep: int = 0,
        logits_span: tuple[int, int] | None = None,
        cache_position: torch.Tensor | None = None,
        loss_labels: torch.Tensor | None = None,
        label_modality: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        """Args:
            input_ids: (B, T) shared-vocabulary ids.
            labels: (B, T) ids or -100; the loss compares logits[:, t] with labels[:, t + 1].
            positions: (B, T) 1D or (B, T, 2) (row, col) positions; default 0..T-1 after the cache.
            attention_mask: (B, S) 1 for real tokens, 0 for padding (S = cached + T).
            prefix_len: (B,) PrefixLM prefix lengths (bidirectional there); None: causal.
            past_key_values: per-layer caches from ``new_cache()``, extended in place.
            logits_to_keep: compute logits only for the last N positions (0: all), as in HF.
            logits_span: (lo, hi): compute only output rows lo..hi-1 (a modality's id range, see
                ``SharedVocab.logit_span``); logits are then (B, T, hi - lo), column j = id lo + j.
            cache_position: (T,) the slots of static caches (``new_cache(static=True)``) the new
                tokens take; ``attention_mask`` is then (B, capacity) and slots after the new
                tokens are hidden.
            loss_labels: (B, T) the training loop's fast path: no logits; the output layer runs
                only at positions whose next label is not -100 -> ``ce`` (N,), ``lse`` (N,)
                (logsumexp, for the z-loss) and ``index`` (N,) into the flattened (B, T - 1)
                shifted positions. Same values as cross-entropy of the full logits there.
            label_modality: (B, T) each token's index in ``config.modalities`` (-1 for [BOS], begin
                tags and padding; an end tag has the modality it closes), as ``collate_decoder``
                gives it. With ``modality_softmax`` the
                softmax at t is over the ids of token t + 1's modality (``_softmax_groups``): the
                loss paths need it, and the full logits are then -inf outside that modality
                (ignored otherwise).
        """
        positions, mask = _positions_and_mask(input_ids, positions, attention_mask, prefix_len, past_key_values, cache_position)
        cos, sin = rope_cos_sin(positions, self.config.rope_inv_freq(positions.device))
        groups = self._loss_groups(input_ids, labels, loss_labels, label_modality)
        rows = _labelled_rows(loss_labels, input_ids.shape[1], groups, attention_mask, past_key_values) if loss_labels is not None else None
        x = self._trunk(input_ids, cos, sin, mask, past_key_values, cache_position, rows.layout if rows is not None else None)
        if rows is not None:
            return self._labelled_loss(x, rows, past_key_values)
        return self._logits_and_loss(x, labels, groups, logits_to_keep, logits_span, past_key_values)

    def _loss_groups(self, input_ids: torch.Tensor, labels, loss_labels, label_modality) -> torch.Tensor | None:
        """(B, T - 1) softmax groups (``_softmax_groups``) with ``modality_softmax`` and the tokens'
        modalities given, else None; ValueError for labels without their modalities there."""
        per_modality = self.config.modality_softmax
        if per_modality and label_modality is None and (loss_labels is not None or labels is not None):
            raise ValueError("this model's softmax is per modality (modality_softmax): pass label_modality (collate_decoder's) with the labels")
        if not (per_modality and label_modality is not None):
            return None
        targets = loss_labels if loss_labels is not None else labels if labels is not None else input_ids
        return self._softmax_groups(torch.where(targets < 0, input_ids, targets), label_modality)

    def _trunk(self, input_ids: torch.Tensor, cos, sin, mask, past_key_values, cache_position, layout: Unpadded | None) -> torch.Tensor:
        """Token embeddings through the blocks: (B, T, dim), or (1, N, dim) over the N real tokens
        of a padded batch (``layout``)."""
        x = self.embed(input_ids)
        if layout is not None:
            x = layout.unpad(x)  # (1, N, dim)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, mask, past_key_values[i] if past_key_values else None, cache_position=cache_position, layout=layout)
        return x

    def _labelled_loss(self, x: torch.Tensor, rows: _LabelledRows, past_key_values) -> CausalLMOutput:
        """The ``loss_labels`` path: the output layer at the labelled positions only -> ``ce`` (N,),
        ``lse`` (N,), ``index`` (N,); no logits."""
        h = x[:, :-1].reshape(-1, x.shape[-1])[rows.index] if rows.layout is None else x[0][rows.layout.rows(rows.source)]
        y = rows.y[rows.index]
        if rows.groups is not None:
            ce, lse = span_cross_entropy(self.lm_head, self.norm(h), y, rows.groups, self.spans, self.allowed, self.config.ordinal())
        else:
            picked = self.lm_head(self.norm(h)).float()
            ce, lse = row_cross_entropy(picked, y, self.config.ordinal()), torch.logsumexp(picked, dim=-1)
        return CausalLMOutput(logits=None, loss=None, past_key_values=past_key_values, ce=ce, lse=lse, index=rows.index)

    def _logits_and_loss(self, x: torch.Tensor, labels, groups, logits_to_keep: int, logits_span, past_key_values) -> CausalLMOutput:
        """Logits (B, T or logits_to_keep, V or span width), -inf outside each position's softmax
        group; the shifted cross-entropy (+ z-loss) against ``labels`` (B, T) when given."""
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = output_logits(self.lm_head, self.norm(x), logits_span)
        if groups is not None and not logits_to_keep and logits_span is None:
            last = torch.full_like(groups[:, :1], len(self.spans) - 1)  # the last position predicts nothing labelled
            logits = logits.masked_fill(~self.allowed[torch.cat([groups, last], 1)], float("-inf"))
        loss = None
        if labels is not None:
            shifted = logits[:, :-1].float()
            loss = token_cross_entropy(shifted.reshape(-1, shifted.shape[-1]), labels[:, 1:].reshape(-1), self.config.ordinal())
            if self.config.z_loss:
                loss = loss + z_loss(shifted[labels[:, 1:] != IGNORE_INDEX], self.config.z_loss)
        return CausalLMOutput(logits=logits, loss=loss, past_key_values=past_key_values)

    def _softmax_groups(self, targets: torch.Tensor, label_modality: torch.Tensor) -> torch.Tensor:
        """(B, T - 1): which softmax position t uses (``modality_softmax``), an index into
        ``self.spans``: token t + 1's modality, or the last entry (the whole vocabulary) where the
        target id at t + 1 (``targets`` (B, T): the labels, else the inputs) is not one of its
        modality's ids ([BOS], tags, the end tag that counts for the modality it closes, padding),
        so that no label falls outside its softmax."""
        whole = len(self.spans) - 1
        nxt = label_modality[:, 1:]
        group = torch.where(nxt < 0, whole, nxt)
        return torch.where(self.allowed[group, targets[:, 1:]], group, whole)


def _positions_and_mask(input_ids: torch.Tensor, positions, attention_mask, prefix_len, past_key_values, cache_position):
    """(positions (B, T) or (B, T, 2), the self-attention mask) of a forward: over static caches
    (``cache_position``), or a dynamic-cache or uncached one (positions default to the steps after
    the cache)."""
    b, t = input_ids.shape
    if cache_position is not None:
        if not past_key_values or not past_key_values[0].static:
            raise ValueError("cache_position needs static caches: model.new_cache(capacity, static=True)")
        if positions is None:
            positions = cache_position[None].expand(b, t)
        return positions, _static_mask(cache_position, past_key_values[0].capacity, attention_mask)
    past = past_key_values[0].length if past_key_values else 0
    if positions is None:
        positions = torch.arange(past, past + t, device=input_ids.device)[None].expand(b, t)
    return positions, _mask(b, t, past, attention_mask, prefix_len, input_ids.device)


@dataclass
class _LabelledRows:
    """Where the ``loss_labels`` path computes its loss. ``y`` (B * (T - 1),): the shifted labels;
    ``index`` (N,): the labelled ones among them (with softmax groups, ordered by group: ``groups``
    (N,), sorted); ``source`` (N,): their places in the flattened (B, T) batch; ``layout``: a padded
    batch's real tokens (every layer but attention runs on them only), or None."""

    y: torch.Tensor
    index: torch.Tensor
    groups: torch.Tensor | None
    source: torch.Tensor
    layout: Unpadded | None


def _labelled_rows(loss_labels: torch.Tensor, t: int, groups: torch.Tensor | None, attention_mask, past_key_values) -> _LabelledRows:
    """The rows of ``loss_labels`` (B, T = ``t``) that the loss reads; ``groups`` (B, T - 1) or None."""
    y = loss_labels[:, 1:].reshape(-1)
    index = (y != IGNORE_INDEX).nonzero()[:, 0]  # into the flattened (B, T - 1) shifted positions
    picked_groups = None
    if groups is not None:  # rows of one modality together, for span_cross_entropy
        picked_groups, order = groups.reshape(-1)[index].sort(stable=True)
        index = index[order]
    source = index // (t - 1) * t + index % (t - 1)  # shifted position (b, t) is place b * T + t of the (B, T) batch
    layout = None
    if attention_mask is not None and past_key_values is None:  # a padded batch: every layer but attention on real tokens only
        layout = Unpadded.of(attention_mask, needed=source)
    return _LabelledRows(y, index, picked_groups, source, layout)


def _mask(b: int, t: int, past: int, attention_mask, prefix_len, device):
    """Self-attention mask of a dynamic-cache or uncached forward (see ``layers.attention``)."""
    s = past + t
    if prefix_len is not None:
        if past:
            raise ValueError("prefix_len applies to a full forward, not to cached decoding")
        return prefix_lm_mask(prefix_len, t, attention_mask.bool() if attention_mask is not None else None)
    if t == 1:  # one new token sees every cached one that is not padding
        return padding_mask(attention_mask) if attention_mask is not None else None
    if not past and (attention_mask is None or bool(attention_mask.all())):
        return CAUSAL  # no padding: SDPA's is_causal, no (B, 1, T, T) tensor
    mask = causal_mask(t, s, device=device).expand(b, 1, t, s)
    if attention_mask is not None:
        mask = mask & padding_mask(attention_mask)
        mask = mask | torch.eye(t, s, dtype=torch.bool, device=device).roll(past, 1)[None, None]
    return mask


def _static_mask(cache_position: torch.Tensor, capacity: int, attention_mask) -> torch.Tensor:
    """(B or 1, 1, T, capacity) over static caches: slots up to each new token's own, minus padding;
    each token still sees itself (no empty row). Fixed shapes whatever the step, so it compiles once."""
    slots = torch.arange(capacity, device=cache_position.device)[None, :]
    mask = (slots <= cache_position[:, None])[None, None]
    if attention_mask is not None:
        mask = (mask & padding_mask(attention_mask)) | (slots == cache_position[:, None])[None, None]
    return mask


def init_weights(model: nn.Module, zero_init_out: bool = False) -> None:
    """Normal(0, 0.02) weights and zero biases; with ``zero_init_out`` the blocks' residual
    output projections (``TransformerConfig.zero_init_out``) start at zero."""
    model.apply(_init_weights)
    if zero_init_out:
        for block in model.modules():
            if isinstance(block, Block):
                for proj in (block.attn.wo, block.mlp.down, *([block.cross.wo] if block.cross is not None else [])):
                    nn.init.zeros_(proj.weight)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
