"""Quality evaluation: the evaluation suite, COCO box mAP, the caption -> rgb judge, caption
parsing, the condition gap and side-by-side arms. The pure metrics they use are ``fourm.metrics``;
speed benchmarks are ``fourm.bench``."""
