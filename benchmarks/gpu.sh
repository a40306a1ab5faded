#!/usr/bin/env bash
# Usage: benchmarks/gpu.sh OUTDIR [PYTHON]
# The GPU table of the README: ResNet-18 CIFAR (32px, batch 256) and ResNet-50 (224px, batch 128)
# in bfloat16, every step kind, with MFU and peak memory: one process per model and step group,
# each with a time limit of its own, so one slow compilation costs its own rows only. Results
# (JSON) and a log go to OUTDIR. Up to 30 minutes on one H200, most of it XLA compiling (the
# two-gradient supernet steps take about 50 s each for ResNet-18).
# Needs jax with CUDA, flax and optax; not TensorFlow (the input pipeline is not timed here).
set -uo pipefail
if [[ $# -lt 1 ]]; then sed -n '2,8p' "$0"; exit 2; fi
out=$1; python=${2:-python3}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
log="$out/gpu_benchmarks.log"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv \
  2>&1 | tee "$log"
"$python" -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__,
  "optax", optax.__version__, jax.devices())' 2>&1 | tee -a "$log"

# bench LIMIT_S NAME ARGS...: one benchmark process, killed after LIMIT_S seconds.
bench() {
  local limit=$1 name=$2; shift 2
  echo "== $name (limit ${limit}s): $*" | tee -a "$log"
  timeout "$limit" "$python" -m benchmarks.run --dtype bfloat16 --no-torch --no-input \
    --json "$out/$name.json" "$@" 2>&1 | grep -v -E '^(I0000|W0000|WARNING: All)' | tee -a "$log"
  echo "== $name: exit ${PIPESTATUS[0]}" | tee -a "$log"
}

# model size batch, then a time limit in seconds per step group
for run in "resnet18 32 256 fp=120 qat=180 supernet=360" \
           "resnet50 224 128 fp=150 qat=300 supernet=600"; do
  read -r model size batch limits <<<"$run"
  for limit in $limits; do
    group=${limit%=*}
    bench "${limit#*=}" "${model}_${size}px_bfloat16_$group" --model "$model" --size "$size" \
      --batch "$batch" --groups "$group"
  done
done
