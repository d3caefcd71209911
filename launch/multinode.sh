#!/usr/bin/env bash
# Multi-node pretraining with the DeepSpeed launcher and a hostfile.
#
#   HOSTFILE=hostfile CONFIG=configs/train/b_encdec.yaml DATA=/data/fourm/tokens/train OUT=runs/b \
#     bash launch/multinode.sh [extra launch/train.py arguments]
#
# hostfile lines look like "node1 slots=8". Every node needs the same repo path, the venv and the
# data (or webdataset URLs). Add --resume to continue a run.
set -euo pipefail
cd "$(dirname "$0")/.."
HOSTFILE=${HOSTFILE:-hostfile}
CONFIG=${CONFIG:-configs/train/b_encdec.yaml}
DS_CONFIG=${DS_CONFIG:-configs/deepspeed/zero3.json}
OUT=${OUT:-runs/train}
DATA_ARGS=()
if [[ -n "${DATA:-}" ]]; then DATA_ARGS=(--data "$DATA"); fi
exec .venv/bin/deepspeed --hostfile "$HOSTFILE" launch/train.py \
  --config "$CONFIG" --deepspeed "$DS_CONFIG" --out "$OUT" "${DATA_ARGS[@]}" "$@"
