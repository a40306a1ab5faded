"""Reliability: kills, preemption, full disks, non-finite steps, corrupt checkpoints, bad input."""

import contextlib
import json
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from asga_jax import data
from asga_jax.quant import PolicyError
from asga_jax.train import ConfigError, loop, summary, train_and_evaluate
from asga_jax.train.checkpoints import CheckpointMismatchError, StageCheckpoints
from tests.test_train import smoke_config

ROOT = pathlib.Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

# An ASGA search of 120 steps (6 epochs of the embedded sample), a checkpoint every 10 steps.
TOTAL_STEPS = 120
SEARCH_FLAGS = ('--config.stages=search', '--config.search.init=scratch',
                '--config.search.epochs=6', '--config.diagnostics.lambda_max=False',
                '--config.log_every_steps=1', '--config.checkpoint_every_steps=10',
                '--config.eval_every_epochs=100')


@pytest.fixture(scope='module')
def compilation_cache(tmp_path_factory) -> dict[str, str]:
  """Environment of the training processes: JAX's persistent compilation cache.

  Restarted runs load the compiled steps instead of compiling them again
  (the same executables, so the same numbers), as a preempted job would.
  """
  return {**os.environ, 'JAX_COMPILATION_CACHE_DIR': str(tmp_path_factory.mktemp('jax_cache')),
          'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0'}


def start_search(workdir: pathlib.Path, log: pathlib.Path, env: dict[str, str],
                 max_file_kib: int | None = None) -> subprocess.Popen:
  """``python -m asga_jax.main`` on the smoke config in a process of its own.

  With ``max_file_kib``, writing a file beyond that size fails with EFBIG, as
  on a full disk (bash's ``ulimit -f``; SIGXFSZ ignored so that the write
  returns the error instead of killing the process).
  """
  command = [sys.executable, '-m', 'asga_jax.main',
             f'--config={ROOT / "configs" / "resnet20_cifar.py"}:smoke', f'--workdir={workdir}',
             *SEARCH_FLAGS]
  if max_file_kib is not None:
    command = ['bash', '-c', f'ulimit -f {max_file_kib}; trap "" XFSZ; exec "$@"', 'bash',
               *command]
  with open(log, 'a') as f:  # a file, not a pipe: a full pipe would block the run
    return subprocess.Popen(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)


def steps_logged(workdir: pathlib.Path) -> int:
  """The last step in search/metrics.jsonl (0 before the first)."""
  try:
    lines = (workdir / 'search' / 'metrics.jsonl').read_text().splitlines()
  except FileNotFoundError:
    return 0
  steps = [json.loads(line)['step'] for line in lines[-3:] if line.endswith('}')]
  return max(steps, default=0)


def wait_for_step(proc: subprocess.Popen, workdir: pathlib.Path, step: int, log: pathlib.Path
                  ) -> None:
  deadline = time.monotonic() + 600
  while steps_logged(workdir) < step:
    assert proc.poll() is None, f'run ended (rc {proc.returncode}):\n{log.read_text()[-3000:]}'
    assert time.monotonic() < deadline, 'run too slow'
    time.sleep(0.005)


def finish(proc: subprocess.Popen, log: pathlib.Path, expect_rc: int | None = 0) -> str:
  rc = proc.wait(timeout=600)
  text = log.read_text()
  if expect_rc is not None:
    assert rc == expect_rc, f'rc {rc}:\n{text[-3000:]}'
  return text


def checkpoint_steps(workdir: pathlib.Path, stage: str = 'search') -> list[int]:
  directory = workdir / stage / 'checkpoints'
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def saved_state(workdir: pathlib.Path, stage: str = 'search', step: int | None = None):
  ckpts = StageCheckpoints(str(workdir / stage / 'checkpoints'), keep=1, read_only=True)
  step = ckpts.latest_step() if step is None else step
  state = ckpts._manager.restore(step).state  # pylint: disable=protected-access
  ckpts.close()
  return state


