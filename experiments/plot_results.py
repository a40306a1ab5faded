"""Plots and a summary of experiments/cifar10_asga_vs_edmips.sh, per seed.

  python -m experiments.plot_results --runs ~/asga_runs/cifar10_asga_vs_edmips \
      --out experiments/results 0 1

Reads <runs>/seed<N>/<method>/ for the methods that ran (edmips, asga_fixed, asga):
results.json, <stage>/metrics.jsonl, <stage>/landscape_1d.npz, bits.png. Writes into --out:
  search_curves_seed<N>.png     per-epoch loss, h, sigma_max and test accuracy of the searches
  finetune_curves_seed<N>.png   per-epoch train loss and test accuracy of the finetunings
  landscape_<stage>_seed<N>.png the 1-D landscapes of the runs after search and finetuning
  bits_<method>_seed<N>.png     each searched policy's bit allocation
  summary.json                  per seed and method: accuracies, GBOPs, mean bits,
                                average h and sigma_max, lambda_max after search and
                                finetuning, epochs to converge
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import shutil
from typing import Any

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from asga_jax.analysis import plot_landscape_1d  # noqa: E402
from asga_jax.files import save_figure, write_json  # noqa: E402
from asga_jax.train.summary import read_metrics, summarize_run  # noqa: E402

METHODS = {'edmips': 'EdMIPS', 'asga_fixed': 'ASGA, fixed rho', 'asga': 'ASGA'}
STAGES = ('search', 'finetune')


def per_epoch(records: list[dict[str, Any]], kind: str, key: str) -> tuple[np.ndarray, np.ndarray]:
  """(epochs, mean of ``key`` over the records of each epoch) for records of ``kind``."""
  groups = collections.defaultdict(list)
  for r in records:
    if r['kind'] == kind and key in r and math.isfinite(r[key]):
      groups[math.ceil(r['epoch'] - 1e-9)].append(r[key])
  epochs = np.array(sorted(groups))
  return epochs, np.array([np.mean(groups[e]) for e in epochs])


def epochs_to_converge(records: list[dict[str, Any]], fraction: float = 0.99) -> float:
  """The first epoch whose test accuracy reaches ``fraction`` of the run's best (NaN: none)."""
  epochs, acc = per_epoch(records, 'eval', 'accuracy')
  if not len(acc):
    return math.nan
  return float(epochs[np.argmax(acc >= fraction * acc.max())])


def plot_curves(records: dict[str, list[dict[str, Any]]], panels: list[tuple[str, str, str]],
                path: str, title: str) -> None:
  """One panel per (kind, key, label), one curve per method of ``records`` (method -> records)."""
  fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 3.8),
                           layout='constrained', squeeze=False)
  for ax, (kind, key, label) in zip(axes[0], panels):
    for method, method_records in records.items():
      epochs, values = per_epoch(method_records, kind, key)
      if len(values):
        ax.plot(epochs, 100 * values if key == 'accuracy' else values, marker='.',
                label=METHODS[method])
    ax.set(xlabel='epoch', ylabel=label, title=label)
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle(title)
  save_figure(fig, path, dpi=110)
  plt.close(fig)


def summarize(method: str, workdir: str, records: dict[str, list[dict[str, Any]]]
              ) -> dict[str, Any]:
  """The run's Table-3 figures, its policy and epochs to convergence (records: stage -> records)."""
  run = summarize_run(workdir, METHODS[method])
  with open(os.path.join(workdir, 'policy.json')) as f:
    policy = json.load(f)
  return {'sigma_max_avg': run.sigma_max_avg, 'h_avg': run.h_avg, 'lambda_max': run.lambda_max,
          'finetune_lambda_max': run.finetune_lambda_max,
          'search_top1': run.search_top1, 'finetune_top1': run.finetune_top1,
          'gbops': run.gbops, 'mean_w_bits': run.mean_w_bits, 'mean_a_bits': run.mean_a_bits,
          'policy': policy,
          'search_epochs_to_converge': epochs_to_converge(records['search']),
          'finetune_epochs_to_converge': epochs_to_converge(records['finetune'])}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--runs', required=True, help='RUNS of the experiment script')
  parser.add_argument('--out', required=True, help='directory for the plots and summary.json')
  parser.add_argument('seeds', nargs='+')
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  summary = {}
  for seed in args.seeds:
    base = os.path.join(os.path.expanduser(args.runs), f'seed{seed}')
    runs = {m: os.path.join(base, m) for m in METHODS
            if os.path.isfile(os.path.join(base, m, 'results.json'))}
    if not runs:
      raise SystemExit(f'{base}: no finished run of {", ".join(METHODS)}.')
    records = {m: {stage: read_metrics(w, stage) for stage in STAGES} for m, w in runs.items()}
    plot_curves({m: r['search'] for m, r in records.items()},
                [('train', 'loss', 'train loss'), ('train', 'h', 'surrogate gap h'),
                 ('train', 'sigma_max', 'sigma_max ~ 2h / rho^2'),
                 ('eval', 'accuracy', 'test top-1 (%)')],
                os.path.join(args.out, f'search_curves_seed{seed}.png'),
                f'Search on the proxy subset, seed {seed} (epoch means)')
    plot_curves({m: r['finetune'] for m, r in records.items()},
                [('train', 'loss', 'train loss'), ('eval', 'accuracy', 'test top-1 (%)')],
                os.path.join(args.out, f'finetune_curves_seed{seed}.png'),
                f'Finetuning each policy on CIFAR-10, seed {seed}')
    for stage in STAGES:
      curves = {}
      for method, workdir in runs.items():
        path = os.path.join(workdir, stage, 'landscape_1d.npz')
        if os.path.isfile(path):
          with np.load(path) as f:
            curves[METHODS[method]] = (f['alphas'], f['losses'])
      if curves:
        plot_landscape_1d(curves, os.path.join(args.out, f'landscape_{stage}_seed{seed}.png'),
                          title=f'Loss along a filter-normalized direction after {stage}')
    for method, workdir in runs.items():
      shutil.copyfile(os.path.join(workdir, 'bits.png'),
                      os.path.join(args.out, f'bits_{method}_seed{seed}.png'))
    summary[f'seed{seed}'] = {m: summarize(m, w, records[m]) for m, w in runs.items()}
  write_json(os.path.join(args.out, 'summary.json'), summary)
  print('| seed | method | finetune top-1 | search top-1 | GBOPs | mean bits w/a | avg sigma_max |'
        ' lambda_max after search / finetune | epochs to 99% of best: search / finetune |\n'
        '|---|---|---|---|---|---|---|---|---|')
  for seed, methods in summary.items():
    for method, r in methods.items():
      print(f'| {seed} | {METHODS[method]} | {100 * r["finetune_top1"]:.2f} | '
            f'{100 * r["search_top1"]:.2f} | {r["gbops"]:.4f} | '
            f'{r["mean_w_bits"]:.2f}/{r["mean_a_bits"]:.2f} | {r["sigma_max_avg"]:.2f} | '
            f'{r["lambda_max"]:.1f} / {r["finetune_lambda_max"]:.1f} | '
            f'{r["search_epochs_to_converge"]:.0f} / {r["finetune_epochs_to_converge"]:.0f} |')


if __name__ == '__main__':
  main()
