"""The benchmark entry point in quick mode: it runs, and its report is consistent."""

import json
import statistics

import jax
import numpy as np
import pytest

from asga_jax import models
from benchmarks import run, torch_reference

STEPS = ('fp_sgd', 'fp_sam', 'qat_sgd', 'saq', 'saq_et', 'supernet_sgd', 'asga', 'sam',
         'optax_sam')


@pytest.mark.slow
def test_quick_benchmark_times_every_step_kind(tmp_path):
  path = tmp_path / 'bench.json'
  run.main(['--quick', '--no-torch', '--json', str(path)])
  report = json.loads(path.read_text())
  results, ratios = report['results'], report['ratios']
  assert tuple(results) == STEPS
  quick = run.QUICK['rounds'] * run.QUICK['steps']
  for name, r in results.items():
    assert r['steps'] == quick, name
    assert r['min_ms'] <= r['median_ms'] <= r['max_ms'], name
    assert r['compile_s'] > 0 and r['xla_memory_mb'] > 0 and r['gflops'] > 0, name
  # Two gradient evaluations per sharpness step, in XLA's own FLOP count.
  for two, one in (('asga', 'supernet_sgd'), ('sam', 'supernet_sgd'), ('fp_sam', 'fp_sgd'),
                   ('saq', 'qat_sgd')):
    assert 1.8 < results[two]['gflops'] / results[one]['gflops'] < 2.2, two
  # SAQ-ET evaluates the sharpness gradient on one step in four.
  saq_et = results['saq_et']['gflops'] / results['qat_sgd']['gflops']
  assert saq_et == pytest.approx(1 + (results['saq']['gflops'] / results['qat_sgd']['gflops'] - 1)
                                 / 4, rel=0.02)
  # Ratios are medians of per-round ratios.
  expected = statistics.median(a / b for a, b in zip(results['asga']['round_ms'],
                                                     results['supernet_sgd']['round_ms']))
  assert ratios['asga/supernet_sgd']['value'] == pytest.approx(expected)
  assert ratios['asga/supernet_sgd']['met'] == (expected <= 2.05)
  assert not any(key.startswith('torch') for key in ratios)
  assert report['torch'] == 'skipped (--no-torch)'
  pipeline = report['input_pipeline']
  assert pipeline['decode']['images_per_s'] > 0 and pipeline['cached']['images_per_s'] > 0
  assert ratios['input/step']['value'] == pytest.approx(
      pipeline['decode']['images_per_s'] / pipeline['fastest_step_images_per_s'])


@pytest.mark.parametrize('argv, message', [
    (['--groups', 'fp,nope'], 'unknown'),
    (['--steps', '6'], 'multiple of 4'),
])
def test_bad_arguments_are_refused(argv, message, capsys):
  with pytest.raises(SystemExit):
    run.parse_args(argv)
  assert message in capsys.readouterr().err


def test_torch_reference_is_the_same_network():
  pytest.importorskip('torch')
  images, labels = np.zeros((2, 8, 8, 3), np.float32), np.zeros(2, np.int32)
  # ResNet-8, width 4, by hand: stem 108 + BN 8; stage 1: 2 * 144 + 16; stage 2: 288 + 576 +
  # 32 (BN) + 32 + 16 (shortcut); stage 3: 1152 + 2304 + 64 + 128 + 32; head 160 + 10.
  count = 116 + 304 + 944 + 3680 + 170
  results = torch_reference.time_steps(images, labels, depth=8, width=4, num_classes=10,
                                       num_params=count, warmup=1, steps=1)
  assert set(results) == {'torch_sgd', 'torch_sam'}
  with pytest.raises(RuntimeError, match='parameters'):
    torch_reference.time_steps(images, labels, depth=8, width=4, num_classes=10,
                               num_params=count + 1, warmup=0, steps=1)


def test_flax_resnet8_has_the_hand_counted_parameters():
  shapes = jax.eval_shape(models.create_model('resnet8', num_classes=10, width=4).init,
                          jax.random.key(0), np.zeros((1, 8, 8, 3), np.float32))
  assert sum(x.size for x in jax.tree.leaves(shapes['params'])) == 5214
