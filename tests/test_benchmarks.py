"""The benchmark entry point in quick mode: it runs, and its report is consistent."""

import json
import os
import statistics
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asga_jax import models, onednn, quant
from benchmarks import run, torch_reference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# ResNet-8, width 4, 8x8 input, MACs per example by hand (output pixels x fan-in x filters):
# stem 64 * 27 * 4; stage 1: 2 * 64 * 36 * 4; stage 2 (4x4): 16 * (36 * 8 + 72 * 8 + 4 * 8
# shortcut); stage 3 (2x2): 4 * (72 * 16 + 144 * 16 + 8 * 16); head 16 * 10.
RESNET8_MACS = 6912 + 18432 + 14336 + 14336 + 160
STEPS = ('fp_sgd', 'fp_sam', 'qat_sgd', 'saq', 'saq_et', 'supernet_sgd', 'asga', 'sam',
         'optax_sam')


@pytest.mark.slow
def test_quick_benchmark_times_every_step_kind(tmp_path, monkeypatch):
  # XLA's own convolutions: its cost model (checked below) counts no custom call,
  # so with the oneDNN ones it would see only the elementwise work.
  monkeypatch.setenv(onednn.conv.OPT_OUT, '0')
  path = tmp_path / 'bench.json'
  run.main(['--quick', '--no-torch', '--json', str(path)])
  report = json.loads(path.read_text())
  results, ratios = report['results'], report['ratios']
  assert report['machine']['convolutions'] == 'XLA'
  assert tuple(results) == STEPS
  quick = run.QUICK['rounds'] * run.QUICK['steps']
  for name, r in results.items():
    assert r['steps'] == quick, name
    assert r['min_ms'] <= r['median_ms'] <= r['max_ms'], name
    assert r['compile_s'] > 0 and r['xla_memory_mb'] > 0 and r['gflops'] > 0, name
  # Model FLOPs (what MFU divides): 6 per MAC, example and gradient evaluation.
  evals = {'fp_sam': 2, 'saq': 2, 'saq_et': 1.25, 'asga': 2, 'sam': 2, 'optax_sam': 2}
  for name, r in results.items():
    assert r['model_gflops'] * 1e9 == pytest.approx(
        6 * RESNET8_MACS * run.QUICK['batch'] * evals.get(name, 1)), name
  # Two gradient evaluations per sharpness step, in XLA's own FLOP count.
  for two, one in (('asga', 'supernet_sgd'), ('sam', 'supernet_sgd'), ('fp_sam', 'fp_sgd'),
                   ('saq', 'qat_sgd')):
    assert 1.8 < results[two]['gflops'] / results[one]['gflops'] < 2.2, two
  # SAQ-ET evaluates the sharpness gradient on one step in four.
  saq_et = results['saq_et']['gflops'] / results['qat_sgd']['gflops']
  assert saq_et == pytest.approx(1 + (results['saq']['gflops'] / results['qat_sgd']['gflops'] - 1)
                                 / 4, rel=0.02)
  # Its round cost weighs the medians of its two phases 1:3.
  phases = results['saq_et']['phase_round_ms']
  for cost, sharp, reuse in zip(results['saq_et']['round_ms'], phases['sharpness'],
                                phases['reuse']):
    assert cost == pytest.approx(sharp / 4 + 3 * reuse / 4)
  assert {'saq_et sharpness step/qat_sgd', 'saq_et reuse step/qat_sgd'} <= set(ratios)
  # Ratios are medians of per-round ratios.
  expected = statistics.median(a / b for a, b in zip(results['asga']['round_ms'],
                                                     results['supernet_sgd']['round_ms']))
  assert ratios['asga/supernet_sgd']['value'] == pytest.approx(expected)
  assert ratios['asga/supernet_sgd']['met'] == (expected <= 2.05)
  assert not any('torch' in key for key in ratios)
  assert report['torch'] == 'skipped (--no-torch)'
  pipeline = report['input_pipeline']
  assert pipeline['decode']['images_per_s'] > 0 and pipeline['cached']['images_per_s'] > 0
  assert ratios['input/step']['value'] == pytest.approx(
      pipeline['decode']['images_per_s'] / pipeline['fastest_step_images_per_s'])


