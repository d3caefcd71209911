"""Hugging Face interchange for the decoder-only model.

Export: QK-norm ``none`` -> ``LlamaForCausalLM``; QK-norm ``layernorm`` (Chameleon's) ->
``ChameleonForConditionalGeneration``. Import: a decoder-only model initialised from a Llama
checkpoint directory (as Chameleon-style models start from a language model). Logits match within
float32 rounding on sequences with 1D positions (HF's RoPE has no 2D positions; on text they are
the same RoPE, see ``fourm/models/layers.py``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fourm.models.decoder import DecoderConfig, DecoderLM


def _split_qkv(model: DecoderLM, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    c = model.config
    hd = c.dim // c.n_heads
    w = model.blocks[i].attn.wqkv.weight
    return w.split([c.n_heads * hd, c.n_kv_heads * hd, c.n_kv_heads * hd], dim=0)


def hf_state_dict(model: DecoderLM) -> dict[str, torch.Tensor]:
    """Our weights under Llama/Chameleon parameter names."""
    sd = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight, "lm_head.weight": model.lm_head.weight}
    for i, blk in enumerate(model.blocks):
        p = f"model.layers.{i}."
        q, k, v = _split_qkv(model, i)
        sd.update({
            p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
            p + "self_attn.o_proj.weight": blk.attn.wo.weight,
            p + "mlp.gate_proj.weight": blk.mlp.gate.weight, p + "mlp.up_proj.weight": blk.mlp.up.weight, p + "mlp.down_proj.weight": blk.mlp.down.weight,
            p + "input_layernorm.weight": blk.attn_norm.weight, p + "post_attention_layernorm.weight": blk.mlp_norm.weight,
        })
        if blk.attn.q_norm is not None:
            for name in ("q_norm", "k_norm"):
                norm = getattr(blk.attn, name)
                sd[p + f"self_attn.{name}.weight"] = norm.weight
                if hasattr(norm, "bias"):
                    sd[p + f"self_attn.{name}.bias"] = norm.bias
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def _common(c: DecoderConfig) -> dict:
    return dict(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.mlp_hidden, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, rms_norm_eps=c.norm_eps,
        max_position_embeddings=4096, tie_word_embeddings=c.tie_embeddings, attention_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
    )


def to_hf(model: DecoderLM) -> torch.nn.Module:
    """An equivalent ``transformers`` model (Llama or Chameleon, by QK-norm), float32, eval mode.

    Its logits equal ours. A model trained with ``modality_softmax`` never trained a token's
    logits outside its modality: generate from the export with the target modality's ids only
    (for example a ``transformers`` ``LogitsProcessor`` that sets the others to -inf), as fourm's
    own generation does."""
    c = model.config
    if c.qk_norm == "none":
        from transformers import LlamaConfig, LlamaForCausalLM

        hf = LlamaForCausalLM(LlamaConfig(**_common(c), mlp_bias=False, head_dim=c.dim // c.n_heads))
    elif c.qk_norm == "layernorm":
        from transformers import ChameleonConfig, ChameleonForConditionalGeneration

        # the VQ image model is not ours (our image tokenizers are separate): keep it minimal
        tiny_vq = {"embed_dim": 4, "num_embeddings": 8, "base_channels": 32, "channel_multiplier": [1], "num_res_blocks": 1, "latent_channels": 4, "resolution": 8, "attn_resolutions": []}
        cfg = ChameleonConfig(**_common(c), qk_layernorm=True, vq_config=tiny_vq, vocabulary_map={"<image>": 3})
        hf = ChameleonForConditionalGeneration(cfg)
    else:
        raise ValueError("only qk_norm 'none' (Llama) or 'layernorm' (Chameleon) export to Hugging Face")
    missing, unexpected = hf.load_state_dict(hf_state_dict(model), strict=False)
    missing = [k for k in missing if not k.startswith("model.vqmodel.") and not (c.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"export mismatch: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return hf.float().eval()


def export_hf(model: DecoderLM, out: str | os.PathLike) -> Path:
    """Write a ``transformers`` checkpoint directory (``from_pretrained`` loads it)."""
    out = Path(out)
    to_hf(model).save_pretrained(out, safe_serialization=True)
    return out


def from_hf_llama(directory: str | os.PathLike, **overrides) -> DecoderLM:
    """A decoder-only model initialised from a Llama checkpoint directory (config + safetensors)."""
    from transformers import AutoConfig, LlamaForCausalLM

    cfg = AutoConfig.from_pretrained(directory)
    if cfg.model_type != "llama":
        raise ValueError(f"{directory} holds a {cfg.model_type!r} model; only Llama checkpoints import")
    rope = getattr(cfg, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"RoPE scaling {rope.get('rope_type')!r} is not supported")
    config = DecoderConfig(
        vocab_size=cfg.vocab_size, dim=cfg.hidden_size, n_layers=cfg.num_hidden_layers, n_heads=cfg.num_attention_heads,
        n_kv_heads=cfg.num_key_value_heads, mlp_hidden=cfg.intermediate_size, qk_norm="none", rope_theta=float(theta),
        norm_eps=cfg.rms_norm_eps, tie_embeddings=bool(cfg.tie_word_embeddings), **overrides,
    )
    if getattr(cfg, "head_dim", config.dim // config.n_heads) != config.dim // config.n_heads:
        raise ValueError("Llama checkpoints with head_dim != hidden_size / heads are not supported")
    hf = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32)
    sd = hf.state_dict()
    model = DecoderLM(config)
    with torch.no_grad():
        model.embed.weight.copy_(sd["model.embed_tokens.weight"])
        model.norm.weight.copy_(sd["model.norm.weight"])
        if not config.tie_embeddings:
            model.lm_head.weight.copy_(sd["lm_head.weight"])
        for i, blk in enumerate(model.blocks):
            p = f"model.layers.{i}."
            blk.attn.wqkv.weight.copy_(torch.cat([sd[p + f"self_attn.{n}_proj.weight"] for n in "qkv"]))
            blk.attn.wo.weight.copy_(sd[p + "self_attn.o_proj.weight"])
            blk.mlp.gate.weight.copy_(sd[p + "mlp.gate_proj.weight"])
            blk.mlp.up.weight.copy_(sd[p + "mlp.up_proj.weight"])
            blk.mlp.down.weight.copy_(sd[p + "mlp.down_proj.weight"])
            blk.attn_norm.weight.copy_(sd[p + "input_layernorm.weight"])
            blk.mlp_norm.weight.copy_(sd[p + "post_attention_layernorm.weight"])
    return model.eval()
