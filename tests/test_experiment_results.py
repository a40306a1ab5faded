"""experiments/plot_results.py on hand-built workdirs: per-epoch means, epochs to convergence,
the summary and the files it writes."""

import json
import math
import sys

import numpy as np
import pytest
from PIL import Image

from experiments import plot_results


def test_per_epoch_means_group_steps_by_the_epoch_they_end_in():
  records = [{'kind': 'train', 'epoch': e, 'loss': v}
             for e, v in [(0.5, 4.0), (1.0, 2.0), (1.5, 1.0), (2.0, 3.0), (2.0, math.nan)]]
  records.append({'kind': 'eval', 'epoch': 1.0, 'loss': 9.0})
  epochs, means = plot_results.per_epoch(records, 'train', 'loss')
  np.testing.assert_array_equal(epochs, [1, 2])
  np.testing.assert_allclose(means, [3.0, 2.0])  # NaN skipped, eval records not mixed in


def test_epochs_to_converge_is_the_first_epoch_within_a_fraction_of_the_best():
  evals = [{'kind': 'eval', 'epoch': e, 'accuracy': a}
           for e, a in [(1, 0.50), (2, 0.80), (3, 0.895), (4, 0.90), (5, 0.85)]]
  assert plot_results.epochs_to_converge(evals) == 3  # 0.895 >= 0.99 * 0.90
  assert plot_results.epochs_to_converge(evals, fraction=1.0) == 4
  assert math.isnan(plot_results.epochs_to_converge([]))


def _write_run(workdir, *, sharpness, sigma, final_acc):
  """A finished run's files as asga_jax.main writes them, with known numbers."""
  for stage in plot_results.STAGES:
    (workdir / stage).mkdir(parents=True)
    lines = [{'kind': 'train', 'step': 10 * e, 'epoch': float(e), 'loss': 1.0 / e,
              'h': 0.01 * sigma, 'sigma_max': sigma + e, 'accuracy': 0.5}
             for e in (1, 2, 3)]
    lines += [{'kind': 'eval', 'step': 10 * e, 'epoch': float(e), 'accuracy': acc,
               'loss': 1.0} for e, acc in ((1, 0.6), (2, final_acc), (3, final_acc))]
    (workdir / stage / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in lines))
    np.savez(workdir / stage / 'landscape_1d.npz', alphas=np.linspace(-1, 1, 5),
             losses=np.array([3.0, 1.5, 1.0, 1.5, 3.0]) * sigma)
  (workdir / 'config.json').write_text(json.dumps({'search': {'sharpness': sharpness}}))
  (workdir / 'policy.json').write_text(json.dumps(
      {'format': 'asga_jax.policy/v1', 'layers': {'conv': {'w': 3, 'a': 2}}}))
  (workdir / 'results.json').write_text(json.dumps({
      'search': {'accuracy': 0.7, 'gbops': 0.5, 'lambda_max': 10 * sigma, 'mean_w_bits': 3.0,
                 'mean_a_bits': 2.0},
      'finetune': {'accuracy': final_acc, 'lambda_max': 5 * sigma},
      'eval': {'finetune': {'accuracy': final_acc}}}))
  Image.new('RGB', (8, 8)).save(workdir / 'bits.png')


def test_summary_and_plots_of_two_methods(tmp_path, monkeypatch, capsys):
  runs, out = tmp_path / 'runs', tmp_path / 'out'
  _write_run(runs / 'seed0' / 'edmips', sharpness='none', sigma=40.0, final_acc=0.88)
  _write_run(runs / 'seed0' / 'asga', sharpness='asga', sigma=20.0, final_acc=0.89)
  monkeypatch.setattr(sys, 'argv', ['plot_results', f'--runs={runs}', f'--out={out}', '0'])
  plot_results.main()
  summary = json.loads((out / 'summary.json').read_text())['seed0']
  assert set(summary) == {'edmips', 'asga'}  # asga_fixed did not run: left out, no error
  asga = summary['asga']
  assert asga['sigma_max_avg'] == pytest.approx(22.0)  # mean of 21, 22, 23
  assert asga['h_avg'] == pytest.approx(0.2)
  assert asga['lambda_max'] == 200.0 and asga['finetune_lambda_max'] == 100.0
  assert asga['finetune_top1'] == 0.89
  assert (asga['mean_w_bits'], asga['mean_a_bits']) == (3.0, 2.0)
  assert asga['finetune_epochs_to_converge'] == 2 and asga['policy']['layers']['conv']['w'] == 3
  table = capsys.readouterr().out
  assert ('| seed0 | ASGA | 89.00 | 70.00 | 0.5000 | 3.00/2.00 | 22.00 | 200.0 / 100.0 | 2 / 2 |'
          in table)
  for name in ('search_curves_seed0.png', 'finetune_curves_seed0.png',
               'landscape_search_seed0.png', 'landscape_finetune_seed0.png'):
    with Image.open(out / name) as image:
      assert image.size[0] > 300, name
  for method in ('edmips', 'asga'):  # each run's own bit-allocation plot, copied
    assert ((out / f'bits_{method}_seed0.png').read_bytes()
            == (runs / 'seed0' / method / 'bits.png').read_bytes())


def test_no_finished_run_names_the_directory(tmp_path, monkeypatch):
  monkeypatch.setattr(sys, 'argv', ['plot_results', f'--runs={tmp_path}', '--out=/tmp/x', '3'])
  with pytest.raises(SystemExit, match='seed3: no finished run'):
    plot_results.main()
