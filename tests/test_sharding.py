"""Data parallelism: 8 simulated CPU devices and 2 processes on localhost against one device."""

import json
import os
import pathlib
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from asga_jax.train import sharding, steps
from tests.reference import difference_per_distance_moved

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope='module')
def eight_device_results():
  out = subprocess.run([sys.executable, '-m', 'tests.multidevice_script'],
                       capture_output=True, text=True, cwd=ROOT, env=dict(os.environ))
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


# Float32 sums in another order (per-device partial sums, then an all-reduce):
# parameters after two steps agree to this relative tolerance.
TOLERANCE = 1e-4
# The ASGA search on a 2-bit supernet amplifies that round-off: once it moves one
# quantizer input across a rounding step (it did with the suite's compile flags on
# one Xeon: the first loss differed by 7e-5), the perturbed loss and with it h
# and the adaptive rho of the next step differ by several percent. So the search
# checks (8 devices, and two processes) compare ||sharded - one device|| with the
# distance the steps moved: 3e-6 (two processes: 6e-6) without such a flip,
# 1.3e-2 with one; a per-device ascent direction (the m-sharpness a sharding bug
# would give) differs by 0.6-0.8.
SEARCH_TOLERANCE = 0.1


def test_sharded_asga_search_step_equals_one_device(eight_device_results):
  assert eight_device_results['search_asga'] < SEARCH_TOLERANCE


def test_fsdp_sharded_state_gives_the_same_search_step(eight_device_results):
  assert eight_device_results['search_asga_fsdp'] < SEARCH_TOLERANCE


def test_sharded_finetune_step_equals_one_device(eight_device_results):
  assert eight_device_results['finetune_sgd'] < TOLERANCE


def test_m_sharpness_perturbs_per_replica(eight_device_results):
  assert eight_device_results['m_sharpness_vs_reference'] < TOLERANCE
  assert eight_device_results['m_sharpness_vs_global'] > 100 * TOLERANCE


@pytest.mark.parametrize('devices', [1, 4])
def test_checkpoint_from_8_devices_restores_onto_fewer(eight_device_results, devices):
  assert eight_device_results[f'restore_8_to_{devices}'] == 0.0


def test_batch_must_split_evenly_over_devices():
  mesh = sharding.make_mesh(jax.devices()[:1])
  sharding.check_divisible(10, mesh)
  fake = type('FakeMesh', (), {'shape': {sharding.DATA_AXIS: 8}})()
  with pytest.raises(ValueError, match=r'batch_size \(100\) must be a multiple of .* \(8\).*=96'):
    sharding.check_divisible(100, fake)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_on_localhost_agree_with_each_other_and_one_device(tmp_path):
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, '-m', 'tests.multihost_script', str(pid), str(port),
                             str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for pid in (0, 1)]
  saved_at = []
  for pid, p in enumerate(procs):
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    saved_at.append(int(re.search(rf'process {pid}: save at step (\d+)', out)[1]))
  a, b = (dict(np.load(tmp_path / f'params_{pid}.npz')) for pid in (0, 1))
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])  # replicas are bit-identical
  # SIGTERM on process 1 only: both processes save at the same step, after the signal.
  assert saved_at[0] == saved_at[1] >= 5

  # The same three steps on one device over the whole global batch.
  from tests import multihost_script as script
  model, costs, tx, variables = script.setup()
  by_path = lambda tree: {jax.tree_util.keystr(p): np.array(x)
                          for p, x in jax.tree_util.tree_leaves_with_path(tree)}
  start = by_path(variables['params'])  # host copies: the step donates the state
  step = steps.jit_train_step(model, tx, costs=costs)
  state = steps.create_train_state(variables, tx)
  for i in range(3):
    state, _ = step(state, script.global_batch(), i)
  reference = by_path(state.params)
  assert reference.keys() == a.keys()
  # An ASGA search, so compared per distance moved (see SEARCH_TOLERANCE).
  assert difference_per_distance_moved(*([t[k] for k in a] for t in (a, reference, start))
                                       ) < SEARCH_TOLERANCE


def test_two_process_training_run_via_local_launcher_logs_once(tmp_path):
  workdir = tmp_path / 'run'
  env = dict(os.environ, LOCAL_PROCESSES='2', COORDINATOR_PORT=str(_free_port()))
  out = subprocess.run(
      ['bash', 'launch/local.sh', 'configs/resnet20_cifar.py:smoke', str(workdir),
       '--config.stages=search,finetune,eval', '--config.diagnostics.lambda_max=False'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stderr.count('search: policy ->') == 1  # process 0's log only
  results = json.loads((workdir / 'results.json').read_text())
  assert set(results) == {'search', 'finetune', 'eval'}
  assert (workdir / 'policy.json').exists() and (workdir / 'bits.png').exists()


@pytest.mark.parametrize('script', ['local.sh', 'multi_gpu.sh', 'slurm_multinode.sbatch',
                                    'tpu_pod.sh'])
def test_launchers_parse_and_print_their_usage(script):
  path = ROOT / 'launch' / script
  assert subprocess.run(['bash', '-n', str(path)]).returncode == 0
  out = subprocess.run(['bash', str(path)], capture_output=True, text=True,
                       env=dict(os.environ, SLURM_SUBMIT_DIR=str(ROOT)))
  assert out.returncode == 2 and out.stdout.startswith('# Usage: ')