def assert_same_state(a, b) -> None:
  leaves_a, leaves_b = jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b) > 50
  for (path, x), y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, compilation_cache):
  """The final search state of a run nobody disturbs (started now, read when needed)."""
  workdir = tmp_path_factory.mktemp('uninterrupted')
  proc = start_search(workdir, workdir / 'log.txt', compilation_cache)

  def final_state():
    finish(proc, workdir / 'log.txt')
    return saved_state(workdir)

  yield final_state
  if proc.poll() is None:
    proc.kill()


def test_sigkill_then_full_disk_then_restart_equals_uninterrupted_run(tmp_path, uninterrupted,
                                                                      compilation_cache):
  """Kill -9 at a random step; a restart on a 'full disk' fails to save; a third run finishes."""
  kill_at = random.SystemRandom().randint(15, TOTAL_STEPS - 25)  # unaffected by any seeding
  work, logs = tmp_path / 'run', [tmp_path / f'log{i}.txt' for i in range(3)]
  proc = start_search(work, logs[0], compilation_cache)
  wait_for_step(proc, work, kill_at, logs[0])
  proc.send_signal(signal.SIGKILL)
  finish(proc, logs[0], expect_rc=-signal.SIGKILL)
  before = checkpoint_steps(work)
  assert before and before[-1] <= steps_logged(work), (kill_at, before)

  # Checkpoints above 100 KiB (the state's metadata is ~150 kB) cannot be written.
  proc = start_search(work, logs[1], compilation_cache, max_file_kib=100)
  text = finish(proc, logs[1], expect_rc=None)
  assert proc.returncode != 0 and 'File too large' in text, text[-3000:]
  assert f'resuming from step {before[-1]}' in text
  assert checkpoint_steps(work) == before  # nothing lost, nothing half-written in their place
  saved_state(work)  # and the newest still reads back

  text = finish(start_search(work, logs[2], compilation_cache), logs[2])
  assert f'resuming from step {before[-1]}' in text
  assert checkpoint_steps(work)[-1] == TOTAL_STEPS
  assert_same_state(saved_state(work), uninterrupted())


def test_sigterm_saves_at_the_signal_step_and_resumes_exactly(tmp_path, uninterrupted,
                                                              compilation_cache):
  signal_at = random.SystemRandom().randint(15, TOTAL_STEPS - 25)
  work, logs = tmp_path / 'run', [tmp_path / f'log{i}.txt' for i in range(2)]
  proc = start_search(work, logs[0], compilation_cache)
  wait_for_step(proc, work, signal_at, logs[0])
  proc.send_signal(signal.SIGTERM)
  text = finish(proc, logs[0])  # a clean exit
  stopped = int(re.search(r'search stopped at step (\d+)', text)[1])
  assert signal_at <= stopped < TOTAL_STEPS and 'received SIGTERM' in text, (signal_at, stopped)
  assert checkpoint_steps(work)[-1] == stopped  # saved at the step boundary after the signal
  assert json.loads((work / 'search' / 'metrics.jsonl').read_text().splitlines()[-1])['step'] \
      == stopped

  text = finish(start_search(work, logs[1], compilation_cache), logs[1])
  assert f'resuming from step {stopped}' in text
  assert_same_state(saved_state(work), uninterrupted())


def _poison(monkeypatch, steps_per_epoch: int, bad_batches: set[int]) -> None:
  """Makes the training batches with these global indices all-NaN."""
  original = data.train_batches

  def poisoned(cfg, **kwargs):
    first = kwargs['epoch'] * steps_per_epoch + kwargs.get('start_batch', 0)
    with contextlib.closing(original(cfg, **kwargs)) as batches:
      for i, batch in enumerate(batches):
        if first + i in bad_batches:
          batch = {**batch, 'image': np.full_like(batch['image'], np.nan)}
        yield batch

  monkeypatch.setattr(data, 'train_batches', poisoned)


