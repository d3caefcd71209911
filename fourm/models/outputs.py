"""Model outputs: dicts whose keys read as attributes (``out.logits``, ``out["logits"]``), as
``transformers.ModelOutput``; being plain dicts, DeepSpeed ZeRO-3 sees the tensors inside them."""

from __future__ import annotations


class ModelOutput(dict):
    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class CausalLMOutput(ModelOutput):
    """``logits`` (B, T, V), ``loss`` (scalar or None), ``past_key_values`` (list of KVCache or None)."""


class Seq2SeqOutput(ModelOutput):
    """``logits`` (B, T, V), -inf outside each target's modality range; ``loss``; ``encoder_out`` (B, S, dim).
    With ``loss_labels`` instead: ``logits`` None and ``ce``, ``lse``, ``index`` (``EncoderDecoder.token_losses``)."""
