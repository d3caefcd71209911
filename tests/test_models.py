"""Transformer blocks, masks and both architectures."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import pytest
import torch

from fourm.models.build import build_model, config_from_vocab, count_parameters, load_model, make_config, save_pretrained
from fourm.models.decoder import DecoderConfig, DecoderLM
from fourm.models.encdec import EncDecConfig, EncoderDecoder
from fourm.models.layers import Attention, CrossAttention, Unpadded, apply_rope, attention, rope_cos_sin, rope_inv_freq
from fourm.models.masks import bidirectional_mask, causal_mask, modality_decoder_mask, prefix_lm_mask
from fourm.vocab import SharedVocab

PRESETS = Path(__file__).resolve().parent.parent / "configs" / "models"
VOCAB = SharedVocab.build({"text": 120, "box_coords": 50, "rgb": 64, "depth": 64, "semseg": 64})


def tiny_decoder(**kw) -> DecoderLM:
    torch.manual_seed(0)
    return DecoderLM(DecoderConfig(vocab_size=VOCAB.size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, **kw)).eval()


def tiny_encdec(**kw) -> EncoderDecoder:
    torch.manual_seed(0)
    return EncoderDecoder(EncDecConfig(**config_from_vocab(VOCAB), dim=64, enc_layers=2, dec_layers=2, n_heads=4, n_kv_heads=2, **kw)).eval()


# -- RoPE -----------------------------------------------------------------------------------------
def test_rope_2d_matches_the_direct_formula():
    torch.manual_seed(0)
    d = 16
    inv = rope_inv_freq(d, 100.0)
    pos = torch.tensor([[[0, 0], [2, 5], [7, 1]]])  # (1, T=3, 2)
    x = torch.randn(1, 2, 3, d)
    cos, sin = rope_cos_sin(pos, inv)
    got = apply_rope(x, cos, sin)
    want = x.clone()
    for t in range(3):
        for i in range(d // 2):
            angle = float(pos[0, t, i % 2]) * float(inv[i])
            a, b = x[0, :, t, i], x[0, :, t, i + d // 2]
            want[0, :, t, i] = a * math.cos(angle) - b * math.sin(angle)
            want[0, :, t, i + d // 2] = b * math.cos(angle) + a * math.sin(angle)
    torch.testing.assert_close(got, want)


def test_rope_1d_equals_2d_on_the_diagonal_and_is_relative():
    inv = rope_inv_freq(8)
    p = torch.arange(6)[None]
    c1, s1 = rope_cos_sin(p, inv)
    c2, s2 = rope_cos_sin(torch.stack([p, p], -1), inv)
    torch.testing.assert_close((c1, s1), (c2, s2))
    # scores depend on relative position only: shift both by the same offset
    torch.manual_seed(1)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    def score(pq, pk):
        cq, sq = rope_cos_sin(torch.tensor([[pq]]), inv)
        ck, sk = rope_cos_sin(torch.tensor([[pk]]), inv)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()
    torch.testing.assert_close(score([3, 4], [1, 1]), score([13, 9], [11, 6]))


# -- attention ------------------------------------------------------------------------------------
def test_gqa_equals_mha_with_repeated_kv_weights():
    torch.manual_seed(0)
    gqa = Attention(32, n_heads=4, n_kv_heads=2, head_dim=8)
    mha = Attention(32, n_heads=4, n_kv_heads=4, head_dim=8)
    q, k, v = gqa.wqkv.weight.split([32, 16, 16])
    rep = lambda w: w.view(2, 8, 32).repeat_interleave(2, 0).reshape(32, 32)
    with torch.no_grad():
        mha.wqkv.weight.copy_(torch.cat([q, rep(k), rep(v)]))
        mha.wo.weight.copy_(gqa.wo.weight)
    x = torch.randn(2, 5, 32)
    cos, sin = rope_cos_sin(torch.arange(5)[None].expand(2, 5), rope_inv_freq(8))
    mask = causal_mask(5).expand(2, 1, 5, 5)
    torch.testing.assert_close(gqa(x, cos, sin, mask), mha(x, cos, sin, mask))


def test_mha_equals_plain_multihead_formula():
    torch.manual_seed(0)
    att = Attention(32, n_heads=4, n_kv_heads=4, head_dim=8)
    x = torch.randn(1, 6, 32)
    zero = torch.zeros(1, 6, 8)
    q, k, v = att.wqkv(x).split(32, -1)
    heads = lambda t: t.view(1, 6, 4, 8).transpose(1, 2)
    w = (heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(8)).softmax(-1)
    want = att.wo((w @ heads(v)).transpose(1, 2).reshape(1, 6, 32))
    torch.testing.assert_close(att(x, zero.cos(), zero, None), want)


def test_unpadded_layout_round_trip_and_attention_at_real_tokens():
    valid = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert Unpadded.of(torch.ones(2, 3, dtype=torch.bool)) is None  # nothing to skip
    layout = Unpadded.of(valid)
    assert layout.index.tolist() == [0, 1, 2, 4, 5, 8, 9, 10, 11]
    assert layout.rows(torch.tensor([4, 11, 0])).tolist() == [3, 8, 0]
    x = torch.randn(3, 4, 5)
    packed = layout.unpad(x)
    assert packed.shape == (1, 9, 5) and torch.equal(packed[0], x[valid])
    back = layout.pad(packed)
    assert torch.equal(back[valid], x[valid]) and not back[~valid].any()
    # self-attention on the real tokens only equals the padded call at the real tokens
    torch.manual_seed(0)
    attn = Attention(16, 4, 2, 4)
    x = torch.randn(3, 4, 16)
    cos, sin = rope_cos_sin(torch.arange(4).expand(3, 4), rope_inv_freq(4))
    mask = bidirectional_mask(valid)
    padded = attn(x, cos, sin, mask)[valid]
    torch.testing.assert_close(attn(layout.unpad(x), cos, sin, mask, layout=layout)[0], padded, atol=1e-6, rtol=0)


def test_skipping_padding_keeps_every_loss_whatever_the_padding(monkeypatch):
    """The training path (``loss_labels``) skips padding only when every labelled position reads
    a real token's state; left padding with the first real token labelled (Hugging Face's habit)
    or labels left at padding run padded, as before. Losses and gradients equal the padded path."""
    from fourm.models import layers

    torch.manual_seed(0)
    model = DecoderLM(DecoderConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=64))
    ids = torch.randint(4, 50, (3, 7))
    right = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
    cases = {"right padding": (right, ids.masked_fill(right == 0, -100)), "left padding": (right.flip(1), ids.masked_fill(right.flip(1) == 0, -100)), "labels at padding": (right, ids)}
    for name, (mask, labels) in cases.items():
        runs = []
        for skip in (True, False):
            monkeypatch.setattr(layers, "SKIP_PADDING", skip)
            model.zero_grad()
            out = model(ids, attention_mask=mask, loss_labels=labels)
            out.ce.sum().backward()
            runs.append((out.ce.detach(), [p.grad.clone() for p in model.parameters()]))
        (ce, grads), (ce_padded, grads_padded) = runs
        torch.testing.assert_close(ce, ce_padded, atol=1e-6, rtol=0, msg=name)
        for g, gp in zip(grads, grads_padded):
            torch.testing.assert_close(g, gp, atol=1e-6, rtol=0, msg=name)


def test_attention_backends_agree():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    mask = torch.rand(2, 1, 5, 7) > 0.3
    mask[..., 0] = True
    torch.testing.assert_close(attention(q, k, v, mask, "sdpa"), attention(q, k, v, mask, "reference"), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(q, k, v, mask, "flash-v9")
    with pytest.raises(RuntimeError, match="CUDA"):
        attention(q, k, v, mask, "xformers")


# -- masks ----------------------------------------------------------------------------------------
def test_mask_functions():
    assert torch.equal(causal_mask(3)[0, 0], torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool))
    assert torch.equal(causal_mask(2, 4)[0, 0], torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool))
    m = prefix_lm_mask(torch.tensor([2, 0]), 4)
    assert m.shape == (2, 1, 4, 4)
    assert m[0, 0, 0, 1] and not m[0, 0, 1, 2] and m[0, 0, 3, 2] and not m[1, 0, 0, 1]
    valid = torch.tensor([[True, True, False]])
    b = bidirectional_mask(valid)
    assert b[0, 0, :2, :2].all() and not b[0, 0, 0, 2] and b[0, 0, 2].tolist() == [False, False, True]  # no empty row
    mod = torch.tensor([[0, 0, 1, 1, 1]])
    causal = torch.tensor([[False, False, True, True, True]])
    d = modality_decoder_mask(mod, causal, torch.ones(1, 5, dtype=torch.bool))[0, 0]
    assert d[0, 1] and d[1, 0] and not d[0, 2]  # image targets: bidirectional within modality only
    assert d[3, 2] and not d[2, 3] and not d[2, 0]  # sequence targets: causal within modality


def test_causal_and_prefix_lm_information_flow():
    model = tiny_decoder()
    ids = torch.randint(4, VOCAB.size, (1, 10))
    changed = ids.clone()
    changed[0, 7] = (ids[0, 7] + 1) % VOCAB.size
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
        assert torch.equal(a[0, :7], b[0, :7]) and not torch.allclose(a[0, 7:], b[0, 7:])
        p = torch.tensor([5])
        a, b = model(ids, prefix_len=p).logits, model(changed, prefix_len=p).logits
        assert torch.equal(a[0, :7], b[0, :7])  # a later target never reaches back
        changed = ids.clone()
        changed[0, 3] = (ids[0, 3] + 1) % VOCAB.size  # inside the prefix
        c = model(changed, prefix_len=p).logits
        assert not torch.allclose(a[0, :3], c[0, :3])  # prefix is bidirectional: earlier logits move
        assert torch.equal(model(ids).logits[0, :3], model(changed).logits[0, :3])  # but not under causal


def test_kv_cache_decoding_equals_full_recomputation():
    model = tiny_decoder(qk_norm="rms")
    ids = torch.randint(4, VOCAB.size, (2, 9))
    pos = torch.stack([torch.arange(9), torch.arange(9) * 2 % 5], -1)[None].expand(2, 9, 2)
    with torch.no_grad():
        full = model(ids, positions=pos).logits
        cache = model.new_cache()
        steps = [model(ids[:, :4], positions=pos[:, :4], past_key_values=cache).logits]
        for t in range(4, 9):
            steps.append(model(ids[:, t : t + 1], positions=pos[:, t : t + 1], past_key_values=cache).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_causal_flag_equals_dense_causal_mask():
    """mask=CAUSAL (SDPA's is_causal, no tensor) gives what a dense causal mask gives, with GQA
    and on every backend; models use it when nothing is padded."""
    from fourm.models.layers import CAUSAL

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 7, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    dense = causal_mask(7).expand(2, 1, 7, 7)
    for backend in ("sdpa", "reference"):
        torch.testing.assert_close(attention(q, k, v, CAUSAL, backend), attention(q, k, v, dense, "reference"), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="causal"):
        attention(q, k[:, :, :5], v[:, :, :5], CAUSAL)
    model = tiny_decoder()
    ids = torch.randint(4, VOCAB.size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, model(ids, attention_mask=torch.ones(2, 9, dtype=torch.long)).logits)
        padded = torch.ones(2, 9, dtype=torch.long)
        padded[1, :2] = 0  # left padding: row 0 must not change
        torch.testing.assert_close(model(ids, attention_mask=padded).logits[0], model(ids).logits[0], atol=1e-5, rtol=1e-5)


def test_growing_kv_cache_equals_full_recomputation():
    model = tiny_decoder()
    ids = torch.randint(4, VOCAB.size, (2, 7))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(capacity=2)  # too small: the buffer grows while decoding
        steps = [model(ids[:, :3], past_key_values=cache).logits] + [model(ids[:, t : t + 1], past_key_values=cache).logits for t in range(3, 7)]
    assert cache[0].k.shape[2] >= 7 and cache[0].length == 7
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_static_cache_with_left_padding_equals_unpadded_decoding():
    """Static caches (fixed shapes, what compiled decoding uses): a left-padded row decodes exactly
    as the same row alone without padding; logits_span gives the matching slice of the logits."""
    model = tiny_decoder(qk_norm="layernorm")
    long, short = torch.randint(4, VOCAB.size, (9,)), torch.randint(4, VOCAB.size, (7,))
    steps = 3
    n, capacity = 6, 6 + steps
    ids = torch.stack([long[:n], torch.cat([torch.zeros(2, dtype=torch.long), short[:4]])])  # row 1: 2 pads
    pos = torch.stack([torch.arange(n), torch.cat([torch.zeros(2, dtype=torch.long), torch.arange(4)])])
    mask = torch.ones(2, capacity, dtype=torch.long)
    mask[1, :2] = 0
    span = (10, 60)
    with torch.no_grad():
        cache = model.new_cache(capacity, static=True)
        out = [model(ids, positions=pos, attention_mask=mask, past_key_values=cache, cache_position=torch.arange(n), logits_to_keep=1, logits_span=span).logits]
        for t in range(steps):
            nxt = torch.stack([long[n + t], short[4 + t]])[:, None]
            p = torch.stack([torch.tensor(n + t), torch.tensor(4 + t)])[:, None]
            out.append(model(nxt, positions=p, attention_mask=mask, past_key_values=cache, cache_position=torch.tensor([n + t])).logits)
        ref_long = model(long[None, : n + steps]).logits[0, n - 1 :]
        ref_short = model(short[None, : 4 + steps]).logits[0, 3:]
    assert out[0].shape == (2, 1, span[1] - span[0])
    torch.testing.assert_close(out[0][:, 0], torch.stack([ref_long[0], ref_short[0]])[:, span[0] : span[1]], atol=1e-5, rtol=1e-5)
    got = torch.cat(out[1:], 1)  # (2, steps, V)
    torch.testing.assert_close(got[0], ref_long[1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], ref_short[1:], atol=1e-5, rtol=1e-5)


def test_bfloat16_cast_keeps_rope_in_float32():
    model = tiny_decoder()
    ids = torch.randint(4, VOCAB.size, (1, 40))
    with torch.no_grad():
        ref = model(ids).logits
        half = model.to(torch.bfloat16)(ids).logits.float()
    assert model.config.rope_inv_freq().dtype == torch.float32
    assert (half.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_decoder_loss_is_shifted_next_token_cross_entropy():
    model = tiny_decoder(z_loss=0.0)
    ids = torch.randint(4, VOCAB.size, (2, 6))
    labels = ids.clone()
    labels[:, :2] = -100
    out = model(ids, labels=labels)
    want = torch.nn.functional.cross_entropy(out.logits[:, 1:-1].reshape(-1, VOCAB.size), ids[:, 2:].reshape(-1))
    torch.testing.assert_close(out.loss, want)


def test_decoder_modality_softmax_is_cross_entropy_over_the_next_tokens_modality():
    """``modality_softmax``: the loss at t is -log softmax over the ids token t + 1's modality may
    take (captions and boxes share the text ids, so the modality comes from ``label_modality``);
    an end tag keeps the whole vocabulary. Checked by hand against the full logits of the same
    weights without it, on the fast path (``loss_labels``) and the full one (``labels``)."""
    import numpy as np

    from fourm.objectives.builders import collate_decoder, decoder_example

    torch.manual_seed(0)
    config = DecoderConfig(**config_from_vocab(VOCAB), dim=64, n_layers=2, n_heads=4, n_kv_heads=2)
    whole = DecoderLM(config).eval()
    model = DecoderLM(dataclasses.replace(config, modality_softmax=True)).eval()
    model.load_state_dict(whole.state_dict())
    text = lambda n: VOCAB.to_global("text", torch.randint(0, 120, (n,))).numpy()  # noqa: E731
    rng = np.random.default_rng(0)
    examples = [decoder_example({"rgb": VOCAB.to_global("rgb", torch.randint(0, 64, (4,))).numpy(), "caption": np.append(text(n), VOCAB.eos_id), "boxes": np.append(text(3), VOCAB.eos_id)}, VOCAB, {"rgb": 2}, rng, n_condition=1, shuffle=False) for n in (3, 5)]
    batch = collate_decoder(examples)
    labels, label_modality = batch.pop("labels"), batch.pop("label_modality")
    logits = whole(**batch).logits[:, :-1]
    y, nxt = labels[:, 1:], label_modality[:, 1:]
    want, tags = [], 0
    for b, t in (y != -100).nonzero().tolist():
        row, target = logits[b, t], int(y[b, t])
        name = list(VOCAB.modalities)[int(nxt[b, t])]
        allowed = VOCAB.allowed_mask(name)
        if VOCAB.ends_with_eos(name):  # sequence modalities may also emit the span-masking sentinels
            allowed[VOCAB.sentinel_id(0) : VOCAB.sentinel_id(VOCAB.num_sentinels - 1) + 1] = True
        if not allowed[target]:  # the end tag
            allowed, tags = torch.ones_like(allowed), tags + 1
        want.append(torch.logsumexp(row[allowed], 0) - row[target])
    want = torch.stack(want)
    assert tags == 2 * len(examples) and len(want) > 4 * tags  # content rows of both text modalities, and end tags
    fast = model(**batch, loss_labels=labels, label_modality=label_modality)
    got = fast.ce[torch.argsort(fast.index)]  # back in position order
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(**batch, labels=labels, label_modality=label_modality).loss, want.mean(), atol=1e-5, rtol=1e-5)
    assert whole(**batch, labels=labels).loss > want.mean() + 0.1  # the whole vocabulary's softmax: another loss
    with pytest.raises(ValueError, match="label_modality"):
        model(**batch, loss_labels=labels)
    for name in ("caption", "boxes"):  # begin tags carry no modality (an end tag does: the one it closes)
        assert (label_modality[batch["input_ids"] == VOCAB.begin_id(name)] == -1).all()
        assert (label_modality[batch["input_ids"] == VOCAB.end_id(name)] == list(VOCAB.modalities).index(name)).all()
    odd = labels.clone()  # a label that is not the next input (Hugging Face's convention allows it): outside its modality
    b, t = (labels[:, 1:] != -100).nonzero()[0].tolist()
    odd[b, t + 1] = VOCAB.end_id("rgb")
    fast = model(**batch, loss_labels=odd, label_modality=label_modality)
    assert torch.isfinite(fast.ce).all()
    torch.testing.assert_close(model(**batch, labels=odd, label_modality=label_modality).loss, fast.ce.mean(), atol=1e-5, rtol=1e-5)


# -- encoder-decoder ------------------------------------------------------------------------------
def _encdec_batch(model: EncoderDecoder):
    rgb, cap = model.modality_index("rgb"), model.modality_index("caption")
    enc_ids = VOCAB.to_global("rgb", torch.randint(0, 64, (2, 6)))
    enc_mod = torch.full((2, 6), rgb)
    grid = torch.tensor([[r, c] for r in range(2) for c in range(3)])
    enc_pos = grid[None].expand(2, 6, 2)
    enc_valid = torch.ones(2, 6, dtype=torch.bool)
    enc_valid[1, 5] = False
    text = VOCAB.to_global("text", torch.randint(0, 120, (2, 4)))
    dec_ids = torch.cat([torch.full((2, 3), VOCAB.mask_id), torch.full((2, 1), VOCAB.bos_id), text[:, :3]], 1)
    dec_mod = torch.tensor([[model.modality_index("depth")] * 3 + [cap] * 4] * 2)
    dec_pos = torch.cat([grid[:3], torch.arange(4)[:, None].expand(4, 2)])[None].expand(2, 7, 2)
    causal = dec_mod == cap
    labels = torch.cat([VOCAB.to_global("depth", torch.randint(0, 64, (2, 3))), text], 1)
    return dict(enc_ids=enc_ids, enc_modality=enc_mod, enc_positions=enc_pos, enc_valid=enc_valid, dec_ids=dec_ids, dec_modality=dec_mod, dec_positions=dec_pos, dec_causal=causal, dec_valid=torch.ones(2, 7, dtype=torch.bool)), labels


def test_encdec_restricts_logits_and_trains():
    model = tiny_encdec(z_loss=1e-4).train()
    batch, labels = _encdec_batch(model)
    out = model(**batch, labels=labels)
    depth, text = VOCAB.space_range("depth"), VOCAB.space_range("text")
    finite = torch.isfinite(out.logits)
    assert finite[0, 0, depth.start : depth.stop].all() and finite[0, 0].sum() == 64
    assert finite[0, 4, text.start : text.stop].all() and finite[0, 4, VOCAB.eos_id] and finite[0, 4, VOCAB.sentinel_id(0)]
    assert finite[0, 4].sum() == 120 + 1 + VOCAB.num_sentinels
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.embed.weight.grad is not None
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = float(out.loss.detach())
    for _ in range(30):
        opt.zero_grad()
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
    assert float(loss) < 0.5 * first


def test_encdec_information_flow():
    model = tiny_encdec()
    batch, _ = _encdec_batch(model)
    with torch.no_grad():
        base = model(**batch).logits
        later = dict(batch, dec_ids=batch["dec_ids"].clone())
        later["dec_ids"][:, 6] = VOCAB.space_range("text").start + 7  # a later caption token
        out = model(**later).logits
        torch.testing.assert_close(out[:, :6], base[:, :6])  # earlier caption and depth targets unchanged
        masked_enc = dict(batch, enc_ids=batch["enc_ids"].clone())
        masked_enc["enc_ids"][1, 5] = VOCAB.space_range("rgb").start  # a padding input token
        torch.testing.assert_close(model(**masked_enc).logits[1], base[1])
        masked_enc["enc_ids"][0, 0] = VOCAB.space_range("rgb").start + 9  # a visible input token
        assert not torch.allclose(model(**masked_enc).logits[0], base[0])


# -- presets, save/load ---------------------------------------------------------------------------
NOMINAL = {"b": 198e6, "l": 705e6, "xl": 2.8e9}  # 4M-B/L/XL sizes without embeddings


def _expected_params(cfg) -> int:
    d, hd = cfg.dim, cfg.dim // cfg.n_heads
    attn = d * (cfg.n_heads + 2 * cfg.n_kv_heads) * hd + cfg.n_heads * hd * d
    qk = {"none": 0, "rms": 2 * hd, "layernorm": 2 * (cfg.n_heads + cfg.n_kv_heads) * hd}[cfg.qk_norm]
    block = attn + qk + 3 * d * cfg.mlp_hidden + 2 * d
    if cfg.arch == "decoder":
        return cfg.n_layers * block + d
    cross = d * cfg.n_heads * hd + 2 * d * cfg.n_kv_heads * hd + cfg.n_heads * hd * d + qk + d
    pixels = 3 * cfg.pixel_patch**2 * d if cfg.rgb_pixels else 0  # the rgb patch projection
    if cfg.rgb_pixels and cfg.pixel_stem == "conv":  # and 4x4 bias-free convolutions, 4 channels in, halving to dim
        n = cfg.pixel_patch.bit_length() - 1
        ch = [4] + [max(16, d >> (n - i)) for i in range(1, n)] + [d]
        pixels += sum(16 * a * b for a, b in zip(ch, ch[1:]))
    return cfg.enc_layers * block + cfg.dec_layers * (block + cross) + 2 * d + len(cfg.modalities) * d + pixels


@pytest.mark.parametrize("path", sorted(PRESETS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_preset_builds_with_the_expected_size(path):
    with torch.device("meta"):
        model = build_model(path, vocab=VOCAB)
    n = count_parameters(model, exclude_embeddings=True)
    assert n == _expected_params(model.config)
    arch, size = path.stem.split("_")
    if size in NOMINAL:
        ratio = n / NOMINAL[size]
        if arch == "encdec":
            assert abs(ratio - 1) < 0.05, (path.stem, n)
        else:  # as many layers in all, without cross-attention
            assert 0.8 < ratio < 0.9, (path.stem, n)


def test_build_from_dataclass_dict_yaml_and_errors(tmp_path):
    cfg = make_config({"arch": "encdec", "dim": 32, "n_heads": 2, "n_kv_heads": 1})
    assert isinstance(cfg, EncDecConfig) and cfg.mlp_hidden == 128
    assert isinstance(build_model(DecoderConfig(vocab_size=10, dim=16, n_heads=2, n_kv_heads=2)), DecoderLM)
    with pytest.raises(Exception, match="arch"):
        make_config({"arch": "rnn"})
    with pytest.raises(Exception, match="bogus"):
        make_config({"arch": "decoder", "bogus": 1})
    with pytest.raises(Exception, match="multiple"):
        make_config({"arch": "decoder", "dim": 32, "n_heads": 4, "n_kv_heads": 3})


@pytest.mark.parametrize("factory", [tiny_decoder, tiny_encdec], ids=["decoder", "encdec"])
def test_save_load_round_trip_is_exact(factory, tmp_path):
    model = factory()
    save_pretrained(model, tmp_path / "m", vocab=VOCAB)
    assert (tmp_path / "m" / "model.safetensors").is_file() and (tmp_path / "m" / "vocab.json").is_file()
    loaded = load_model(tmp_path / "m")
    assert type(loaded) is type(model) and loaded.config == model.config
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path / "nothing")


def test_tied_embeddings_save_once(tmp_path):
    model = tiny_decoder(tie_embeddings=True)
    assert model.lm_head.weight is model.embed.weight
    save_pretrained(model, tmp_path / "t")
    loaded = load_model(tmp_path / "t")
    assert loaded.lm_head.weight is loaded.embed.weight and torch.equal(loaded.embed.weight, model.embed.weight)


def test_weights_that_do_not_fit_their_config_are_named(tmp_path):
    """A model directory whose weights do not fit its config.json (a shape, or a tensor missing)
    is a ValueError naming the tensor, not PyTorch's load_state_dict RuntimeError."""
    from safetensors.torch import load_file, save_file

    save_pretrained(tiny_decoder(), tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    state = load_file(str(weights))
    save_file({**state, "lm_head.weight": state["lm_head.weight"][:-1].contiguous()}, str(weights))
    with pytest.raises(ValueError, match=r"lm_head.weight: shape \(\d+, \d+\) in the checkpoint"):
        load_model(tmp_path / "m")
    save_file({k: v for k, v in state.items() if k != "lm_head.weight"}, str(weights))
    with pytest.raises(ValueError, match="missing lm_head.weight"):
        load_model(tmp_path / "m")


def test_encdec_cached_decoding_equals_full():
    model = tiny_encdec()
    cap = model.modality_index("caption")
    enc_ids = VOCAB.to_global("rgb", torch.randint(0, 64, (1, 6)))
    enc_mod, enc_pos, enc_valid = torch.full((1, 6), model.modality_index("rgb")), torch.arange(6)[None], torch.ones(1, 6, dtype=torch.bool)
    dec_ids = torch.cat([torch.tensor([[VOCAB.bos_id]]), VOCAB.to_global("text", torch.randint(0, 120, (1, 5)))], 1)
    mod, pos, causal, valid = torch.full((1, 6), cap), torch.arange(6)[None], torch.ones(1, 6, dtype=torch.bool), torch.ones(1, 6, dtype=torch.bool)
    with torch.no_grad():
        enc = model.encode(enc_ids, enc_mod, enc_pos, enc_valid)
        full = model.decode(enc, enc_valid, dec_ids, mod, pos, causal, valid, enc_positions=enc_pos)
        cache, kvs = model.new_cache(), model.context_kvs(enc, enc_pos)
        steps = [model.decode(enc, enc_valid, dec_ids[:, t : t + 1], mod[:, t : t + 1], pos[:, t : t + 1], causal[:, t : t + 1], valid[:, t : t + 1], cache=cache, context_kvs=kvs) for t in range(6)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_pack_sequence_layout():
    from fourm.sequence import pack_sequence

    caption = VOCAB.to_global("text", torch.tensor([5, 6, 7]))
    rgb = VOCAB.to_global("rgb", torch.arange(4))
    seq = pack_sequence([("caption", caption), ("rgb", rgb)], VOCAB, grids={"rgb": 2})
    assert seq.ids.tolist() == [VOCAB.bos_id, VOCAB.begin_id("caption"), *caption.tolist(), VOCAB.end_id("caption"), VOCAB.begin_id("rgb"), *rgb.tolist(), VOCAB.end_id("rgb")]
    assert seq.positions[:7].tolist() == [[p, p] for p in range(7)]
    assert seq.positions[7:11].tolist() == [[7, 7], [7, 8], [8, 7], [8, 8]]  # 2x2 grid from step 7
    assert seq.positions[11].tolist() == [9, 9]  # resumes after g = 2 steps
    assert seq.spans == {"caption": (2, 5), "rgb": (7, 11)}
    assert (seq.modality[7:11] == list(VOCAB.modalities).index("rgb")).all() and seq.modality[0] == -1
    model = tiny_decoder()
    with torch.no_grad():
        out = model(seq.ids[None], labels=seq.ids[None], positions=seq.positions[None])
    assert out.logits.shape == (1, 12, VOCAB.size) and torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="2x2 grid"):
        pack_sequence([("rgb", rgb[:3])], VOCAB, grids={"rgb": 2})


def test_from_pretrained_checks_the_class(tmp_path):
    model = tiny_encdec()
    model.save_pretrained(tmp_path / "e", vocab=VOCAB)
    assert isinstance(EncoderDecoder.from_pretrained(tmp_path / "e"), EncoderDecoder)
    import fourm

    assert isinstance(fourm.load_model(tmp_path / "e"), EncoderDecoder)
    with pytest.raises(TypeError, match="not a DecoderLM"):
        DecoderLM.from_pretrained(tmp_path / "e")


# -- placing the encoder-decoder's [MASK] queries: RoPE in cross-attention ---------------------------
def _copy_task(model: EncoderDecoder, classes: int, g: int = 3, n: int = 16):
    """rgb tokens (of ``classes`` kinds) on a g x g grid in; at each place, the depth token with
    the same index out: learnable only if a query finds the input at its own place."""
    rgb, depth = model.modality_index("rgb"), model.modality_index("depth")
    grid = torch.stack(torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij"), -1).reshape(-1, 2)[None].expand(n, g * g, 2)
    local = torch.randint(0, classes, (n, g * g))
    ones = torch.ones(n, g * g, dtype=torch.bool)
    batch = dict(enc_ids=VOCAB.to_global("rgb", local), enc_modality=torch.full((n, g * g), rgb), enc_positions=grid, enc_valid=ones,
                 dec_ids=torch.full((n, g * g), VOCAB.mask_id), dec_modality=torch.full((n, g * g), depth), dec_positions=grid, dec_causal=~ones, dec_valid=ones)
    return batch, VOCAB.to_global("depth", local)


def test_cross_attention_rope_is_relative():
    """Scores depend only on the query's offset from each context token."""
    torch.manual_seed(0)
    cross = CrossAttention(32, 2, 2, 16)
    x, ctx = torch.randn(1, 1, 32).expand(1, 3, 32), torch.randn(1, 4, 32)
    inv = rope_inv_freq(16)
    qpos, kpos = torch.tensor([[[0, 0], [2, 1], [5, 7]]]), torch.tensor([[[0, 0], [1, 1], [3, 2], [4, 4]]])
    base = cross(x, cross.context_kv(ctx, rope_cos_sin(kpos, inv)), None, rope_cos_sin(qpos, inv))
    shifted = cross(x, cross.context_kv(ctx, rope_cos_sin(kpos + 3, inv)), None, rope_cos_sin(qpos + 3, inv))
    torch.testing.assert_close(shifted, base, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(base[0, 0], base[0, 1], atol=1e-4)  # same query content, different places
    flat = cross(x, cross.context_kv(ctx), None)
    torch.testing.assert_close(flat[0, 0], flat[0, 1])  # without RoPE, place does not matter


def test_encdec_mask_queries_know_their_place():
    """[MASK] queries of an image target differ only by position. With RoPE in cross-attention the
    model learns to copy the input token at each query's place (without it, see the next test,
    every query of a target gets the same prediction)."""
    model = tiny_encdec().train()
    torch.manual_seed(1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # reached 0.01-0.05 by step 150 with every seed tried
    for _ in range(200):
        batch, labels = _copy_task(model, 4, n=32)
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < 0.2, float(loss)  # chance ln 4 = 1.39; the best guess from the bag of inputs about 1.2


def test_encdec_saved_before_cross_rope_loads_position_blind(tmp_path, caplog):
    save_pretrained(tiny_encdec(cross_rope=False), tmp_path / "m", vocab=VOCAB)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    del config["cross_rope"]  # as written before the field existed
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING):
        loaded = load_model(tmp_path / "m")
    assert loaded.config.cross_rope is False and "position-blind" in caplog.text
    batch, _ = _copy_task(loaded, 4)
    with torch.no_grad():
        blind, placed = loaded(**batch).logits, tiny_encdec()(**batch).logits
    torch.testing.assert_close(blind, blind[:, :1].expand_as(blind))  # one prediction for every place
    assert not torch.allclose(placed, placed[:, :1].expand_as(placed), atol=1e-4)
    with pytest.raises(ValueError, match="positions"):
        tiny_encdec().context_kvs(torch.zeros(1, 2, 64))


@pytest.mark.parametrize("make", [tiny_decoder, tiny_encdec])
def test_zero_init_out_starts_every_block_as_the_identity(make):
    # only the residual branches' output projections start at zero; everything else as before
    plain, zeroed = make(), make(zero_init_out=True)
    names = {n for n, p in zeroed.named_parameters() if not p.any()}
    assert names and all(n.endswith(("wo.weight", "down.weight")) for n in names)
    assert all(".wo." in n or ".down." in n or torch.equal(p, dict(plain.named_parameters())[n]) for n, p in zeroed.named_parameters())
    n_out = sum(isinstance(m, (Attention, CrossAttention)) for m in zeroed.modules()) + sum(n.endswith("down.weight") for n, _ in zeroed.named_parameters())
    assert len(names) == n_out
    # each block passes its input through unchanged
    block = (zeroed.blocks if hasattr(zeroed, "blocks") else zeroed.encoder)[0]
    x = torch.randn(1, 5, 64)
    cos, sin = rope_cos_sin(torch.arange(5)[None], zeroed.config.rope_inv_freq())
    assert torch.equal(block(x, cos, sin, None), x)
    assert not torch.equal((plain.blocks if hasattr(plain, "blocks") else plain.encoder)[0](x, cos, sin, None), x)
