#!/usr/bin/env bash
# Usage: launch/multi_gpu.sh CONFIG WORKDIR [--config.FIELD=VALUE ...]
#   e.g. launch/multi_gpu.sh configs/resnet18_cifar.py /data/runs/r18 \
#          --config.data.data_dir=/data/tfds
# One process drives every GPU of this node (CUDA_VISIBLE_DEVICES selects them); the global
# batch (--config.batch_size) is split over them and must be a multiple of their number.
# Needs jax with CUDA: pip install -U "jax[cuda12]" (or jax[cuda13], as the driver allows).
set -euo pipefail
if [[ $# -lt 2 ]]; then sed -n '2,7p' "$0"; exit 2; fi
config=$1; workdir=$2; shift 2
cd "$(dirname "$0")/.."
python -c 'import jax
assert jax.default_backend() == "gpu", "no GPU visible to JAX"
print(jax.devices())'
# Let XLA use most of the GPU memory, but not preallocate all of it at start.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
exec python -m asga_jax.main --config "$config" --workdir "$workdir" "$@"
