#!/usr/bin/env bash
# The GPU suite: correctness, d16 bf16 training, sampling and memory of varjax and of the official code on one
# GPU, in at most 9 minutes, each part in its own time box (`timeout`), so that a slow part cannot eat the rest.
#
#   bash bench/gpu_suite.sh OUT_DIR [--cpu-smoke] [--budget SECONDS] [--python PY] [--torch-python PY]
#                                   [--official DIR] [--wheels DIR] [--block-tf]
#
# OUT_DIR receives one JSON file per part (bench/gpu_suite.py and bench/official_bench.py write them), logs/PART.log,
# parts.tsv (status, seconds and time box of each part), summary.json and summary.md (the tables, printed last).
#
#   --cpu-smoke      the same parts with tiny shapes on this machine's CPU (JAX_PLATFORMS=cpu); the official code's
#                    parts run only when --torch-python is given
#   --budget S       the whole run's seconds (default 540, 90 with --cpu-smoke); every part's box scales with it
#   --python PY      python for varjax (default $VARJAX_PYTHON, else python3)
#   --torch-python   python with torch for the official code (default: the varjax python, except with --cpu-smoke)
#   --official DIR   checkout of https://github.com/FoundationVision/VAR (default .gpu/VAR in this checkout)
#   --wheels DIR     wheels installed (to a temporary folder) when the python lacks ml_collections (default
#                    .gpu/wheels); bench/README.md says how to download them
#   --block-tf       make tensorflow and tensorflow_datasets unimportable (proves nothing on the path needs them)
#
# Exit status: 0 when every varjax part finished and the correctness checks passed.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"

if [ $# -lt 1 ] || [[ "$1" == -* ]]; then
  sed -n '2,25p' "$0" >&2
  exit 2
fi
out="$1"
shift
smoke=0
budget=""
py="${VARJAX_PYTHON:-python3}"
torch_py=""
official="$root/.gpu/VAR"
wheels="$root/.gpu/wheels"
block_tf=0
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke) smoke=1 ;;
    --budget) budget="$2"; shift ;;
    --python) py="$2"; shift ;;
    --torch-python) torch_py="$2"; shift ;;
    --official) official="$2"; shift ;;
    --wheels) wheels="$2"; shift ;;
    --block-tf) block_tf=1 ;;
    *) echo "gpu_suite.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

