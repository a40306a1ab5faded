#!/usr/bin/env bash
# EdMIPS against ASGA on real CIFAR-10 with ResNet-20: full-precision pretraining, a search of
# each method on a proxy subset of the train set at the same BOPs target, finetuning of each
# policy on the full train set, evaluation; then the Table-3-style comparison and the plots.
#
#   bash experiments/cifar10_asga_vs_edmips.sh             # the CPU schedule (hours; resumable)
#   SMOKE=1 bash experiments/cifar10_asga_vs_edmips.sh     # every step in minutes, tiny model
#
# Environment (defaults in brackets):
#   ARCHIVE  CIFAR-10 image-folder archive [../shared/data/cifar10-jpeg.tar.gz]
#   RUNS     where the workdirs go [~/asga_runs/cifar10_asga_vs_edmips]
#   RESULTS  where the tables and plots go [experiments/results]
#   SEEDS    space-separated seeds [0]
#   PRETRAIN_EPOCHS [30]  SEARCH_EPOCHS [10]  FINETUNE_EPOCHS [15]
#   PROXY    training images the searches see (class-balanced subset) [10000]
#   TARGET   BOPs target of both searches [3MP: uniform 3-bit BOPs]
#   METHODS  searches to run [edmips asga_fixed asga]; asga_fixed is ASGA with rho held at
#            rho0 (the paper's Figure 4 ablation of the adaptive radius)
#
# Interrupted? Run the same command again: each stage resumes from its last checkpoint and
# finished stages are skipped. Each method's search and finetuning start from the same
# pretrained checkpoint, with the same seed, data order and epochs.
set -euo pipefail
cd "$(dirname "$0")/.."

ARCHIVE=${ARCHIVE:-../shared/data/cifar10-jpeg.tar.gz}
RUNS=${RUNS:-$HOME/asga_runs/cifar10_asga_vs_edmips}
RESULTS=${RESULTS:-experiments/results}
SEEDS=${SEEDS:-0}
PRETRAIN_EPOCHS=${PRETRAIN_EPOCHS:-30}
SEARCH_EPOCHS=${SEARCH_EPOCHS:-10}
FINETUNE_EPOCHS=${FINETUNE_EPOCHS:-15}
PROXY=${PROXY:-10000}
TARGET=${TARGET:-3MP}
METHODS=${METHODS:-edmips asga_fixed asga}

if [[ "${SMOKE:-0}" == 1 ]]; then
  # The embedded 1,000-image sample, ResNet-8 at 16 px, one epoch per stage.
  data=(--config=configs/resnet20_cifar.py:smoke)
  PRETRAIN_EPOCHS=1 SEARCH_EPOCHS=1 FINETUNE_EPOCHS=1 PROXY=500
else
  if [[ ! -f "$ARCHIVE" ]]; then
    echo "error: $ARCHIVE not found; set ARCHIVE to the CIFAR-10 image-folder archive." >&2
    exit 2
  fi
  data=(--config=configs/resnet20_cifar.py:folder "--config.data.archive=$(realpath "$ARCHIVE")")
fi

run() {  # workdir, then --config.* overrides
  local workdir=$1
  shift
  echo "== $(date +%H:%M:%S) $workdir $*"
  python -m asga_jax.main "${data[@]}" --workdir="$workdir" "$@" \
    --config.diagnostics.landscape=1d
}

mkdir -p "$RESULTS"
for seed in $SEEDS; do
  base="$RUNS/seed$seed"
  run "$base/pretrain" --config.seed="$seed" --config.stages=pretrain \
    --config.pretrain.epochs="$PRETRAIN_EPOCHS"
  workdirs=()
  for method in $METHODS; do
    case $method in
      edmips)  # plain EdMIPS; the probe measures h and sigma_max at ASGA's rho0, unused
        sharpness=(--config.search.sharpness=none --config.search.probe_rho=0.1) ;;
      asga) sharpness=(--config.search.sharpness=asga) ;;
      asga_fixed) sharpness=(--config.search.sharpness=asga --config.search.asga.adaptive=false) ;;
      *) echo "error: unknown method $method (edmips, asga, asga_fixed)" >&2; exit 2 ;;
    esac
    workdirs+=("$base/$method")
    run "$base/$method" --config.seed="$seed" --config.stages=search,finetune,eval \
      --config.search.init="$base/pretrain/pretrain" \
      --config.finetune.init="$base/pretrain/pretrain" \
      --config.search.data.subset="$PROXY" --config.search.target="$TARGET" \
      --config.search.epochs="$SEARCH_EPOCHS" --config.finetune.epochs="$FINETUNE_EPOCHS" \
      "${sharpness[@]}"
  done
  python -m asga_jax.compare "${workdirs[@]}" --json="$RESULTS/table3_seed$seed.json" \
    | tee "$RESULTS/table3_seed$seed.md"
done
python -m experiments.plot_results --runs="$RUNS" --out="$RESULTS" $SEEDS
