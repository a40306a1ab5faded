#!/usr/bin/env bash
# Usage: launch/local.sh CONFIG WORKDIR [--config.FIELD=VALUE ...]
#   e.g. launch/local.sh configs/resnet20_cifar.py:demo /tmp/asga_demo
# One process on this machine, every local device (CPU, or all GPUs) in the data mesh.
# LOCAL_PROCESSES=N starts N processes on this machine instead (a multi-host rehearsal).
set -euo pipefail
if [[ $# -lt 2 ]]; then sed -n '2,5p' "$0"; exit 2; fi
config=$1; workdir=$2; shift 2
cd "$(dirname "$0")/.."
n=${LOCAL_PROCESSES:-1}
if [[ "$n" -eq 1 ]]; then
  exec python -m asga_jax.main --config "$config" --workdir "$workdir" "$@"
fi
port=${COORDINATOR_PORT:-12355}
pids=()
for ((i = 0; i < n; i++)); do
  python -m asga_jax.main --config "$config" --workdir "$workdir" \
      --coordinator_address="127.0.0.1:$port" --num_processes="$n" --process_id="$i" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
