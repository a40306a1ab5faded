"""Train and eval batches: ordering, resuming, per-process sharding, batching.

Every epoch is a fixed order of the split's examples, a function of (seed, epoch) only. Global
batch j is made of positions j*B .. j*B+B-1 of that order, and process p of P takes rows
p*b .. p*b+b-1 of it (b = B / P): the union over processes is the single-process batch. Resuming
at batch k skips k*B records before anything is read or decoded, and augmentation is keyed by
position, so every batch is bit-for-bit the same however the epoch is split or resumed.
"""

from __future__ import annotations

import itertools
import operator
from typing import Any, Iterator

from absl import logging
import numpy as np
import tensorflow as tf

from asga_jax.data import preprocess
from asga_jax.data import sources
from asga_jax.data.base import DataError, DatasetInfo
from asga_jax.data.config import resolve

Batch = dict[str, np.ndarray]


def _hide_gpus_from_tf() -> None:
  # The accelerators belong to JAX: a TF that sees a GPU would reserve its memory.
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError as e:  # TF was initialized before this module was imported.
    logging.warning('Could not hide GPUs from TensorFlow: %s', e)


_hide_gpus_from_tf()


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  # threading.private_threadpool_size stays unset: a private pool of 1 thread was 25-30 % slower.
  return options


def _natural(name: str, value: Any, minimum: int = 0) -> int:
  try:
    index = operator.index(value)
  except TypeError:
    index = None
  if index is None or index < minimum:
    raise DataError(f'{name} must be an integer >= {minimum}, got {value!r}.')
  return index


def _local_batch(global_batch_size: int, process_index: int, process_count: int) -> int:
  if not _natural('process_index', process_index) < _natural('process_count', process_count, 1):
    raise DataError(f'process_index={process_index} must be in [0, process_count={process_count}).')
  if _natural('global_batch_size', global_batch_size, 1) % process_count:
    raise DataError(f'global_batch_size={global_batch_size} must be a multiple of '
                    f'process_count={process_count}.')
  return global_batch_size // process_count


def _full_batches(num_examples: int, global_batch_size: int) -> int:
  num_batches = num_examples // _natural('global_batch_size', global_batch_size, 1)
  if num_batches == 0:
    raise DataError(f'global_batch_size={global_batch_size} exceeds the {num_examples} training '
                    'examples: not one full batch per epoch. Lower the batch size or the subset.')
  return num_batches


def _numpy(ds: tf.data.Dataset, split: sources.Split, key: sources.EpochKey | None,
           rows: sources.Rows) -> Iterator[Batch]:
  """Iterates as numpy, turning a decode failure into a DataError naming the file."""
  iterator = ds.with_options(_options()).as_numpy_iterator()
  for j in itertools.count():
    try:
      batch = next(iterator)
    except StopIteration:
      return
    except sources.DECODE_ERRORS as e:
      b = rows.local_batch
      raise split.decode_error(e, key, rows.positions()[j * b:(j + 1) * b]) from None
    yield batch


def get_info(cfg: Any) -> DatasetInfo:
  """Describes the configured data set (lists files or reads TFDS metadata; decodes nothing).

  Args:
    cfg: data config (see `default_data_config`).

  Returns:
    The DatasetInfo.
  """
  return sources.open_source(resolve(cfg).source).info


def steps_per_epoch(cfg: Any, global_batch_size: int) -> int:
  """Number of full global batches per training epoch (the remainder is dropped).

  Args:
    cfg: data config.
    global_batch_size: batch size summed over processes.

  Returns:
    num_train // global_batch_size.

  Raises:
    DataError: the batch is larger than the training set.
  """
  return _full_batches(get_info(cfg).num_train, global_batch_size)


def train_batches(cfg: Any, *, global_batch_size: int, seed: int, epoch: int, start_batch: int = 0,
                  process_index: int = 0, process_count: int = 1) -> Iterator[Batch]:
  """One epoch of training batches for this process, from batch `start_batch` on.

  Args:
    cfg: data config.
    global_batch_size: batch size summed over processes; a multiple of process_count.
    seed: non-negative seed of the order and augmentation of every epoch.
    epoch: epoch number (each epoch has its own order and augmentation).
    start_batch: first batch to yield (for resuming); earlier ones are skipped without decoding.
    process_index, process_count: this process and the number of processes.

  Returns:
    Iterator over steps_per_epoch - start_batch batches {'image': float32 [b, S, S, 3] normalized,
    'label': int32 [b]}, b = global_batch_size // process_count.
  """
  spec = resolve(cfg)
  split = sources.open_source(spec.source).train
  size = spec.source.image_size
  b = _local_batch(global_batch_size, process_index, process_count)
  num_batches = _full_batches(split.num_examples, global_batch_size)
  key = (_natural('seed', seed), _natural('epoch', epoch))
  if not 0 <= _natural('start_batch', start_batch) <= num_batches:
    raise DataError(f'start_batch={start_batch} is past the {num_batches} batches of an epoch.')
  mean, std = tf.constant(spec.mean), tf.constant(spec.std)

  def prepare(position, record, label):
    image = split.load(record)
    if spec.augment:
      image = preprocess.augment(image, preprocess.augmentation_key(*key, position), size)
    else:
      image = preprocess.eval_view(image, size)
    return {'image': preprocess.normalize(image, mean, std), 'label': tf.cast(label, tf.int32)}

  rows = sources.Rows(start_batch * global_batch_size, num_batches * global_batch_size,
                      global_batch_size, b, process_index)
  ds = split.select(key, rows).map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(b, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return _numpy(ds, split, key, rows)


def eval_batches(cfg: Any, *, global_batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[Batch]:
  """The eval split once, in its natural order, padded to full batches.

  Every process yields ceil(num_eval / global_batch_size) batches; padding rows (in the last
  global batch) have mask 0, zero image and label 0.

  Args:
    cfg: data config.
    global_batch_size: batch size summed over processes; a multiple of process_count.
    process_index, process_count: this process and the number of processes.

  Returns:
    Iterator over batches {'image': float32 [b, S, S, 3], 'label': int32 [b], 'mask': float32 [b]}.
  """
  spec = resolve(cfg)
  split = sources.open_source(spec.source).eval
  size = spec.source.image_size
  b = _local_batch(global_batch_size, process_index, process_count)
  rows = sources.Rows(0, split.num_examples, global_batch_size, b, process_index)
  num_batches = -(-split.num_examples // global_batch_size)
  mean, std = tf.constant(spec.mean), tf.constant(spec.std)

  def prepare(_, record, label):
    image = preprocess.normalize(preprocess.eval_view(split.load(record), size), mean, std)
    return {'image': image, 'label': tf.cast(label, tf.int32), 'mask': tf.constant(1.0)}

  padding = tf.data.Dataset.from_tensors({
      'image': tf.zeros([size, size, 3]), 'label': tf.constant(0), 'mask': tf.constant(0.0)})
  ds = split.select(None, rows).map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.concatenate(padding.repeat(num_batches * b - len(rows.positions())))
  ds = ds.batch(b).prefetch(tf.data.AUTOTUNE)
  return _numpy(ds, split, None, rows)
