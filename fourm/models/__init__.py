"""Transformer blocks and the two architectures (encoder-decoder, decoder-only)."""
