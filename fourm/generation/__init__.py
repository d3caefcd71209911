"""Any-to-any generation: MaskGIT / ROAR for image-like targets, autoregressive decoding with a
KV cache for sequences and for the decoder-only model, classifier-free guidance, chained schedules."""
