#!/usr/bin/env bash
# varjax vs the official PyTorch VAR on this machine (see bench/side_by_side.py for what is timed).
#
#   bench/side_by_side.sh OFFICIAL_CHECKOUT TORCH_VENV [extra side_by_side.py flags, e.g. --steps 5]
#
# One-time setup of the two inputs:
#   git clone https://github.com/FoundationVision/VAR /path/to/VAR
#   python -m venv /path/to/torchenv && /path/to/torchenv/bin/pip install torch
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if [ $# -lt 2 ]; then
  echo "usage: bench/side_by_side.sh OFFICIAL_CHECKOUT TORCH_VENV [--steps N ...]" >&2
  exit 2
fi
var_repo="$1"
torch_venv="$2"
shift 2
python="${VARJAX_PYTHON:-python}"
exec "$python" "$here/side_by_side.py" --var-repo "$var_repo" --torch-python "$torch_venv/bin/python" \
    --varjax-python "$python" --json "${SIDE_BY_SIDE_JSON:-side_by_side.json}" "$@"