def _all_checkpoints_finite(workdir: pathlib.Path) -> None:
  for step in checkpoint_steps(workdir):
    for path, x in jax.tree_util.tree_leaves_with_path(saved_state(workdir, step=step)):
      assert np.all(np.isfinite(x)), (step, jax.tree_util.keystr(path))


NAN_RUN = {'stages': 'search', 'search.init': 'scratch', 'search.epochs': 0.5,
           'diagnostics.lambda_max': False, 'log_every_steps': 1, 'checkpoint_every_steps': 2,
           'keep_checkpoints': 10}


def test_nan_batch_is_skipped_and_never_reaches_a_checkpoint(tmp_path, monkeypatch):
  _poison(monkeypatch, 20, {3})  # the 4th step
  train_and_evaluate(smoke_config(**NAN_RUN, nonfinite_patience=5), str(tmp_path))
  rows = [json.loads(line) for line in (tmp_path / 'search' / 'metrics.jsonl').open()]
  train = {r['step']: r for r in rows if r['kind'] == 'train'}
  assert 'skipped_steps' not in train[3]
  assert train[4]['skipped_steps'] == train[10]['skipped_steps'] == 1
  assert checkpoint_steps(tmp_path) == [2, 4, 6, 8, 10]
  _all_checkpoints_finite(tmp_path)
  assert int(saved_state(tmp_path)['nonfinite_total']) == 1


def test_too_many_nonfinite_steps_stop_naming_the_last_good_checkpoint(tmp_path, monkeypatch):
  _poison(monkeypatch, 20, {4, 5, 6})  # steps 5, 6, 7
  with pytest.raises(loop.NonFiniteError) as err:
    train_and_evaluate(smoke_config(**NAN_RUN, nonfinite_patience=1), str(tmp_path))
  message = str(err.value)
  assert '2 consecutive steps (5..6)' in message and 'nonfinite_patience=1' in message
  assert str(tmp_path / 'search' / 'checkpoints' / '4') + ' (step 4)' in message
  assert checkpoint_steps(tmp_path) == [2, 4]
  _all_checkpoints_finite(tmp_path)


