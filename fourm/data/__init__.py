"""Data: raw multimodal shards (writing, reading, decoding), the embedded synthetic scenes, import."""
