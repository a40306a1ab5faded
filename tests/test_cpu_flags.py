"""The default XLA:CPU flags: how they are applied, and that they do not change results."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from asga_jax import cpu_flags, onednn

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULTS = [f'--{name}={value}' for name, value in cpu_flags.CPU_FLAGS.items()]
# Float32 round-off of another summation order in convolutions and reductions:
# the loss and each full-precision gradient leaf (relative to its largest entry)
# agree to 1e-4 (measured: 2e-6). In a quantized network that round-off moves a
# few values across a rounding boundary, which changes their straight-through
# gradient terms: the whole gradient agrees to 5e-3 in relative L2 norm
# (measured: 1e-3), single small leaves such as a clipping level's less.
TOLERANCE = 1e-4
QUANTIZED_TOLERANCE = 5e-3


def test_apply_adds_the_defaults_after_the_users_flags():
  env = {'XLA_FLAGS': '--xla_dump_to=/tmp/x'}
  assert cpu_flags.apply(env) == DEFAULTS
  assert env['XLA_FLAGS'] == ' '.join(['--xla_dump_to=/tmp/x', *DEFAULTS])
  assert cpu_flags.apply(env) == []  # idempotent
  empty = {}
  cpu_flags.apply(empty)
  assert empty['XLA_FLAGS'] == ' '.join(DEFAULTS)


def test_the_users_own_value_wins_and_the_defaults_can_be_turned_off():
  name = next(iter(cpu_flags.CPU_FLAGS))
  env = {'XLA_FLAGS': f'--{name}=individual_convolution'}
  cpu_flags.apply(env)
  assert env['XLA_FLAGS'].count(name) == 1 and 'individual_convolution' in env['XLA_FLAGS']
  env = {'XLA_FLAGS': '', cpu_flags.OPT_OUT: '0'}
  assert cpu_flags.apply(env) == [] and env['XLA_FLAGS'] == ''


def _run_both(tmp_path: pathlib.Path, flags: dict[str, str]) -> dict[str, dict[str, np.ndarray]]:
  """cpu_flags_script.py under each XLA_FLAGS value, the processes side by side."""
  processes = {}
  for name, xla_flags in flags.items():
    # XLA's own convolutions, which the flags are about (not the oneDNN ones).
    env = {**os.environ, 'PYTHONPATH': str(ROOT), 'XLA_FLAGS': xla_flags,
           cpu_flags.OPT_OUT: '0', onednn.conv.OPT_OUT: '0', 'JAX_PLATFORMS': 'cpu'}
    processes[name] = subprocess.Popen(
        [sys.executable, str(ROOT / 'tests' / 'cpu_flags_script.py'), str(tmp_path / name)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  results = {}
  for name, process in processes.items():
    _, err = process.communicate()
    assert process.returncode == 0, err[-2000:]
    with np.load(tmp_path / f'{name}.npz') as f:
      results[name] = dict(f)
  return results


@pytest.mark.slow
def test_the_defaults_change_the_program_but_not_the_numbers(tmp_path):
  # The suite's other flags (compile-time settings) stay; only the defaults differ.
  others = ' '.join(item for item in os.environ.get('XLA_FLAGS', '').split()
                    if item.split('=', 1)[0].lstrip('-') not in cpu_flags.CPU_FLAGS)
  runs = _run_both(tmp_path, {'default': others, 'flagged': ' '.join([others, *DEFAULTS])})
  default, flagged = runs['default'], runs['flagged']
  assert default.keys() == flagged.keys()
  # The flags take effect: XLA's default hands convolutions to YNN, the defaults do not.
  for model in ('fp', 'supernet'):
    assert default[f'{model}/ynn_convolutions'] > 0
    assert flagged[f'{model}/ynn_convolutions'] == 0
  for model in ('fp', 'supernet'):
    loss = default[f'{model}/loss']
    assert abs(flagged[f'{model}/loss'] - loss) <= TOLERANCE * abs(loss)
    keys = [key for key in default if key.startswith(f'{model}/grad')]
    if model == 'fp':
      for key in keys:
        scale = float(np.max(np.abs(default[key])))
        error = float(np.max(np.abs(flagged[key] - default[key])))
        assert error <= TOLERANCE * scale, f'{key}: relative difference {error / scale:.2e}'
    else:
      a, b = (np.concatenate([run[key].ravel() for key in keys]) for run in (default, flagged))
      assert np.linalg.norm(b - a) <= QUANTIZED_TOLERANCE * np.linalg.norm(a)
