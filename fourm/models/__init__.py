"""Transformer blocks and the two architectures (encoder-decoder, decoder-only); their saved form,
building and loading, vocabulary growth, LoRA adapters (peft) and the Hugging Face export."""