@pytest.mark.parametrize('sharpness, reuse, tau', [(1.8, 1.0, 6), (1.6, 1.0, 4), (1.8, 1.2, None)])
def test_saq_et_tau_for_the_target_from_its_phases(sharpness, reuse, tau):
  # By hand: (1.8 + 4) / 5 = 1.16 > 1.15 >= (1.8 + 5) / 6 = 1.133; (1.6 + 3) / 4 = 1.15;
  # reuse steps above the target never average below it.
  qat = [100.0, 200.0]
  table = run._saq_et_phases({'sharpness': [100 * sharpness, 200 * sharpness],
                              'reuse': [100 * reuse, 200 * reuse]}, qat)
  assert table['saq_et sharpness step/qat_sgd']['value'] == pytest.approx(sharpness)
  assert table['saq_et reuse step/qat_sgd']['value'] == pytest.approx(reuse)
  assert table['saq_et tau for <= 1.15']['value'] == tau


def test_steps_and_benchmark_import_without_tensorflow():
  # A GPU box's CUDA image often has JAX but no TensorFlow: the steps and the benchmark
  # (with --no-input) must not need it; the training program's entry points load it lazily.
  code = ('import sys\n'
          'for name in ("tensorflow", "tensorflow_datasets", "ml_collections", "clu"):\n'
          '  sys.modules[name] = None  # importing it now raises ImportError\n'
          'import benchmarks.run, asga_jax.train.steps\n'
          'import asga_jax.train as train\n'
          'try:\n'
          '  train.train_and_evaluate\n'
          'except ImportError:\n'
          '  print("lazy")\n')
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                       check=True)
  assert out.stdout.strip() == 'lazy'


def test_gpu_script_prints_its_usage():
  out = subprocess.run(['bash', 'benchmarks/gpu.sh'], cwd=REPO, capture_output=True, text=True)
  assert out.returncode == 2 and out.stdout.startswith('# Usage: benchmarks/gpu.sh OUTDIR')


@pytest.mark.parametrize('argv, message', [
    (['--groups', 'fp,nope'], 'unknown'),
    (['--steps', '6'], 'must be a multiple of --saq-tau (4)'),
    (['--steps', '8', '--saq-tau', '3'], 'must be a multiple of --saq-tau (3)'),
    (['--saq-tau', '1'], '--saq-tau must be at least 2'),
])
def test_bad_arguments_are_refused(argv, message, capsys):
  with pytest.raises(SystemExit):
    run.parse_args(argv)
  assert message in capsys.readouterr().err


# ResNet-8, width 4, by hand: stem 108 + BN 8; stage 1: 2 * 144 + 16; stage 2: 288 + 576 +
# 32 (BN) + 32 + 16 (shortcut); stage 3: 1152 + 2304 + 64 + 128 + 32; head 160 + 10.
RESNET8_PARAMS = 116 + 304 + 944 + 3680 + 170
# Quantized: two clipping levels in each of the 10 conv/dense layers; the supernet adds
# 4 + 4 bit logits to each of the 8 searched layers (not the 8-bit stem and head).
RESNET8_COUNTS = {'fp': RESNET8_PARAMS, 'qat': RESNET8_PARAMS + 20,
                  'supernet': RESNET8_PARAMS + 20 + 64}


def test_torch_reference_is_the_same_network():
  pytest.importorskip('torch')
  images, labels = np.zeros((2, 8, 8, 3), np.float32), np.zeros(2, np.int32)
  kwargs = dict(depth=8, width=4, num_classes=10, bits=(2, 3, 4, 6), warmup=1, steps=1)
  results = torch_reference.time_steps(images, labels, num_params=RESNET8_COUNTS,
                                       groups=('fp', 'qat', 'supernet'), **kwargs)
  assert set(results) == {'torch_sgd', 'torch_sam', 'torch_qat_sgd', 'torch_supernet_sgd',
                          'torch_asga'}
  with pytest.raises(RuntimeError, match='torch_qat_sgd: .* parameters'):
    torch_reference.time_steps(images, labels, groups=('qat',),
                               num_params={'qat': RESNET8_COUNTS['qat'] + 1}, **kwargs)


