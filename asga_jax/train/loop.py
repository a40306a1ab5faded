"""The epoch loop shared by every training stage: resume, train, evaluate, save."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh

from asga_jax import data
from asga_jax.quant import LayerCost
from asga_jax.train import sharding, steps
from asga_jax.train.checkpoints import StageCheckpoints
from asga_jax.train.reporting import Reporter


class StopRequested(Exception):
  """Raised by :func:`fit` after saving, when :func:`request_stop` was called."""

  def __init__(self, stage: str, step: int):
    super().__init__(f'{stage} stopped at step {step}; run the same command again to resume.')
    self.stage, self.step = stage, step


class NonFiniteError(RuntimeError):
  """More consecutive steps had a non-finite loss or gradient than the config allows."""


_stop_requested = False


def request_stop() -> None:
  """Asks the running stage to save a checkpoint and stop at the next step boundary.

  Safe to call from a signal handler.
  """
  global _stop_requested
  _stop_requested = True


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
  """While active, SIGTERM and SIGINT save a checkpoint and stop the run at the next step.

  SIGTERM is what a preempted TPU VM, SLURM or Kubernetes sends before the
  kill; a second SIGINT (Ctrl-C) interrupts at once. With several processes,
  SIGTERM is left to JAX's preemption service, which makes every process stop
  at the same step (:func:`sharding.preemption_reached`), and SIGINT keeps its
  default. Outside the main thread (where Python cannot take signals) this
  does nothing.
  """
  global _stop_requested
  _stop_requested = False
  if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
    yield
    return

  def handle(signum, frame):
    del frame
    if signum == signal.SIGINT and _stop_requested:
      raise KeyboardInterrupt
    logging.warning('received %s: saving a checkpoint at the next step, then stopping%s',
                    signal.Signals(signum).name,
                    ' (Ctrl-C again to interrupt at once)' if signum == signal.SIGINT else '')
    request_stop()

  previous = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
    _stop_requested = False


@dataclasses.dataclass(frozen=True)
class StageSpec:
  """What one training stage trains, on what, for how long.

  Attributes:
    name: stage name; its outputs go to ``<workdir>/<name>``.
    model: the Flax model.
    tx: optimizer; ``schedule`` its learning-rate schedule (for the log).
    variables: the initial variables (used when there is no checkpoint).
    data_config: input pipeline configuration.
    epochs: training length.
    costs: layer costs of a supernet, for its metrics (None otherwise).
    label_smoothing: of the cross-entropy.
    quantized_grads, m_sharpness: see :func:`steps.make_train_step`.
    sharpness_period: see :func:`steps.jit_train_step`.
  """
  name: str
  model: nn.Module
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  variables: Mapping[str, Any]
  data_config: ml_collections.ConfigDict
  epochs: float
  costs: Sequence[LayerCost] | None = None
  label_smoothing: float = 0.0
  quantized_grads: bool = False
  m_sharpness: int = 0
  sharpness_period: int = 1


def prefetch(batches: Iterator[Mapping[str, np.ndarray]], mesh: Mesh, size: int = 2
             ) -> Iterator[dict[str, jax.Array]]:
  """Moves batches (this process's part) onto the mesh ``size`` ahead of their use."""
  queue = collections.deque()
  for batch in batches:
    queue.append(sharding.put_batch(batch, mesh))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def evaluate(eval_step, state: steps.TrainState, data_config: ml_collections.ConfigDict,
             batch_size: int, mesh: Mesh) -> dict[str, float]:
  """Loss and accuracy over the whole eval split (padding masked out).

  ``eval_step`` is the jitted :func:`steps.make_eval_step`; ``state`` lies on
  ``mesh`` (jit follows the arguments' shardings).
  """
  totals = None
  for batch in prefetch(data.eval_batches(data_config, global_batch_size=batch_size,
                                          process_index=jax.process_index(),
                                          process_count=jax.process_count()), mesh):
    sums = eval_step(state, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = float(totals['count'])
  return {'loss': float(totals['loss_sum']) / count, 'accuracy': float(totals['correct']) / count,
          'examples': count}


EpochHook = Callable[[int, steps.TrainState], Mapping[str, float]]


def fit(spec: StageSpec, config: ml_collections.ConfigDict, workdir: str,
        epoch_hook: EpochHook | None = None) -> tuple[steps.TrainState, dict[str, float]]:
  """Trains ``spec`` to the end, resuming from its latest checkpoint.

  Data order is a function of (seed, epoch), so the step count alone tells
  where to resume: epoch = step // steps_per_epoch and the batch inside it.
  Steps with a non-finite loss or gradient are skipped (see
  :func:`steps.guard_nonfinite`); more than ``config.nonfinite_patience`` in a
  row stop the run.

  Args:
    spec: what to train.
    config: the run configuration.
    workdir: the run directory.
    epoch_hook: called as ``hook(epoch, state)`` after each completed epoch;
      the metrics it returns (e.g. lambda_max) are logged as diagnostics.

  Returns:
    (final train state, final eval metrics).

  Raises:
    StopRequested: after saving, when a stop was requested (SIGTERM, preemption).
    NonFiniteError: too many consecutive non-finite steps; nothing of them was
      saved, and the message names the last good checkpoint.
  """
  batch_size = config.batch_size
  steps_per_epoch = data.steps_per_epoch(spec.data_config, batch_size)
  total = int(round(spec.epochs * steps_per_epoch))
  mesh = sharding.make_mesh()
  sharding.check_divisible(batch_size, mesh)
  sharding.check_divisible(config.eval_batch_size, mesh, 'eval_batch_size')
  ckpts = StageCheckpoints(os.path.join(workdir, spec.name, 'checkpoints'),
                           config.keep_checkpoints)
  reporter, completed = None, False
  try:
    state, state_sharding = steps.init_train_state(spec.variables, spec.tx, mesh,
                                                   fsdp=config.fsdp)
    if ckpts.latest_step() is not None:
      state, meta = ckpts.restore(state)
      logging.info('%s: resuming from step %d (epoch %d, batch %d) in %s', spec.name,
                   int(state.step), meta['epoch'], meta['batch'], ckpts.directory)
    eval_step = jax.jit(steps.make_eval_step(spec.model))
    if int(state.step) >= total:
      logging.info('%s: already complete (%d steps); evaluating the final state', spec.name,
                   total)
      return state, evaluate(eval_step, state, spec.data_config, config.eval_batch_size, mesh)
    if _stop_requested:  # e.g. SIGTERM during the previous stage's last evaluation
      raise StopRequested(spec.name, int(state.step))

    train_step = steps.jit_train_step(spec.model, spec.tx, costs=spec.costs,
                                      label_smoothing=spec.label_smoothing,
                                      quantized_grads=spec.quantized_grads,
                                      m_sharpness=spec.m_sharpness,
                                      sharpness_period=spec.sharpness_period, mesh=mesh,
                                      state_sharding=state_sharding)
    reporter = Reporter(workdir, spec.name, total, steps_per_epoch, batch_size)
    step = start_step = int(state.step)
    logging.info('%s: %d steps (%g epochs of %d steps, batch %d) from step %d', spec.name, total,
                 spec.epochs, steps_per_epoch, batch_size, step)
    watch = _NonFiniteWatch(spec.name, config.nonfinite_patience, ckpts)
    window, result = [], {}
    # The rate window starts once every compiled phase has run (SAQ-ET compiles two).
    compile_steps = min(spec.sharpness_period, total - step)
    first_step_start = time.perf_counter()

    def save():
      watch.flush()  # a run about to stop for non-finite steps saves nothing more
      ckpts.save(step, state, _meta(step, steps_per_epoch, config))

    while step < total:
      epoch, start = divmod(step, steps_per_epoch)
      for batch in _epoch_batches(spec, config, epoch, start,
                                  min(steps_per_epoch - start, total - step), mesh):
        state, metrics = train_step(state, batch, step)
        step += 1
        watch.dispatched(step, metrics)
        if first_step_start is not None and step - start_step >= compile_steps:
          jax.block_until_ready(metrics)
          reporter.compiled(step, time.perf_counter() - first_step_start, compile_steps)
          first_step_start = None
        window.append(metrics)
        if step % config.log_every_steps == 0 or step == total:
          reporter.train(step, {**_window_means(window), 'lr': float(spec.schedule(step - 1))})
          window = []
        if config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0:
          save()
        if _stop_requested or sharding.preemption_reached(step):
          save()
          raise StopRequested(spec.name, step)
      if step == total or (step % steps_per_epoch == 0
                           and (step // steps_per_epoch) % config.eval_every_epochs == 0):
        result = evaluate(eval_step, state, spec.data_config, config.eval_batch_size, mesh)
        reporter.eval(step, result)
      if epoch_hook is not None and step % steps_per_epoch == 0:
        measured = epoch_hook(step // steps_per_epoch, state)
        if measured:
          reporter.diagnostic(step, measured)
      save()
    completed = True
    return state, result
  finally:
    # Also on errors: an asynchronous save in flight completes before the process moves on.
    ckpts.wait()
    ckpts.close()
    if reporter is not None:
      reporter.close(completed)


def _window_means(window: Sequence[Mapping[str, jax.Array]]) -> dict[str, float]:
  """Means of the metrics since the last log line, over the steps that were applied."""
  window = jax.device_get(window)
  skipped = int(window[-1]['skipped_steps'])
  means = {k: float(np.nanmean([m[k] for m in window])) for k in window[0]
           if k not in ('nonfinite_streak', 'skipped_steps')}
  return {**means, **({'skipped_steps': skipped} if skipped else {})}


class _NonFiniteWatch:
  """Reads each step's non-finite streak one step late, so the host never waits on the device."""

  def __init__(self, stage: str, patience: int, ckpts: StageCheckpoints):
    self.stage, self.patience, self.ckpts = stage, patience, ckpts
    self._pending: tuple[int, Mapping[str, jax.Array]] | None = None

  def dispatched(self, step: int, metrics: Mapping[str, jax.Array]) -> None:
    """Checks the step before ``step`` (done by now, or nearly) and holds this one."""
    self.flush()
    self._pending = (step, metrics)

  def flush(self) -> None:
    if self._pending is None:
      return
    step, metrics = self._pending
    self._pending = None
    streak = int(metrics['nonfinite_streak'])
    if not streak:
      return
    logging.warning('%s: step %d skipped: non-finite loss or gradient (%d in a row, %d in this '
                    'stage); parameters, statistics and optimizer state unchanged', self.stage,
                    step, streak, int(metrics['skipped_steps']))
    if streak > self.patience:
      self.ckpts.wait()
      last = self.ckpts.latest_step()
      raise NonFiniteError(
          f'{self.stage}: {streak} consecutive steps ({step - streak + 1}..{step}) had a '
          f'non-finite loss or gradient (more than nonfinite_patience={self.patience}); none was '
          'applied or saved. Last good checkpoint: '
          + (f'{os.path.join(self.ckpts.directory, str(last))} (step {last})' if last is not None
             else 'none yet (the stage starts over)')
          + f'. Lower --config.{self.stage}.lr, check the input data, or allow more skipped '
          'steps with --config.nonfinite_patience; then run the same command to resume.')


def _epoch_batches(spec: StageSpec, config: ml_collections.ConfigDict, epoch: int, start: int,
                   count: int, mesh: Mesh) -> Iterator[dict[str, jax.Array]]:
  """Batches start .. start+count-1 of ``epoch``, on the device."""
  # Closing the epoch's iterator stops its input threads at once.
  with contextlib.closing(data.train_batches(
      spec.data_config, global_batch_size=config.batch_size, seed=config.seed, epoch=epoch,
      start_batch=start, process_index=jax.process_index(),
      process_count=jax.process_count())) as batches:
    yield from prefetch(itertools.islice(batches, count), mesh)


def _meta(step: int, steps_per_epoch: int, config: ml_collections.ConfigDict) -> dict[str, int]:
  epoch, batch = divmod(step, steps_per_epoch)
  return {'step': step, 'epoch': epoch, 'batch': batch, 'seed': config.seed}
