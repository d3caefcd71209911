"""Hugging Face parity: export to Llama / Chameleon, import from Llama; tiny random models, offline."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_usage_error, run_program
from fourm.models.build import save_pretrained
from fourm.models.decoder import DecoderConfig, DecoderLM
from fourm.models.hf import export_hf, from_hf_llama, to_hf

V = 300


def _model(qk_norm: str, **kw) -> DecoderLM:
    torch.manual_seed(0)
    model = DecoderLM(DecoderConfig(vocab_size=V, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, qk_norm=qk_norm, rope_theta=500.0, **kw)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() < 2:  # make norms non-trivial so a wrong mapping cannot pass
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _compare(ours: DecoderLM, hf, ids: torch.Tensor, attention_mask=None) -> float:
    with torch.no_grad():
        a = ours(ids, attention_mask=attention_mask).logits
        b = hf(input_ids=ids, attention_mask=attention_mask).logits
    cols = torch.ones(V, dtype=torch.bool)
    image_tokens = getattr(getattr(getattr(hf, "model", None), "vocabulary_mapping", None), "image_tokens", [])
    cols[list(image_tokens)] = False  # the columns HF masks
    keep = attention_mask.bool() if attention_mask is not None else torch.ones(ids.shape, dtype=torch.bool)
    return float((a - b)[keep][:, cols].abs().max())


@pytest.mark.parametrize("qk_norm, hf_class", [("none", "LlamaForCausalLM"), ("layernorm", "ChameleonForConditionalGeneration")])
def test_export_parity(qk_norm, hf_class, tmp_path):
    import transformers

    model = _model(qk_norm)
    ids = torch.randint(0, V, (2, 19))
    hf = to_hf(model)
    assert type(hf).__name__ == hf_class
    assert _compare(model, hf, ids) < 1e-4
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    assert _compare(model, hf, ids, mask) < 1e-4
    export_hf(model, tmp_path / "hf")
    loaded = getattr(transformers, hf_class).from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert _compare(model, loaded, ids) < 1e-4


def test_import_from_llama_checkpoint(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, rms_norm_eps=1e-6, tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1234.0})
    hf = LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "llama")
    ours = from_hf_llama(tmp_path / "llama")
    assert ours.config.n_kv_heads == 1 and ours.config.mlp_hidden == 96 and ours.config.rope_theta == 1234.0
    assert _compare(ours, hf, torch.randint(0, V, (2, 13))) < 1e-4


def test_export_program(tmp_path):
    save_pretrained(_model("layernorm"), tmp_path / "m")
    proc = run_program("launch/export_hf.py", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "hf"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "hf" / "model.safetensors").is_file()
    save_pretrained(_model("rms"), tmp_path / "r")
    assert_usage_error(run_program("launch/export_hf.py", "--model", str(tmp_path / "r"), "--out", str(tmp_path / "hf2")), "qk_norm")
    assert_usage_error(run_program("launch/export_hf.py", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "hf3")), "config.json")
    assert_usage_error(run_program("launch/export_hf.py", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "hf")), "not empty")
