"""4M / Unified-IO-style encoder-decoder.

Encoder: token embedding (shared vocabulary) + modality embedding, RoPE positions (2D for
image-like tokens), bidirectional attention over the visible input tokens of any modalities.
Decoder: target queries ([MASK] + modality, placed by their RoPE position) for image-like targets,
decoded in parallel; teacher-forced shifted tokens for sequence targets, causal within their modality
(``masks.modality_decoder_mask``); cross-attention to the encoder, with RoPE on its queries (at
the target positions) and keys (at the encoder tokens' positions); output logits restricted to
each target's modality range.

RoPE in cross-attention is what places a [MASK] query: the queries of one image target are
identical but for their position, so with position-free cross-attention (and self-attention among
identical values, whose output is the same whatever its weights) every query of a target would get
the same prediction. With it, a depth query at (row, col) finds the rgb tokens at (row, col) at
offset 0, as the decoder-only model does in self-attention (both modalities share the 2D grid).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from fourm.models.config import TransformerConfig
from fourm.models.decoder import init_weights
from fourm.models.layers import Block, KVCache, RMSNorm, Unpadded, modality_tables, output_logits, rope_cos_sin, span_cross_entropy, token_cross_entropy, z_loss
from fourm.models.masks import bidirectional_mask, causal_mask, modality_decoder_mask, padding_mask
from fourm.models.outputs import Seq2SeqOutput
from fourm.models.pixel_stem import ConvPixelStem, scaled_pixels
from fourm.models.pretrained import Pretrained
from fourm.sequence import IGNORE_INDEX


@dataclass
class EncDecConfig(TransformerConfig):
    """An encoder-decoder model (see ``TransformerConfig`` for the shared fields; it needs
    ``modalities`` and ``modality_ranges``)."""

    ARCH: ClassVar[str] = "encdec"
    arch: str = "encdec"
    enc_layers: int = 4
    dec_layers: int = 4
    # RoPE in cross-attention: queries at their positions, keys at the encoder tokens' (see
    # ``CrossAttention``); False only for models saved before it existed
    cross_rope: bool = True
    # rgb inputs also read as pixels (the raw-pixel input of 4M's fine-tuning and Unified-IO 2): a
    # linear projection of each visible rgb token's pixel patch is added to its embedding. rgb known
    # only as ids at generation is decoded by the tokenizer for it (``generation.api``).
    rgb_pixels: bool = False
    pixel_patch: int = 8  # pixels per patch side: the rgb tokenizer's resolution / its token grid
    # training: the share of examples whose patches are withheld (0.5 measured far worse than 0 at
    # the demo's budget: delta1 0.903 against 0.969, README "rgb read as pixels too")
    pixel_dropout: float = 0.0
    # "linear": each patch projected on its own; "conv": stride-2 convolutions over the visible
    # patches put back in place, so a token's feature sees its neighbours' pixels (``pixel_stem.py``)
    pixel_stem: str = "linear"
    # conv stem only, > 0: a 3x3 stride-1 convolution of this many channels at full resolution
    # before its stride-2 stack (``ConvPixelStem``'s ``full_res``)
    stem_full_res: int = 0
    # a dense auxiliary loss on the encoder (deep supervision from labels the shards already hold):
    # each rgb input token's output predicts the class of every pixel of its patch in the label map
    # of ``aux_labels`` (e.g. "semseg", ``aux_classes`` classes), a linear head, weight
    # ``aux_weight`` in the training loss; "" for none. Generation never uses the head.
    aux_labels: str = ""
    aux_classes: int = 0
    aux_weight: float = 1.0
    # > 0: a second head on the same tokens regresses, at every pixel of an object (a class of the
    # map from this id on: the number of semseg classes in an object label map), the box of its
    # object's pixels (``object_extents``, in patch units), smooth L1 times ``aux_box_weight``:
    # where each object is, for the box decoder to read off the encoder
    aux_box_from: int = 0
    aux_box_weight: float = 1.0
    # > 0: the same per-pixel classes are also read by a head of their own off the pixel stem's
    # features (before the encoder's blocks), times ``aux_stem_weight``: deep supervision that
    # reaches the stem without passing through the transformer
    aux_stem_weight: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if bool(self.aux_labels) != (self.aux_classes > 0) or self.aux_weight < 0:
            raise ValueError(f"aux_labels and aux_classes go together (a label modality and its number of classes > 0) and aux_weight must be >= 0, got {self.aux_labels!r}, {self.aux_classes}, {self.aux_weight}")
        if self.aux_box_from and not (self.aux_labels and 0 < self.aux_box_from < self.aux_classes) or self.aux_box_from < 0 or self.aux_box_weight < 0:
            raise ValueError(f"aux_box_from needs aux_labels and a first object class id in (0, aux_classes), and aux_box_weight must be >= 0, got {self.aux_box_from} of {self.aux_classes} classes, weight {self.aux_box_weight}")
        if self.aux_stem_weight < 0 or self.aux_stem_weight and not (self.aux_labels and self.rgb_pixels):
            raise ValueError(f"aux_stem_weight needs aux_labels and rgb_pixels (a pixel stem to supervise) and must be >= 0, got {self.aux_stem_weight}")
        if self.pixel_patch < 1 or not 0.0 <= self.pixel_dropout < 1.0:
            raise ValueError(f"pixel_patch must be >= 1 and pixel_dropout in [0, 1), got {self.pixel_patch} and {self.pixel_dropout}")
        if self.pixel_stem not in ("linear", "conv"):
            raise ValueError(f"pixel_stem must be 'linear' or 'conv', got {self.pixel_stem!r}")
        if self.stem_full_res < 0 or self.stem_full_res and self.pixel_stem != "conv":
            raise ValueError(f"stem_full_res needs pixel_stem: conv and must be >= 0, got {self.stem_full_res} with {self.pixel_stem!r}")
        if self.rgb_pixels and self.pixel_stem == "conv" and (self.pixel_patch < 2 or self.pixel_patch & (self.pixel_patch - 1)):
            raise ValueError(f"pixel_stem: conv needs a power-of-two pixel_patch >= 2, got {self.pixel_patch}")


class EncoderDecoder(nn.Module, Pretrained):
    """Any subset of modalities in, any subset out (see the module docstring)."""

    config_class = EncDecConfig

    def __init__(self, config: EncDecConfig):
        super().__init__()
        if config.vocab_size < 1 or not config.modalities:
            raise ValueError("vocab_size and modalities must be set (from the tokenizer set's vocabulary)")
        self.config = config
        bc = config.block_config()
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.modality_embeddings = nn.Embedding(len(config.modalities), config.dim)
        self.encoder = nn.ModuleList(Block(bc) for _ in range(config.enc_layers))
        self.enc_norm = RMSNorm(config.dim, config.norm_eps)
        self.decoder = nn.ModuleList(Block(bc, cross=True) for _ in range(config.dec_layers))
        self.dec_norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.rgb_pixels and "rgb" not in config.modalities:
            raise ValueError("rgb_pixels needs an rgb modality in the vocabulary")
        self.pixel_embed: nn.Module | None = None
        if config.rgb_pixels:
            self.pixel_embed = ConvPixelStem(config.pixel_patch, config.dim, config.stem_full_res) if config.pixel_stem == "conv" else nn.Linear(3 * config.pixel_patch**2, config.dim, bias=False)
        self.aux_head = nn.Linear(config.dim, config.aux_classes * config.pixel_patch**2) if config.aux_labels else None
        self.aux_box_head = nn.Linear(config.dim, 4 * config.pixel_patch**2) if config.aux_box_from else None
        self.aux_stem_head = nn.Linear(config.dim, config.aux_classes * config.pixel_patch**2) if config.aux_stem_weight else None
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # per modality, the ids its targets may take and the smallest id span holding them
        allowed, self.spans = modality_tables(config.vocab_size, config.modalities, config.modality_ranges)
        self.register_buffer("allowed", allowed, persistent=False)
        init_weights(self, config.zero_init_out)

    def modality_index(self, name: str) -> int:
        try:
            return self.config.modalities.index(name)
        except ValueError:
            raise KeyError(f"unknown modality {name!r}; this model has: {', '.join(self.config.modalities)}") from None

    def pixel_features(self, pixels: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """pixels (B, S, 3 * p * p) uint8 patches, mask (B, S) bool where a token has its patch ->
        (B, S, dim), zero where it has none (and, training, for a ``pixel_dropout`` share of the
        examples). ``positions`` (B, S, 2): the tokens' grid places, which the conv stem needs."""
        if pixels.shape[-1] != self.pixel_embed.in_features:
            raise ValueError(f"pixel patches of {pixels.shape[-1]} values, but this model reads {self.pixel_embed.in_features} ({self.config.pixel_patch}x{self.config.pixel_patch}x3)")
        keep = mask
        if self.training and self.config.pixel_dropout > 0:
            keep = keep & (torch.rand(keep.shape[0], 1, device=keep.device) >= self.config.pixel_dropout)
        if isinstance(self.pixel_embed, ConvPixelStem):
            if positions is None:
                raise ValueError("the conv pixel stem needs the tokens' positions")
            return self.pixel_embed(pixels, keep, positions)
        weight = self.pixel_embed.weight
        return self.pixel_embed(scaled_pixels(pixels, weight.dtype)) * keep[..., None].to(weight.dtype)

    def encode(self, ids: torch.Tensor, modality: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, layout: Unpadded | None = None, pixels: torch.Tensor | None = None, pixel_mask: torch.Tensor | None = None, stem_out: list | None = None) -> torch.Tensor:
        """Encoder. ids, modality (B, S); positions (B, S, 2) or (B, S); valid (B, S) -> (B, S, dim).
        ``layout`` (``Unpadded.of(valid)``): every layer but attention on the real tokens only ->
        (1, N, dim). ``pixels`` (B, S, 3 * p * p) uint8 and ``pixel_mask`` (B, S): the tokens'
        pixel patches, read by a model with ``rgb_pixels`` (``pixel_features``), ignored by others.
        ``stem_out``: a list the pixel features (B, S, dim) are appended to, when there are any."""
        x = self.embed(ids) + self.modality_embeddings(modality)
        if self.pixel_embed is not None and pixels is not None:
            features = self.pixel_features(pixels, pixel_mask if pixel_mask is not None else torch.ones(pixels.shape[:2], dtype=torch.bool, device=pixels.device), positions)
            if stem_out is not None:
                stem_out.append(features)
            x = x + features
        elif self.pixel_embed is not None and self.training:  # a batch without patches: DDP still waits for this layer's gradient
            x = x + sum(w.sum() for w in self.pixel_embed.parameters()) * 0.0
        if layout is not None:
            x = layout.unpad(x)
        cos, sin = rope_cos_sin(positions, self.config.rope_inv_freq(positions.device))
        mask = None if bool(valid.all()) else bidirectional_mask(valid)  # no padding: no mask tensor
        for block in self.encoder:
            x = block(x, cos, sin, mask, layout=layout)
        return self.enc_norm(x)

    def context_kvs(self, encoder_out: torch.Tensor, enc_positions: torch.Tensor | None = None, layout: Unpadded | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per decoder layer cross-attention keys/values of the encoder output (B, S, dim), keys
        rotated by the encoder tokens' positions (B, S, 2) or (B, S) with ``cross_rope``; compute
        once per generation and pass to ``decode``. ``layout``: the encoder output is its real
        tokens only, (1, N, dim) (``encode(..., layout=)``)."""
        rope = None
        if self.config.cross_rope:
            if enc_positions is None:
                raise ValueError("this model's cross-attention uses RoPE: pass the encoder tokens' positions")
            rope = rope_cos_sin(enc_positions, self.config.rope_inv_freq(enc_positions.device))
        return [block.cross.context_kv(encoder_out, rope, layout) for block in self.decoder]

    def new_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.decoder]

    def decode(
        self,
        encoder_out: torch.Tensor,
        enc_valid: torch.Tensor,
        ids: torch.Tensor,
        modality: torch.Tensor,
        positions: torch.Tensor,
        causal: torch.Tensor,
        valid: torch.Tensor,
        cache: list[KVCache] | None = None,
        context_kvs: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        logits_span: tuple[int, int] | None = None,
        return_hidden: bool = False,
        enc_positions: torch.Tensor | None = None,
        enc_layout: Unpadded | None = None,
        layout: Unpadded | None = None,
    ) -> torch.Tensor:
        """Decoder -> logits (B, T, V) restricted to each token's modality range (or, with
        ``return_hidden``, the normalised hidden states (B, T, dim) before the output layer).

        ids: (B, T) [MASK] for image-like targets, shifted tokens for sequence targets;
        modality, causal, valid: (B, T); positions (B, T, 2) or (B, T).
        cache: per-layer self-attention caches for step-by-step decoding of one sequence target
            (every cached token belongs to that target, so the mask is causal over cache + new).
        context_kvs: from ``context_kvs(encoder_out, enc_positions)``, to skip recomputing them
            each step; without them, ``enc_positions`` (B, S, 2) or (B, S) (the encoder tokens'
            positions) are needed when the model has ``cross_rope``.
        logits_span: (lo, hi): only output rows lo..hi-1 (logits (B, T, hi - lo)); see
            ``SharedVocab.logit_span``.
        enc_layout, layout: the training path's ``Unpadded`` layouts of the encoder output
            (``encode(..., layout=)``) and of the decoder tokens (``Unpadded.of(valid)``; only with
            ``return_hidden``, which then returns the real tokens' states, (1, N, dim)).
        """
        if layout is not None and not return_hidden:
            raise ValueError("an unpadded decoder layout returns hidden states (return_hidden=True)")
        x = self.embed(ids) + self.modality_embeddings(modality)
        if layout is not None:
            x = layout.unpad(x)
        cos, sin = rope_cos_sin(positions, self.config.rope_inv_freq(positions.device))
        if cache is not None:
            past, t = cache[0].length, ids.shape[1]
            mask = causal_mask(t, past + t, device=ids.device).expand(ids.shape[0], 1, t, past + t)
        else:
            mask = modality_decoder_mask(modality, causal, valid)
        cross_mask = None if bool(enc_valid.all()) else padding_mask(enc_valid)
        kvs = context_kvs if context_kvs is not None else self.context_kvs(encoder_out, enc_positions, enc_layout)
        for i, block in enumerate(self.decoder):
            x = block(x, cos, sin, mask, cache[i] if cache is not None else None, context_kv=kvs[i], context_mask=cross_mask, cross_rope=self.config.cross_rope, layout=layout)
        if return_hidden:
            return self.dec_norm(x)
        logits = output_logits(self.lm_head, self.dec_norm(x), logits_span)
        allowed = self.allowed[modality] if logits_span is None else self.allowed[modality][..., logits_span[0] : logits_span[1]]
        return logits.masked_fill(~allowed, float("-inf"))

    def token_losses(self, hidden: torch.Tensor, modality: torch.Tensor, labels: torch.Tensor, layout: Unpadded | None = None) -> dict[str, torch.Tensor]:
        """Cross-entropy at the labelled positions only, each over its modality's id span.

        The same values as ``cross_entropy`` of ``decode``'s logits there (whose columns outside the
        modality are -inf, so they add nothing to the softmax), without the (B, T, V) logits: the
        output layer runs on the N labelled rows and, per modality, on its span of rows (about a
        quarter of the vocabulary for an image modality).

        hidden (B, T, dim) from ``decode(..., return_hidden=True)`` (or (1, N, dim), the real
        tokens', with the decoder's ``layout``); modality, labels (B, T), -100 ignored. Returns
        {"ce": (N,), "lse": (N,) logsumexp for the z-loss, "index": (N,) flat positions (into
        B * T) of the N labelled tokens, grouped by modality}.
        """
        flat = (labels != IGNORE_INDEX).reshape(-1)
        mods, order = modality.reshape(-1)[flat].sort(stable=True)
        index = flat.nonzero()[:, 0][order]
        h = hidden[0][layout.rows(index)] if layout is not None else hidden.reshape(-1, hidden.shape[-1])[index]
        y = labels.reshape(-1)[index]
        ce, lse = span_cross_entropy(self.lm_head, h, y, mods, self.spans, self.allowed, self.config.ordinal())
        return {"ce": ce, "lse": lse, "index": index}

    def _dense_rows(self, encoder_out: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """encoder_out (B, S, dim), labels (B, S, width) -> (M, dim), (M, width) of the M tokens
        with a labelled pixel, the labels checked against the heads."""
        c, n = self.config.aux_classes, self.config.pixel_patch**2
        width = 5 * n if self.aux_box_head is not None else n
        if labels.shape[-1] != width:
            raise ValueError(f"dense labels of {labels.shape[-1]} values a token, but this model's head reads {width} ({self.config.pixel_patch}x{self.config.pixel_patch} patches{', class then box maps' if width > n else ''})")
        rows = (labels[..., :n] != IGNORE_INDEX).any(-1)  # (B, S)
        y = labels[rows]
        if bool((y[:, :n] >= c).any()):
            raise ValueError(f"a {self.config.aux_labels} label {int(y[:, :n].max())} is outside this model's {c} aux_classes")
        return encoder_out[rows], y

    def dense_aux_loss(self, encoder_out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The dense auxiliary loss (``EncDecConfig.aux_labels``): encoder_out (B, S, dim), labels
        (B, S, p * p) class ids of each token's patch, -100 where none (with ``aux_box_from``,
        (B, S, 5 * p * p): the class ids, then the patch's four ``object_extents`` maps) -> the
        mean cross-entropy over the labelled pixels (0, still in the graph, where there are none)."""
        return self._class_loss(*self._dense_rows(encoder_out, labels))

    def dense_box_loss(self, encoder_out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The box term (``EncDecConfig.aux_box_from``): labels as ``dense_aux_loss``'s, (B, S,
        5 * p * p) -> the smooth L1 (beta: one patch) between the box head's outputs and the
        object boxes (x0, y0, x1, y1 of every object pixel) in patch units, mean over the object
        pixels' coordinates (0, still in the graph, where there are none)."""
        return self._box_loss(*self._dense_rows(encoder_out, labels))

    def _class_loss(self, h: torch.Tensor, y: torch.Tensor, head: nn.Module | None = None) -> torch.Tensor:
        """``dense_aux_loss`` on ``_dense_rows``' (M, dim) outputs and (M, width) labels, read by
        ``head`` (default ``aux_head``)."""
        c, n = self.config.aux_classes, self.config.pixel_patch**2
        head = head if head is not None else self.aux_head
        logits = head(h).view(-1, n, c).float()  # (M, p * p, C)
        if not y.numel():
            return logits.sum() * 0.0 + sum(w.sum() for w in head.parameters()) * 0.0
        return F.cross_entropy(logits.reshape(-1, c), y[:, :n].reshape(-1), ignore_index=IGNORE_INDEX)

    def _box_loss(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``dense_box_loss`` on ``_dense_rows``' (M, dim) outputs and (M, 5 * p * p) labels."""
        pred = self.aux_box_head(h).float()  # (M, 4 * p * p), channel-major like the maps
        extents = y[:, self.config.pixel_patch**2 :]
        keep = extents != IGNORE_INDEX
        if not bool(keep.any()):
            return pred.sum() * 0.0 + sum(w.sum() for w in self.aux_box_head.parameters()) * 0.0
        return F.smooth_l1_loss(pred[keep], extents[keep].float() / self.config.pixel_patch, beta=1.0)

    def forward(
        self,
        enc_ids: torch.Tensor,
        enc_modality: torch.Tensor,
        enc_positions: torch.Tensor,
        enc_valid: torch.Tensor,
        dec_ids: torch.Tensor,
        dec_modality: torch.Tensor,
        dec_positions: torch.Tensor,
        dec_causal: torch.Tensor,
        dec_valid: torch.Tensor,
        labels: torch.Tensor | None = None,
        loss_labels: torch.Tensor | None = None,
        enc_pixels: torch.Tensor | None = None,
        enc_pixel_mask: torch.Tensor | None = None,
        enc_dense_labels: torch.Tensor | None = None,
    ) -> Seq2SeqOutput:
        """Full pass; ``labels`` (B, T) are the target ids at each decoder position (-100 ignored),
        already aligned (no shift inside): the objective builds the shifted decoder inputs.
        ``enc_pixels``, ``enc_pixel_mask``: the encoder tokens' pixel patches (``encode``).
        ``enc_dense_labels`` (B, S, p * p): with ``aux_labels``, ``out.aux_loss`` is the dense
        auxiliary loss times ``aux_weight`` (``dense_aux_loss``; not in ``loss``: the training loop
        adds it).

        ``loss_labels`` (B, T): the training loop's fast path: no logits; instead ``token_losses``
        at the labelled positions (``out.ce``, ``out.lse``, ``out.index``)."""
        if loss_labels is not None:  # training: every layer but attention on the real tokens only
            enc_layout, dec_layout = Unpadded.of(enc_valid), Unpadded.of(dec_valid, needed=(loss_labels != IGNORE_INDEX).reshape(-1).nonzero()[:, 0])
            stem: list[torch.Tensor] = []
            enc = self.encode(enc_ids, enc_modality, enc_positions, enc_valid, enc_layout, enc_pixels, enc_pixel_mask, stem)
            hidden = self.decode(enc, enc_valid, dec_ids, dec_modality, dec_positions, dec_causal, dec_valid, return_hidden=True, enc_positions=enc_positions, enc_layout=enc_layout, layout=dec_layout)
            padded = enc_layout.pad(enc) if enc_layout is not None else enc
            return Seq2SeqOutput(logits=None, loss=None, encoder_out=padded, **self.token_losses(hidden, dec_modality, loss_labels, dec_layout), **self._aux(padded, enc_dense_labels, stem))
        stem = []
        enc = self.encode(enc_ids, enc_modality, enc_positions, enc_valid, pixels=enc_pixels, pixel_mask=enc_pixel_mask, stem_out=stem)
        logits = self.decode(enc, enc_valid, dec_ids, dec_modality, dec_positions, dec_causal, dec_valid, enc_positions=enc_positions)
        loss = None
        if labels is not None:
            keep = labels != IGNORE_INDEX
            picked = logits[keep].float()
            loss = token_cross_entropy(picked, labels[keep], self.config.ordinal()) if picked.numel() else logits.sum() * 0.0
            if self.config.z_loss and picked.numel():
                loss = loss + z_loss(picked, self.config.z_loss)  # logsumexp ignores the -inf columns
        return Seq2SeqOutput(logits=logits, loss=loss, encoder_out=enc, **self._aux(enc, enc_dense_labels, stem))

    def _aux(self, encoder_out: torch.Tensor, labels: torch.Tensor | None, stem: list[torch.Tensor] = ()) -> dict[str, torch.Tensor]:
        """The auxiliary losses, summed and weighted, as ``{"aux_loss"}``; ``stem``: ``encode``'s
        ``stem_out`` (the pixel features, for ``aux_stem_weight``; empty without patches)."""
        if self.aux_head is None:
            return {}
        heads = [h for h in (self.aux_head, self.aux_box_head, self.aux_stem_head) if h is not None]
        if labels is None:  # a batch without label maps: DDP still waits for the head's gradient
            return {"aux_loss": sum(w.sum() for head in heads for w in head.parameters()) * 0.0} if self.training else {}
        h, y = self._dense_rows(encoder_out, labels)  # once for both heads
        loss = self.config.aux_weight * self._class_loss(h, y)
        if self.aux_box_head is not None:
            loss = loss + self.config.aux_box_weight * self._box_loss(h, y)
        if self.aux_stem_head is not None:
            if stem:
                loss = loss + self.config.aux_stem_weight * self._class_loss(*self._dense_rows(stem[0], labels), self.aux_stem_head)
            else:
                loss = loss + sum(w.sum() for w in self.aux_stem_head.parameters()) * 0.0
        return {"aux_loss": loss}
