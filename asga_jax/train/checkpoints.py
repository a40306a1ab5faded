"""Orbax checkpoints of each stage, and loading weights across stages.

Each stage keeps its own ``orbax.checkpoint.CheckpointManager`` in
``<workdir>/<stage>/checkpoints``: the train state (params, BatchNorm
statistics, optimizer state including the ASGA state, step) and a JSON
``meta`` item (epoch, position in the epoch, data seed), so that a resumed run
continues with exactly the batches it would have seen. Orbax writes each
checkpoint to a temporary directory and renames it when complete.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util


class StageCheckpoints:
  """Save/restore of one stage's train state, keeping the last ``keep``."""

  def __init__(self, directory: str, keep: int):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        item_names=('state', 'meta'))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, meta: Mapping[str, Any]) -> None:
    """Saves ``state`` at ``step`` (asynchronously); a step already saved is skipped."""
    if step == self.latest_step():
      return
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     meta=ocp.args.JsonSave(dict(meta))))

  def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Restores into the structure/dtypes of ``target`` (latest step by default)."""
    step = self.latest_step() if step is None else step
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return restored.state, dict(restored.meta)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def load_variables(directory: str) -> dict[str, Any]:
  """``{'params': ..., 'batch_stats': ...}`` of the latest checkpoint in ``directory``.

  ``directory`` is a stage's checkpoint directory (or the stage directory
  holding ``checkpoints/``). No target structure is needed.

  Raises:
    FileNotFoundError: no checkpoint there, with the path looked at.
  """
  if os.path.isdir(os.path.join(directory, 'checkpoints')):
    directory = os.path.join(directory, 'checkpoints')
  manager = ocp.CheckpointManager(os.path.abspath(directory), item_names=('state', 'meta'),
                                  options=ocp.CheckpointManagerOptions(create=False))
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {directory!r}; point the stage\'s `init` at a '
                            'stage directory (e.g. WORKDIR/pretrain) or its checkpoints/.')
  state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
  manager.close()
  return {'params': state['params'], 'batch_stats': state.get('batch_stats', {})}


def merge_variables(fresh: Mapping[str, Any], loaded: Mapping[str, Any]
                    ) -> tuple[dict[str, Any], dict[str, list[str]]]:
  """Takes every leaf of ``loaded`` that ``fresh`` has with the same shape.

  Leaves only in ``fresh`` (clipping levels, architecture logits of a
  quantized model initialized from a full-precision one) keep their fresh
  values, and so do leaves whose shapes differ (e.g. a classifier for another
  number of classes).

  Returns:
    (merged variables, {'initialized': [...], 'mismatched': [...], 'unused': [...]})
  """
  flat_fresh = traverse_util.flatten_dict(dict(fresh), sep='/')
  flat_loaded = traverse_util.flatten_dict(dict(loaded), sep='/')
  merged, report = {}, {'initialized': [], 'mismatched': [], 'unused': []}
  for key, value in flat_fresh.items():
    if key not in flat_loaded:
      merged[key] = value
      report['initialized'].append(key)
    elif np.shape(flat_loaded[key]) != np.shape(value):
      merged[key] = value
      report['mismatched'].append(f'{key}: {np.shape(flat_loaded[key])} -> {np.shape(value)}')
    else:
      merged[key] = jax.numpy.asarray(flat_loaded[key], dtype=value.dtype)
  report['unused'] = sorted(set(flat_loaded) - set(flat_fresh))
  return traverse_util.unflatten_dict(merged, sep='/'), report


def log_merge_report(source: str, report: Mapping[str, list[str]]) -> None:
  logging.info('initialized from %s; %d leaves newly initialized%s', source,
               len(report['initialized']),
               f' (e.g. {report["initialized"][:3]})' if report['initialized'] else '')
  if report['mismatched']:
    logging.warning('shape mismatch, re-initialized: %s', report['mismatched'])
  if report['unused']:
    logging.info('unused leaves of %s: %s', source, report['unused'][:10])
