"""Training: token-shard data stream, engines (single process, DDP, DeepSpeed ZeRO-2/3),
checkpoints, and the loop."""
