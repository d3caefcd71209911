"""Evaluation metrics for images, depth, segmentation, boxes and tokenizer codebooks."""
