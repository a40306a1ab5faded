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
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util

from asga_jax.train import sharding


class CheckpointMismatchError(ValueError):
  """A checkpoint holds a different model or optimizer than the run expects."""


class NoReadableCheckpointError(RuntimeError):
  """Every checkpoint of a directory failed to read."""


CORRUPT_DIR = 'corrupt_checkpoints'


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{'params/stage1/conv/kernel': shape, ...}: the same keys for a TrainState and its metadata."""
  return {jax.tree_util.keystr(p, simple=True, separator='/'): tuple(x.shape)
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def structure_mismatch(saved: Any, target: Any) -> list[str]:
  """What differs between a saved tree (orbax metadata or arrays) and ``target``.

  Returns:
    One line per problem: keys missing from the checkpoint, keys only in the
    checkpoint, and shapes that differ (at most 10 of each); empty if they fit.
  """
  a, b = _shapes(saved), _shapes(target)
  order = lambda keys: sorted(keys, key=lambda k: (not k.startswith('params/'), k))  # params first
  missing, unexpected = order(set(b) - set(a)), order(set(a) - set(b))
  shapes = [f'{k}: checkpoint {a[k]}, this run {b[k]}' for k in order(set(a) & set(b))
            if a[k] != b[k]]
  lines = []
  for what, items in (('missing from the checkpoint', missing),
                      ('only in the checkpoint', unexpected), ('shape differs', shapes)):
    if items:
      lines.append(f'{len(items)} {what}: ' + '; '.join(items[:10])
                   + ('; ...' if len(items) > 10 else ''))
  return lines


class StageCheckpoints:
  """Save/restore of one stage's train state, keeping the last ``keep``.

  Restoring takes the newest checkpoint that reads back. One that does not
  (truncated or deleted files, a crash in the middle of an older save) is moved
  to ``<stage>/corrupt_checkpoints/`` with a warning, and the one before it is
  used. One that reads but holds another model or optimizer raises
  :class:`CheckpointMismatchError` listing the differences. Temporary
  directories of unfinished saves are removed when the manager opens.
  """

  def __init__(self, directory: str, keep: int, read_only: bool = False):
    self.directory = os.path.abspath(directory)
    self.read_only = read_only
    self._manager = ocp.CheckpointManager(
        self.directory,
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'meta': ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                             read_only=read_only,
                                             cleanup_tmp_directories=not read_only))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, meta: Mapping[str, Any]) -> None:
    """Saves ``state`` at ``step`` (asynchronously); a step already saved is skipped.

    Orbax writes into a temporary directory and renames it when complete, and
    deletes old checkpoints only after that: a failed save (full disk, kill)
    never touches the checkpoints already there.
    """
    if step == self.latest_step():
      return
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     meta=ocp.args.JsonSave(dict(meta))))

  def restore(self, target: Any = None) -> tuple[Any, dict[str, Any]]:
    """Restores the newest readable checkpoint.

    Args:
      target: a tree whose structure, shapes, dtypes and shardings the state
        takes (None: as saved, on the default device).

    Returns:
      (state, meta).

    Raises:
      CheckpointMismatchError: the checkpoint was written by another model or config.
      NoReadableCheckpointError: no checkpoint read back.
    """
    abstract = None if target is None else jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    failed = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        saved = self._manager.item_metadata(step)['state']
      except Exception as e:  # pylint: disable=broad-except  (orbax/tensorstore raise many types)
        failed.append(self._set_aside(step, e))
        continue
      if target is not None and saved is not None and (
          problems := structure_mismatch(saved, target)):
        raise CheckpointMismatchError(
            f'checkpoint {os.path.join(self.directory, str(step))} was written by a different '
            'model or config:\n  ' + '\n  '.join(problems) + '\nUse a new --workdir for this '
            f'config, or move {self.directory} away to start this stage over.')
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
      except Exception as e:  # pylint: disable=broad-except
        failed.append(self._set_aside(step, e))
        continue
      if failed:
        logging.warning('restored step %d of %s instead of the newer, unreadable %s', step,
                        self.directory, failed)
      return restored.state, dict(restored.meta)
    raise NoReadableCheckpointError(
        f'no readable checkpoint in {self.directory}' + (
            f' (unreadable: {failed}; set aside in {self._corrupt_dir()}); run again to start '
            'this stage over' if failed else ''))

  def _corrupt_dir(self) -> str:
    return os.path.join(os.path.dirname(self.directory), CORRUPT_DIR)

  def _set_aside(self, step: int, error: Exception) -> str:
    """Moves an unreadable checkpoint out of the manager's way (kept for inspection)."""
    source = os.path.join(self.directory, str(step))
    reason = f'{type(error).__name__}: {str(error).splitlines()[0][:300]}'
    if self.read_only:
      logging.warning('checkpoint %s does not read back (%s); skipping it', source, reason)
      return source
    destination = os.path.join(self._corrupt_dir(), f'{step}-{int(time.time())}')
    if jax.process_index() == 0:
      os.makedirs(self._corrupt_dir(), exist_ok=True)
      os.replace(source, destination)
    sharding.sync_processes(f'set aside {source}')
    self._manager.reload()
    logging.warning('checkpoint %s does not read back (%s); moved to %s, trying the one before '
                    'it', source, reason, destination)
    return source

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def _checkpoint_dir(directory: str) -> str:
  """A stage directory's ``checkpoints/``, or ``directory`` itself."""
  inner = os.path.join(directory, 'checkpoints')
  return inner if os.path.isdir(inner) else directory


def has_checkpoint(directory: str) -> bool:
  """Whether ``directory`` (a stage directory or its ``checkpoints/``) holds a checkpoint."""
  directory = _checkpoint_dir(directory)
  return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def load_variables(directory: str) -> dict[str, Any]:
  """``{'params': ..., 'batch_stats': ...}`` of the newest readable checkpoint in ``directory``.

  ``directory`` is a stage's checkpoint directory (or the stage directory
  holding ``checkpoints/``). No target structure is needed.

  Raises:
    FileNotFoundError: no checkpoint there, with the path looked at.
  """
  directory = _checkpoint_dir(directory)
  ckpts = StageCheckpoints(directory, keep=1, read_only=True)
  if ckpts.latest_step() is None:
    raise FileNotFoundError(f'no checkpoint in {directory!r}; point the stage\'s `init` at a '
                            'stage directory (e.g. WORKDIR/pretrain) or its checkpoints/.')
  state, _ = ckpts.restore()
  ckpts.close()
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