def test_truncated_newest_checkpoint_falls_back_to_the_one_before(tmp_path, caplog):
  config = smoke_config(**{'stages': 'search', 'search.init': 'scratch',
                           'diagnostics.lambda_max': False, 'checkpoint_every_steps': 4})
  train_and_evaluate(config, str(tmp_path))
  assert checkpoint_steps(tmp_path) == [16, 20]
  finished = saved_state(tmp_path)
  for path in (tmp_path / 'search' / 'checkpoints' / '20').rglob('*'):
    if path.is_file():
      with open(path, 'r+b') as f:
        f.truncate(path.stat().st_size // 2)

  train_and_evaluate(config, str(tmp_path))
  assert 'does not read back' in caplog.text
  assert 'restored step 16 of' in caplog.text
  assert [p.name.split('-')[0] for p in (tmp_path / 'search' / 'corrupt_checkpoints').iterdir()] \
      == ['20']  # kept for inspection, out of the way
  assert checkpoint_steps(tmp_path) == [16, 20]
  assert_same_state(saved_state(tmp_path), finished)


# ---------------------------------------------------------------------------------------------
# Bad inputs: each fails before any compute with a message naming the problem (and the fix).


@pytest.fixture(scope='module')
def searched(tmp_path_factory):
  """A workdir with a 4-step search: its policy.json and checkpoints."""
  workdir = tmp_path_factory.mktemp('searched')
  train_and_evaluate(smoke_config(**{'stages': 'search', 'search.init': 'scratch',
                                     'search.epochs': 0.2, 'diagnostics.lambda_max': False}),
                     str(workdir))
  return workdir


def _policy_file(tmp_path, searched, edit) -> dict:
  content = json.loads((searched / 'policy.json').read_text())
  path = tmp_path / 'policy.json'
  path.write_text(edit(content) if callable(edit) else edit)
  return {'stages': 'finetune', 'finetune.policy': str(path)}


def _first_layer_bits(bits):
  def edit(content):
    first = sorted(content['layers'])[0]
    content['layers'][first]['w'] = bits
    return json.dumps(content)
  return edit


def _image_folder(tmp_path, files: dict[str, bytes], **extra) -> dict:
  root = tmp_path / 'images'
  for split in ('train', 'test'):
    (root / split / 'cat').mkdir(parents=True)
  for name, content in files.items():
    (root / name).write_bytes(content)
  return {'data.name': 'folder', 'data.folder': str(root), **extra}


# (case, overrides (a dict, or a function of (tmp_path, searched) returning one), workdir
#  ('fresh', 'file': a file in its place, 'searched': a copy of the searched one),
#  expected error, fragments its message must hold).
BAD_INPUTS = [
    ('unknown model', {'model.name': 'resnet999'}, 'fresh', ConfigError,
     ['model.name', 'resnet999', 'available']),
    ('unknown data set', {'data.name': 'imagenet2099'}, 'fresh', data.DataError,
     ['imagenet2099', 'valid names']),
    ('unknown sharpness method', {'search.sharpness': 'lookahead'}, 'fresh', ConfigError,
     ['search.sharpness', 'lookahead']),
    ('unknown arch optimizer', {'search.arch_optimizer': 'rmsprop'}, 'fresh', ConfigError,
     ['search.arch_optimizer', 'rmsprop']),
    ('unknown stage', {'stages': 'search,train'}, 'fresh', ConfigError, ['stages', "'train'"]),
    ('bits above 8', {'quant.w_bits': (2, 4, 9)}, 'fresh', ConfigError, ['quant.w_bits', '1..8']),
    ('bits unsorted', {'quant.a_bits': (4, 2)}, 'fresh', ConfigError,
     ['quant.a_bits', 'sorted and distinct', '(2, 4)']),
    ('bits duplicated', {'quant.w_bits': (2, 2, 4)}, 'fresh', ConfigError,
     ['quant.w_bits', 'distinct']),
    ('first/last bits invalid', {'quant.edge_bits': 0}, 'fresh', ConfigError, ['quant.edge_bits']),
    ('zero rho', {'search.asga.rho0': 0.0}, 'fresh', ConfigError, ['search.asga.rho0']),
    ('negative lr', {'search.lr': -0.1}, 'fresh', ConfigError, ['search.lr']),
    ('zero epochs', {'stages': 'finetune', 'finetune.epochs': 0.0}, 'fresh', ConfigError,
     ['finetune.epochs']),
    ('zero batch size', {'batch_size': 0}, 'fresh', ConfigError, ['batch_size']),
    ('negative nonfinite_patience', {'nonfinite_patience': -1}, 'fresh', ConfigError,
     ['nonfinite_patience']),
    ('BOPs target unparsable', {'search.target': '3 bits'}, 'fresh', ConfigError,
     ['search.target']),
    ('policy file missing', {'stages': 'finetune', 'finetune.policy': '/nope/policy.json'},
     'fresh', ConfigError, ['/nope/policy.json', 'does not exist']),
    ('policy not JSON', lambda t, s: _policy_file(t, s, '{"layers": '), 'fresh', PolicyError,
     ['not valid JSON']),
    ('policy without layers', lambda t, s: _policy_file(t, s, '[4, 4]'), 'fresh', PolicyError,
     ['not a policy file', 'layers']),
    ('policy missing layers', lambda t, s: _policy_file(t, s, lambda c: json.dumps(
        {'layers': dict(list(c['layers'].items())[:2])})), 'fresh', PolicyError,
     ['missing layers']),
    ('policy unknown layer', lambda t, s: _policy_file(t, s, lambda c: json.dumps(
        {'layers': {**c['layers'], 'stage9/conv': {'w': 4, 'a': 4}}})), 'fresh', PolicyError,
     ['unknown layers', 'stage9/conv']),
    ('policy bits not a candidate', lambda t, s: _policy_file(t, s, _first_layer_bits(5)),
     'fresh', PolicyError, ['weight bits 5 not in candidates [2, 3, 4, 6]']),
    ('policy bits not an integer', lambda t, s: _policy_file(t, s, _first_layer_bits('4')),
     'fresh', PolicyError, ['bits must be an integer']),
    ('image folder missing', {'data.name': 'folder', 'data.folder': '/nope/images'}, 'fresh',
     data.DataError, ['/nope/images', 'does not exist']),
    ('image folder without images', lambda t, s: _image_folder(t, {}), 'fresh', data.DataError,
     ['No images']),
    ('unreadable images (fail)', lambda t, s: _image_folder(
        t, {'train/cat/a.jpg': b'<html>', 'test/cat/b.jpg': b'<html>'},
        **{'data.on_bad_image': 'error'}), 'fresh', data.DataError,
     ['unreadable image', 'on_bad_image=skip']),
    ('TFDS data set not downloaded', lambda t, s: {'data.name': 'cifar10', 'data.image_size': 32,
                                                   'data.data_dir': str(t / 'tfds')}, 'fresh',
     data.DataError, ['tfds']),
    ('init from a directory without checkpoints', lambda t, s: {
        'stages': 'search', 'search.init': str(t)}, 'fresh', ConfigError, ['search.init']),
    ('workdir not writable', {}, 'file', PermissionError,
     ['not writable', '--workdir']),
    ('checkpoint of another model', {'stages': 'search', 'model.width': 8,
                                     'search.epochs': 0.2}, 'searched', CheckpointMismatchError,
     ['different model or config', 'shape differs', 'kernel', '--workdir']),
]


@pytest.mark.parametrize('case, overrides, workdir, error, fragments', BAD_INPUTS,
                         ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_fails_before_compute_naming_the_problem(tmp_path, searched, monkeypatch, case,
                                                           overrides, workdir, error, fragments):
  del case
  if callable(overrides):
    overrides = overrides(tmp_path, searched)
  config = smoke_config(**{'diagnostics.lambda_max': False, **overrides})
  if workdir == 'file':
    workdir = tmp_path / 'file'
    workdir.write_text('')
  elif workdir == 'searched':  # resuming it with another model must fail
    workdir = tmp_path / 'copy'
    shutil.copytree(searched, workdir)
  else:
    workdir = tmp_path / 'run'
  compiled = []
  monkeypatch.setattr(loop.steps, 'jit_train_step', lambda *a, **k: compiled.append(1))
  with pytest.raises(error) as err:
    train_and_evaluate(config, str(workdir))
  for fragment in fragments:
    assert fragment in str(err.value), (fragment, str(err.value))
  assert not compiled  # nothing trained


def test_batch_not_divisible_by_the_device_count(monkeypatch):
  monkeypatch.setattr(jax, 'device_count', lambda: 8)
  with pytest.raises(ConfigError, match=r'batch_size \(50\) must be a multiple of the device '
                                        r'count \(8\)'):
    train_and_evaluate(smoke_config(), '/tmp/unused')


def test_metrics_line_cut_by_a_kill_is_skipped(tmp_path):
  (tmp_path / 'search').mkdir()
  (tmp_path / 'search' / 'metrics.jsonl').write_text(
      '{"kind": "train", "step": 1, "loss": 2.0}\n'
      '{"kind": "train", "step": 2, "lo'  # killed here; the resumed run appends after it
      '{"kind": "train", "step": 2, "loss": 1.5}\n'
      '{"kind": "train", "step": 2, "loss": 1.4}\n\n')
  assert summary.read_metrics(str(tmp_path), 'search') == [
      {'kind': 'train', 'step': 1, 'loss': 2.0}, {'kind': 'train', 'step': 2, 'loss': 1.4}]
