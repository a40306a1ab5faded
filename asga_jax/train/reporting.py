"""Progress lines on the console, scalars in TensorBoard (clu) and metrics.jsonl."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping

import jax
import numpy as np
from absl import logging
from clu import metric_writers

# Console names and formats of the metrics a progress line shows, in order.
_CONSOLE = (('loss', 'loss', '{:.4f}'), ('accuracy', 'acc', '{:.1%}'), ('gbops', 'GBOPs', '{:.4f}'),
            ('bits_w', 'bits w', '{:.2f}'), ('bits_a', 'a', '{:.2f}'),
            ('rho', 'rho', '{:.3f}'), ('h', 'h', '{:.4f}'), ('sigma_max', 'sigma', '{:.2f}'),
            ('lr', 'lr', '{:.4g}'), ('skipped_steps', 'skipped (non-finite)', '{:.0f}'))


def _duration(seconds: float) -> str:
  seconds = int(seconds)
  if seconds >= 3600:
    return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m'
  return f'{seconds // 60}m{seconds % 60:02d}s'


class Reporter:
  """Writes a stage's metrics to TensorBoard, metrics.jsonl and readable log lines.

  TensorBoard events go to ``<workdir>/tensorboard/<stage>``; one JSON object
  per logged step to ``<workdir>/<stage>/metrics.jsonl`` (``{"kind": "train"
  or "eval", "step", "epoch", ...metrics}``, appended across resumed runs).
  Only process 0 writes files.
  """

  def __init__(self, workdir: str, stage: str, total_steps: int, steps_per_epoch: int,
               batch_size: int):
    self.stage, self.total_steps = stage, total_steps
    self.steps_per_epoch, self.batch_size = steps_per_epoch, batch_size
    self.logdir = os.path.join(workdir, 'tensorboard', stage)
    # Our own console lines replace clu's LoggingWriter; only process 0 writes events.
    writers = [metric_writers.SummaryWriter(self.logdir)] if jax.process_index() == 0 else []
    self._writer = metric_writers.AsyncMultiWriter(writers)
    self._jsonl = (os.path.join(workdir, stage, 'metrics.jsonl')
                   if jax.process_index() == 0 else None)
    self._window_start = (None, time.perf_counter())
    self._stage_start = time.perf_counter()

  def train(self, step: int, metrics: Mapping[str, float]) -> None:
    """Logs the averaged training metrics of the steps since the last call."""
    first, t0 = self._window_start
    now = time.perf_counter()
    scalars = {f'train/{k}': float(v) for k, v in metrics.items()}
    if first is not None and step > first:
      scalars['train/images_per_sec'] = (step - first) * self.batch_size / (now - t0)
    self._writer.write_scalars(step, scalars)
    self._append('train', step, {**metrics, **({'images_per_sec': scalars['train/images_per_sec']}
                                               if 'train/images_per_sec' in scalars else {})})
    epoch = step / self.steps_per_epoch
    parts = [f'{self.stage:<8} ep {epoch:6.2f}  step {step:>6}/{self.total_steps}']
    for key, name, fmt in _CONSOLE:
      if key in metrics and np.isfinite(metrics[key]):
        parts.append(f'{name} {fmt.format(float(metrics[key]))}')
    if 'train/images_per_sec' in scalars:
      rate = scalars['train/images_per_sec']
      eta = (self.total_steps - step) * self.batch_size / rate
      parts.append(f'{rate:.0f} img/s  eta {_duration(eta)}')
    logging.info('  '.join(parts))
    self._window_start = (step, now)

  def compiled(self, step: int, seconds: float, num_steps: int = 1) -> None:
    """Logs the time of the first steps (compilation included) and restarts the rate window.

    ``num_steps`` > 1: the steps that ran each compiled phase once (SAQ-ET has two).
    """
    what = 'first step' if num_steps == 1 else f'first {num_steps} steps'
    logging.info('%s: %s compiled and ran in %.1f s', self.stage, what, seconds)
    self._window_start = (step, time.perf_counter())

  def _append(self, kind: str, step: int, metrics: Mapping[str, float]) -> None:
    if self._jsonl is None:
      return
    record = {'kind': kind, 'step': step, 'epoch': step / self.steps_per_epoch,
              **{k: float(v) for k, v in metrics.items()}}
    with open(self._jsonl, 'a') as f:
      f.write(json.dumps(record) + '\n')

  def diagnostic(self, step: int, metrics: Mapping[str, float]) -> None:
    """Logs diagnostics (e.g. lambda_max) measured during training."""
    self._writer.write_scalars(step, {f'diagnostics/{k}': float(v) for k, v in metrics.items()})
    self._append('diagnostic', step, metrics)

  def eval(self, step: int, metrics: Mapping[str, float]) -> None:
    self._writer.write_scalars(step, {f'eval/{k}': float(v) for k, v in metrics.items()})
    self._append('eval', step, metrics)
    logging.info('%-8s eval at step %d: loss %.4f  top-1 %.2f%%  (%d images)', self.stage, step,
                 metrics['loss'], 100 * metrics['accuracy'], metrics['examples'])

  def close(self, completed: bool = True) -> None:
    self._writer.flush()
    self._writer.close()
    logging.info('%s %s %s; TensorBoard: %s', self.stage,
                 'finished in' if completed else 'stopped after',
                 _duration(time.perf_counter() - self._stage_start), self.logdir)
