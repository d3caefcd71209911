"""Training objectives as pure functions of token dicts and an RNG: 4M multimodal masking,
T5-style span masking for sequences, next-token and PrefixLM sequences, and their mixing."""
