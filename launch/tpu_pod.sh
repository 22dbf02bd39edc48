#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (single host or pod): the same `varjax train` command runs on every worker.
# JAX detects the pod and its coordinator by itself (jax.distributed.initialize() needs no arguments on TPU
# VMs), every host feeds its share of each global batch, and only process 0 writes metrics.
#
# usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.field=value ...]
#   launch/tpu_pod.sh my-v4-64 us-central2-b configs/sweep_imagenet.py:member=d16 gs://BUCKET/sweep/d16 \
#       --config.tokenizer_dir=gs://BUCKET/models/vae --config.data.data_dir=gs://BUCKET/tfds
#
# WORKDIR must be visible from every host (a gs:// path or a shared file system): checkpoints are written
# by all hosts together. Environment: REPO_DIR (checkout on the workers, default ~/varjax), VENV (default
# $REPO_DIR/.venv), PROJECT (optional gcloud project). Install once on all workers, e.g.
#   gcloud compute tpus tpu-vm ssh TPU_NAME --zone ZONE --worker=all \
#       --command 'cd ~/varjax && python3 -m venv .venv && .venv/bin/pip install -e . "jax[tpu]"'
# A sweep: `varjax sweep launch --config SWEEP.py --root gs://BUCKET/sweep --print-commands` prints one
# `varjax train` line per member; pass each line's --config and --workdir to this script.
set -euo pipefail
if [ $# -lt 4 ]; then
  sed -n '2,18p' "$0" >&2
  exit 2
fi
TPU_NAME=$1
ZONE=$2
CONFIG=$3
WORKDIR=$4
shift 4
REPO_DIR=${REPO_DIR:-'~/varjax'}
VENV=${VENV:-"$REPO_DIR/.venv"}
EXTRA=()
if [ -n "${PROJECT:-}" ]; then EXTRA+=(--project "$PROJECT"); fi

ARGS=$(printf ' %q' "$@")
CMD="cd $REPO_DIR && source $VENV/bin/activate && varjax train --config $(printf %q "$CONFIG") \
--workdir $(printf %q "$WORKDIR")$ARGS"
echo "[tpu_pod] on every worker of $TPU_NAME: $CMD"
exec gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${EXTRA[@]}" --worker=all --command "$CMD"
