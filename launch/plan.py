#!/usr/bin/env python
"""Print the plan for a training config at scale: parameters, tokens per step, ZeRO-3 memory per GPU.

    python launch/plan.py --config configs/train/b_encdec.yaml --gpus 8 [--nodes 4] [--vocab-size 60000]
"""

from __future__ import annotations

from fourm.cli import ArgumentParser, markdown_table, positive_int, run, setup_logging, write_json
from fourm.config import load_config
from fourm.training.loop import TrainConfig
from fourm.training.plan import plan


def main(argv=None) -> int:
    p = ArgumentParser(prog="plan.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--gpus", type=positive_int, required=True, help="GPUs per node")
    p.add_argument("--nodes", type=positive_int, default=1)
    p.add_argument("--vocab-size", type=positive_int, default=60000, help="shared vocabulary size (default 60000)")
    p.add_argument("--seq-len", type=positive_int, default=None, help="tokens per sample (default: the masking budgets)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    setup_logging()
    cfg = load_config(TrainConfig, args.config)
    seq = args.seq_len or cfg.objective.masking.input_budget + cfg.objective.masking.target_budget
    result = plan(cfg, args.gpus, args.nodes, args.vocab_size, seq)
    print(f"{result['arch']}: {result['parameters'] / 1e6:.1f} M parameters ({result['parameters_without_embeddings'] / 1e6:.1f} M without embeddings), "
          f"{result['gpus']} GPUs, {result['tokens_per_step']:,} tokens per optimizer step"
          + (f", {result['steps_for_max_tokens']:,} steps for max_tokens" if result["steps_for_max_tokens"] else ""))
    rows = [[k, f"{v['gpu_gib_per_gpu']:.2f}", f"{v['cpu_gib_per_node']:.1f}"] for k, v in result["zero3_model_states"].items()]
    print(markdown_table(["ZeRO-3 model states", "GiB per GPU", "GiB CPU per node"], rows))
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    run(main)
