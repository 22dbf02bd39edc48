#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (single host or pod): the same `varjax train` command runs on every worker.
# Processes, hosts and chips: `gcloud compute tpus tpu-vm ssh --worker=all` starts the command once on each
# TPU VM host of the slice, so there is one process per host, driving that host's chips (e.g. 4 on v4; a
# v4-64 has 8 hosts x 4 chips = 32 devices). varjax sees a pod worker environment (TPU_WORKER_HOSTNAMES or
# the TPU metadata server listing more than one worker) and calls jax.distributed.initialize() with no
# arguments: JAX reads the coordinator, process count and id from the TPU VM. A single-host slice runs as
# one process without it. Each process prints "[train] process I/N, ... local devices, ... global devices"
# first, feeds its share of each global batch, and only process 0 writes metrics and configs.
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
  sed -n '2,21p' "$0" >&2
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