start=$(date +%s)
mkdir -p "$out/logs"
out="$(cd "$out" && pwd)"
rm -f "$out"/*.json "$out/parts.tsv" "$out/summary.md"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

# Time boxes in seconds at the default budget (they add up to it, less a few seconds for set-up and the report).
# GPU: compiling the d16 programs dominates (the remat trial's programs are reused from the compilation cache).
declare -A box
if [ "$smoke" = 1 ]; then
  default_budget=90
  box=([env]=6 [attention]=13 [golden]=13 [remat]=19 [train]=9 [official_train]=6 [sample]=12 [official_sample]=6)
  mode=(--smoke)
  export JAX_PLATFORMS=cpu
  # tiny shapes: compile time is the run time, so LLVM's optimisations and the MLIR fusion emitters are off (the
  # smoke run's timings mean nothing)
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
  XLA_FLAGS+=" --xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1"
  export JAX_TRACEBACK_IN_LOCATIONS_LIMIT=0  # no stack frames in the programs' metadata: faster compiles
else
  default_budget=540
  box=([env]=30 [attention]=45 [golden]=45 [remat]=100 [train]=80 [official_train]=35 [sample]=90 [official_sample]=30)
  mode=()
  torch_py="${torch_py:-$py}"
fi
budget="${budget:-$default_budget}"
deadline=$((start + budget - 3))

export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
# a fresh persistent compilation cache: the remat trial fills it, the train part reads its programs back
export VARJAX_COMPILE_CACHE="$scratch/compile_cache"

if [ "$block_tf" = 1 ]; then
  for m in tensorflow tensorflow_datasets; do
    mkdir -p "$scratch/block_tf/$m"
    echo "raise ImportError('$m is made unimportable in this run (gpu_suite.sh --block-tf)')" \
      > "$scratch/block_tf/$m/__init__.py"
  done
  export PYTHONPATH="$scratch/block_tf:$PYTHONPATH"
fi

# Python packages the image lacks travel as wheels (bench/README.md): installed into a temporary folder.
if ! "$py" -c "import ml_collections" 2>/dev/null; then
  if compgen -G "$wheels/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$scratch/site" \
      "$wheels"/*.whl && export PYTHONPATH="$PYTHONPATH:$scratch/site"
  else
    echo "[gpu-suite] $py cannot import ml_collections and $wheels holds no wheels: see bench/README.md" >&2
  fi
fi

# run_part NAME BOX COMMAND...: COMMAND under `timeout`, in at most BOX seconds (scaled to the budget) and never
# past the deadline; one line per part in parts.tsv.
run_part() {
  local name="$1" base="$2"
  shift 2
  local now left b t0 rc status why=""
  now=$(date +%s)
  left=$((deadline - now))
  b=$((base * budget / default_budget))
  [ "$b" -gt "$left" ] && b=$left
  if [ "$b" -lt 3 ]; then
    printf '%s\tskipped\t0\t0\t%s\t%s\n' "$name" "$b" "no time left in the budget" >> "$out/parts.tsv"
    echo "[gpu-suite] $name: skipped (no time left)"
    return 0
  fi
  t0=$(date +%s)
  timeout -k 5 "$b" "$@" > "$out/logs/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status=timeout; why="stopped after its ${b}s box" ;;
    *) status=failed; why="$(grep -v '^\s*$' "$out/logs/$name.log" | tail -1 | tr '\t' ' ' | cut -c1-200)" ;;
  esac
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$(( $(date +%s) - t0 ))" "$b" "$why" >> "$out/parts.tsv"
  echo "[gpu-suite] $name: $status in $(( $(date +%s) - t0 ))s (box ${b}s)"
}

skip_part() {
  printf '%s\tskipped\t0\t0\t0\t%s\n' "$1" "$2" >> "$out/parts.tsv"
  echo "[gpu-suite] $1: skipped ($2)"
}

suite=("$py" "$here/gpu_suite.py")
run_part env "${box[env]}" "${suite[@]}" env --out "$out" "${mode[@]}"
run_part attention "${box[attention]}" "${suite[@]}" attention --out "$out" "${mode[@]}"
run_part golden "${box[golden]}" "${suite[@]}" golden --out "$out" "${mode[@]}"
run_part remat "${box[remat]}" "${suite[@]}" remat --out "$out" "${mode[@]}"
run_part train "${box[train]}" "${suite[@]}" train --out "$out" "${mode[@]}"

official_ok=""
if [ -z "$torch_py" ]; then
  official_ok="no --torch-python given"
elif [ ! -d "$official/models" ]; then
  official_ok="no official checkout at $official"
elif ! "$torch_py" -c "import torch" 2>/dev/null; then
  official_ok="$torch_py cannot import torch"
fi
read -r -a off_args <<< "$("${suite[@]}" official-args "${mode[@]}")"
read -r -a train_batches <<< "$("${suite[@]}" official-args --field train_batches "${mode[@]}")"
read -r -a sample_batches <<< "$("${suite[@]}" official-args --field sample_batches "${mode[@]}")"
read -r -a steps <<< "$("${suite[@]}" official-args --field steps "${mode[@]}")"
official_run() {  # official_run PART_NAME BOX WHAT BATCH DTYPE STEPS
  if [ -n "$official_ok" ]; then
    skip_part "$1" "$official_ok"
  else
    run_part "$1" "$2" "$torch_py" "$here/official_bench.py" --var-repo "$official" --what "$3" --batch-size "$4" \
      --dtype "$5" --steps "$6" --json "$out/$1.json" "${off_args[@]}"
  fi
}
for b in "${train_batches[@]}"; do
  official_run "official_train_b$b" "${box[official_train]}" train "$b" bfloat16 "${steps[0]}"
done

run_part sample "${box[sample]}" "${suite[@]}" sample --out "$out" "${mode[@]}"
for b in "${sample_batches[@]}"; do  # the official demo samples under fp16 autocast
  official_run "official_sample_b$b" "${box[official_sample]}" sample "$b" float16 "${steps[1]}"
done

"${suite[@]}" report --out "$out" "${mode[@]}" --wall "$(( $(date +%s) - start ))"
status=$?
echo "[gpu-suite] total $(( $(date +%s) - start ))s of a ${budget}s budget; results in $out"
exit $status