def test_torch_reference_times_in_a_process_of_its_own():
  pytest.importorskip('torch')
  images, labels = np.zeros((2, 8, 8, 3), np.float32), np.zeros(2, np.int32)
  kwargs = dict(depth=8, width=4, num_classes=10, bits=(2, 3, 4, 6), warmup=1, steps=2)
  results = torch_reference.time_steps_apart(images, labels, num_params=RESNET8_COUNTS,
                                             groups=('fp',), **kwargs)
  assert set(results) == {'torch_sgd', 'torch_sam'}
  assert results['torch_sgd']['steps'] == 2 and results['torch_sgd']['median_ms'] > 0
  # Its errors reach the caller.
  with pytest.raises(RuntimeError, match='torch_sgd: .* parameters'):
    torch_reference.time_steps_apart(images, labels, groups=('fp',),
                                     num_params={'fp': RESNET8_COUNTS['fp'] + 1}, **kwargs)


@pytest.mark.parametrize('signed', [False, True])
@pytest.mark.parametrize('bits', [(4,), (2, 3, 4, 6)])
def test_torch_quantizer_matches_the_library(signed, bits):
  torch = pytest.importorskip('torch')
  x = np.random.default_rng(0).normal(size=(64,)).astype(np.float32) * 3
  logits = np.array([0.3, -0.2, 0.1, 0.5], np.float32)[:len(bits)]
  probs = None if len(bits) == 1 else jax.nn.softmax(logits)
  quantize = quant.quantize_signed if signed else quant.quantize_unsigned
  loss = lambda x, alpha, probs: jnp.sum(jnp.sin(quantize(x, alpha, bits, probs)))
  grads = jax.grad(loss, (0, 1))(jnp.asarray(x), jnp.float32(2.0), probs)
  tx, talpha = torch.tensor(x, requires_grad=True), torch.tensor(2.0, requires_grad=True)
  tprobs = None if probs is None else torch.tensor(np.asarray(probs))
  out = torch_reference._clip_quantize(tx, talpha, bits, tprobs, signed)
  torch.sin(out).sum().backward()
  np.testing.assert_allclose(out.detach().numpy(), quantize(x, 2.0, bits, probs), atol=1e-6)
  np.testing.assert_allclose(tx.grad.numpy(), grads[0], atol=1e-6)
  np.testing.assert_allclose(talpha.grad.numpy(), grads[1], rtol=1e-5)


def test_torch_complexity_loss_matches_the_library():
  torch = pytest.importorskip('torch')
  from torch import nn
  model = models.create_model('resnet8', num_classes=10, width=4,
                              quant=quant.QuantSpec(mode='supernet', w_bits=(2, 3, 4, 6),
                                                    a_bits=(2, 3, 4, 6)))
  x = np.zeros((1, 8, 8, 3), np.float32)
  params = model.init(jax.random.key(0), x)['params']
  net = torch_reference._resnet_cifar(8, 4, 10, (2, 3, 4, 6))
  net(torch.zeros(1, 3, 8, 8))
  layers = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
  expected = quant.complexity_loss(params, quant.collect_layer_costs(model, x))
  np.testing.assert_allclose(float(torch_reference._complexity_loss(layers).detach()), expected,
                             rtol=1e-6)


@pytest.mark.parametrize('group', sorted(RESNET8_COUNTS))
def test_flax_resnet8_has_the_hand_counted_parameters(group):
  spec = {'fp': quant.QuantSpec(),
          'qat': quant.QuantSpec(mode='fixed', uniform=quant.LayerBits(4, 4)),
          'supernet': quant.QuantSpec(mode='supernet', w_bits=(2, 3, 4, 6), a_bits=(2, 3, 4, 6))}
  shapes = jax.eval_shape(models.create_model('resnet8', num_classes=10, width=4,
                                              quant=spec[group]).init,
                          jax.random.key(0), np.zeros((1, 8, 8, 3), np.float32))
  assert sum(x.size for x in jax.tree.leaves(shapes['params'])) == RESNET8_COUNTS[group]
