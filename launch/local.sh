#!/usr/bin/env bash
# Train on one machine: one process driving all its local devices (GPUs, TPU chips or the CPU); no
# jax.distributed (the trainer prints "[train] process 0/1, D local devices, D global devices").
#
# usage: launch/local.sh CONFIG WORKDIR [--config.field=value ...]
#   launch/local.sh configs/var_shapes.py runs/var_shapes --config.tokenizer_dir=runs/tok_shapes
#   launch/local.sh configs/sweep_shapes.py:member=d2 runs/sweep/d2 --config.tokenizer_dir=runs/tok_shapes
#
# A whole sweep on one machine, one member after another:
#   varjax sweep launch --config configs/sweep_shapes.py --root runs/sweep --config.tokenizer_dir=...
#
# Re-running the same command resumes from the latest checkpoint in WORKDIR.
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,12p' "$0" >&2
  exit 2
fi
CONFIG=$1
WORKDIR=$2
shift 2
case "$WORKDIR" in
  *://*) varjax train --config "$CONFIG" --workdir "$WORKDIR" "$@" ;;  # a URL (gs://...): no local log file
  *) mkdir -p "$WORKDIR"
     varjax train --config "$CONFIG" --workdir "$WORKDIR" "$@" 2>&1 | tee -a "$WORKDIR/train.log" ;;
esac
