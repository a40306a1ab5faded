"""Summaries of finished runs read from their workdirs (results.json, metrics.jsonl)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from typing import Any


@dataclasses.dataclass(frozen=True)
class RunSummary:
  """What the ASGA paper's Table 3 reports of a run, and a little more.

  Attributes:
    label: name of the run in the table.
    workdir: where it was read from.
    sharpness: the search's sharpness method ('asga', 'none', ...).
    sigma_max_avg: average sigma_max ~ 2h/rho^2 over the search's logged steps
      (NaN when the search measured none; see ``search.probe_rho``).
    h_avg: average surrogate gap over the same steps.
    lambda_max: top Hessian eigenvalue at the end of the search (NaN if not measured).
    finetune_lambda_max: the same at the end of finetuning.
    search_top1, finetune_top1: eval accuracy at the end of those stages.
    gbops: BOPs of the searched policy (at the search resolution).
    mean_w_bits, mean_a_bits: the searched policy's weight and activation bits,
      averaged over its searched layers (the 8-bit first and last layers excluded).
  """
  label: str
  workdir: str
  sharpness: str
  sigma_max_avg: float
  h_avg: float
  lambda_max: float
  finetune_lambda_max: float
  search_top1: float
  finetune_top1: float
  gbops: float
  mean_w_bits: float
  mean_a_bits: float


def read_metrics(workdir: str, stage: str) -> list[dict[str, Any]]:
  """The stage's metrics.jsonl records, one per (kind, step): a resumed run's repeats win.

  A line cut short by a killed run (and the line appended after it) is skipped.
  """
  path = os.path.join(workdir, stage, 'metrics.jsonl')
  if not os.path.isfile(path):
    return []
  records = {}
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      records[(record['kind'], record['step'])] = record
  return [records[key] for key in sorted(records, key=lambda k: (k[1], k[0]))]


def _mean(records: Sequence[dict[str, Any]], key: str) -> float:
  values = [r[key] for r in records if r['kind'] == 'train' and key in r
            and math.isfinite(r[key])]
  return sum(values) / len(values) if values else math.nan


def summarize_run(workdir: str, label: str | None = None) -> RunSummary:
  """Reads one workdir.

  Raises:
    FileNotFoundError: the workdir has no results.json (not an asga_jax run,
      or nothing finished yet).
  """
  results_path = os.path.join(workdir, 'results.json')
  if not os.path.isfile(results_path):
    raise FileNotFoundError(f'{workdir} has no results.json: pass the --workdir of a finished '
                            'asga_jax run.')
  with open(results_path) as f:
    results = json.load(f)
  config = {}
  if os.path.isfile(os.path.join(workdir, 'config.json')):
    with open(os.path.join(workdir, 'config.json')) as f:
      config = json.load(f)
  search, finetune = results.get('search', {}), results.get('finetune', {})
  records = read_metrics(workdir, 'search')
  nan = math.nan
  return RunSummary(
      label=label or os.path.basename(os.path.normpath(workdir)), workdir=workdir,
      sharpness=config.get('search', {}).get('sharpness', '?'),
      sigma_max_avg=_mean(records, 'sigma_max'), h_avg=_mean(records, 'h'),
      lambda_max=search.get('lambda_max', nan),
      finetune_lambda_max=finetune.get('lambda_max', nan), search_top1=search.get('accuracy', nan),
      finetune_top1=results.get('eval', {}).get('finetune', finetune).get('accuracy', nan),
      gbops=search.get('gbops', nan), mean_w_bits=search.get('mean_w_bits', nan),
      mean_a_bits=search.get('mean_a_bits', nan))


def format_table(runs: Sequence[RunSummary]) -> str:
  """A Markdown table, one row per run, then the change of the last row against the first."""
  fmt = lambda x, spec: 'n/a' if not math.isfinite(x) else format(x, spec)
  lines = ['| run | search sharpness | avg sigma_max | avg h | lambda_max | search top-1 | '
           'finetune top-1 | GBOPs | mean bits w/a |', '|---|---|---|---|---|---|---|---|---|']
  for r in runs:
    lines.append(f'| {r.label} | {r.sharpness} | {fmt(r.sigma_max_avg, ".2f")} | '
                 f'{fmt(r.h_avg, ".4f")} | {fmt(r.lambda_max, ".2f")} | '
                 f'{fmt(100 * r.search_top1, ".2f")} | {fmt(100 * r.finetune_top1, ".2f")} | '
                 f'{fmt(r.gbops, ".4f")} | '
                 f'{fmt(r.mean_w_bits, ".2f")}/{fmt(r.mean_a_bits, ".2f")} |')
  if len(runs) >= 2:
    a, b = runs[0], runs[-1]
    delta = lambda x, y, scale=1.0: fmt(scale * (y - x), '+.2f')
    lines.append(f'| {b.label} - {a.label} | | {delta(a.sigma_max_avg, b.sigma_max_avg)} | '
                 f'{fmt(b.h_avg - a.h_avg, "+.4f")} | {delta(a.lambda_max, b.lambda_max)} | '
                 f'{delta(a.search_top1, b.search_top1, 100)} | '
                 f'{delta(a.finetune_top1, b.finetune_top1, 100)} | '
                 f'{fmt(b.gbops - a.gbops, "+.4f")} | {delta(a.mean_w_bits, b.mean_w_bits)}/'
                 f'{delta(a.mean_a_bits, b.mean_a_bits)} |')
  notes = [r.label for r in runs if not math.isfinite(r.sigma_max_avg)]
  if notes:
    lines.append(f'\n{", ".join(notes)}: no sigma_max was measured during the search; rerun '
                 'with --config.search.probe_rho=0.1 to measure it without changing the '
                 'search (the paper\'s baseline column).')
  return '\n'.join(lines)
