#!/usr/bin/env bash
# Usage: launch/tpu_pod.sh {create|install|run|fetch|delete} [CONFIG WORKDIR [overrides]]
#   TPU_NAME=asga ZONE=us-central2-b ACCELERATOR=v4-32 launch/tpu_pod.sh create
#   launch/tpu_pod.sh install                       # copy this checkout, pip install on all workers
#   launch/tpu_pod.sh run configs/resnet50_imagenet.py gs://BUCKET/runs/r50 \
#       --config.data.data_dir=gs://BUCKET/tfds
#   launch/tpu_pod.sh fetch gs://BUCKET/runs/r50 ./r50   # copy results back
#   launch/tpu_pod.sh delete
# Every worker runs the same command (--worker=all); jax.distributed.initialize() finds the pod
# from the TPU-VM environment. WORKDIR should be a gs:// path that every worker can write
# (orbax and TensorBoard write there directly). Flags: TPU_NAME, ZONE, ACCELERATOR, VERSION
# (the TPU-VM software version), PROJECT (default: gcloud's), REMOTE_DIR (default ~/asga_jax).
set -euo pipefail
TPU_NAME=${TPU_NAME:-asga}
ZONE=${ZONE:-us-central2-b}
ACCELERATOR=${ACCELERATOR:-v4-32}
VERSION=${VERSION:-tpu-ubuntu2204-base}
REMOTE_DIR=${REMOTE_DIR:-asga_jax}
project=()
if [[ -n "${PROJECT:-}" ]]; then project=(--project "$PROJECT"); fi
tpu() { gcloud compute tpus tpu-vm "$@" --zone "$ZONE" "${project[@]}"; }
on_all() { tpu ssh "$TPU_NAME" --worker=all --command "$1"; }
cmd=${1:-}
case "$cmd" in
  create)
    tpu create "$TPU_NAME" --accelerator-type "$ACCELERATOR" --version "$VERSION" ;;
  install)
    cd "$(dirname "$0")/.."
    git archive --format=tar.gz -o /tmp/asga_jax.tar.gz HEAD
    tpu scp /tmp/asga_jax.tar.gz "$TPU_NAME":/tmp/asga_jax.tar.gz --worker=all
    on_all "mkdir -p $REMOTE_DIR && tar -xzf /tmp/asga_jax.tar.gz -C $REMOTE_DIR && \
            cd $REMOTE_DIR && pip install -U 'jax[tpu]' && pip install -e ." ;;
  run)
    if [[ $# -lt 3 ]]; then sed -n '2,9p' "$0"; exit 2; fi
    shift; config=$1; workdir=$2; shift 2
    on_all "cd $REMOTE_DIR && python -m asga_jax.main --config $config --workdir $workdir $*" ;;
  fetch)
    if [[ $# -lt 3 ]]; then sed -n '2,9p' "$0"; exit 2; fi
    gsutil -m cp -r "$2" "$3" ;;
  delete)
    tpu delete "$TPU_NAME" --quiet ;;
  *)
    sed -n '2,13p' "$0"; exit 2 ;;
esac
