"""Speed benchmarks (``eval/bench.py``): training and decoding throughput side by side with Hugging
Face peers, the data loader, the tokenizers, ZeRO-3 memory. Quality evaluation is ``fourm.eval``."""
