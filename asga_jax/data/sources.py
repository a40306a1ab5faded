"""Data sources: the examples of each split, their natural order and their epoch orders.

A split hands out `(position, record, label)` for the positions a process reads; a record is a file
path, a decoded image cached in memory, or an encoded image (streamed TFDS data), and `Split.load`
turns it into a uint8 image. Ordering, skipping and sharding happen on records, before anything is
decoded.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
from typing import Callable

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from asga_jax.data import folder as folder_lib
from asga_jax.data import preprocess
from asga_jax.data import tfds_source
from asga_jax.data.base import DataError, DatasetInfo
from asga_jax.data.config import SourceSpec

EpochKey = tuple[int, int]  # (seed, epoch)
DECODE_ERRORS = (tf.errors.InvalidArgumentError, tf.errors.NotFoundError)


@dataclasses.dataclass(frozen=True)
class Rows:
  """The positions of an epoch order that one process reads.

  Positions start .. stop-1, restricted to rows process*local_batch .. (process+1)*local_batch-1
  of every global batch (global batch j holds positions j*global_batch .. (j+1)*global_batch-1).
  """
  start: int
  stop: int
  global_batch: int
  local_batch: int
  process: int

  def contains(self, position):
    """Whether `position` (numpy or tf integers) is in one of this process's rows."""
    return (position % self.global_batch) // self.local_batch == self.process

  def positions(self) -> np.ndarray:
    """This process's positions in [start, stop), increasing."""
    positions = np.arange(self.start, self.stop)
    return positions[self.contains(positions)]


class Split(abc.ABC):
  """The examples of one split."""

  def __init__(self, num_examples: int, load: Callable[[tf.Tensor], tf.Tensor]):
    self.num_examples = num_examples
    self.load = load  # record -> uint8 [h, w, 3]

  @abc.abstractmethod
  def select(self, key: EpochKey | None, rows: Rows) -> tf.data.Dataset:
    """(position, record, label) at `rows` of the natural order (key None) or of epoch `key`."""

  @abc.abstractmethod
  def decode_error(self, error: tf.errors.OpError, key: EpochKey | None,
                   positions: np.ndarray) -> DataError:
    """Explains a failure to load one of the records at `positions` of the order of `key`."""


class ArraySplit(Split):
  """Records held in memory: file paths, or decoded images (cache).

  Epoch orders are exact permutations computed in numpy, so only this process's selected rows
  ever enter the tf.data pipeline: skipping and sharding cost nothing.
  """

  def __init__(self, records: tf.Tensor, labels: np.ndarray, load: Callable[[tf.Tensor], tf.Tensor],
               where: str):
    super().__init__(len(labels), load)
    self._records, self._labels, self._where = records, labels, where

  def _indices(self, key: EpochKey | None, positions: np.ndarray) -> np.ndarray:
    if key is None:
      return positions
    return np.random.default_rng(key).permutation(self.num_examples)[positions]

  def select(self, key, rows):
    positions = rows.positions()
    indices = self._indices(key, positions)
    return tf.data.Dataset.from_tensor_slices(
        (positions, tf.gather(self._records, indices), self._labels[indices]))

  def decode_error(self, error, key, positions):
    bad = []
    for record in tf.gather(self._records, self._indices(key, positions)):
      try:
        self.load(record)
      except DECODE_ERRORS:
        bad.append(record.numpy().decode())
    return DataError(f'Could not decode image(s) {bad or "(not identified)"} in {self._where}: '
                     f'{error.message.splitlines()[0]}. The file looks like an image but is '
                     'damaged (e.g. truncated); delete or replace it.')


class StreamSplit(Split):
  """A TFDS split read as a stream, for data too large to index in memory.

  Epoch orders come from a seeded file shuffle and a seeded buffer shuffle (deterministic as long
  as nobody changes TF's global seed). Every process reads all records (still encoded) and keeps
  its rows, so the union over processes is the single-process batch; only kept rows are decoded.
  """

  def __init__(self, builder: tfds.core.DatasetBuilder, split: str, num_examples: int,
               shuffle_buffer: int, load: Callable[[tf.Tensor], tf.Tensor]):
    super().__init__(num_examples, load)
    self._builder, self._split, self._shuffle_buffer = builder, split, shuffle_buffer

  def select(self, key, rows):
    if key is None:
      ds = _read_tfds(self._builder, self._split, shuffle_seed=None)
    else:
      file_seed, buffer_seed = (int(s) for s in np.random.SeedSequence(key).generate_state(2))
      ds = _read_tfds(self._builder, self._split, shuffle_seed=file_seed)
      ds = ds.shuffle(self._shuffle_buffer, seed=buffer_seed)
    ds = ds.enumerate().take(rows.stop).skip(rows.start)
    return ds.filter(lambda i, _: rows.contains(i)).map(lambda i, ex: (i, ex[0], ex[1]))

  def decode_error(self, error, key, positions):
    return DataError(f'Could not decode an image of TFDS {self._builder.name}:{self._split} in '
                     f'{self._builder.data_dir}: {error.message.splitlines()[0]}. The prepared '
                     'data is damaged; prepare it again.')


def _read_tfds(builder: tfds.core.DatasetBuilder, split: str,
               shuffle_seed: int | None) -> tf.data.Dataset:
  """(encoded image, label) pairs; images stay encoded so that skipped ones are never decoded."""
  image_key = builder.info.supervised_keys[0]
  return builder.as_dataset(
      split=split, as_supervised=True, shuffle_files=shuffle_seed is not None,
      decoders={image_key: tfds.decode.SkipDecoding()},
      read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed, try_autocache=False))


def _in_memory(records: tf.data.Dataset, num_examples: int, load: Callable[[tf.Tensor], tf.Tensor],
               describe: Callable[[list[int]], str]) -> ArraySplit:
  """Decodes a whole split (natural order) into memory; the cached split gathers from it."""
  ds = records.enumerate().map(lambda i, rec: (i, load(rec[0]), rec[1]),
                               num_parallel_calls=tf.data.AUTOTUNE)
  # ignore_errors + positions identify exactly which images fail, to name them all at once.
  ds = ds.ignore_errors().batch(1024).prefetch(tf.data.AUTOTUNE)
  positions, images, labels = (np.concatenate(parts) for parts in zip(*ds.as_numpy_iterator()))
  if len(positions) != num_examples:
    missing = sorted(set(range(num_examples)) - set(positions.tolist()))
    raise DataError(f'{len(missing)} image(s) could not be decoded: {describe(missing[:5])}. The '
                    'files look like images but are damaged (e.g. truncated); delete or replace '
                    'them.')
  logging.info('Cached %d decoded images (%.0f MB).', num_examples, images.nbytes / 2**20)
  return ArraySplit(tf.constant(images), labels, lambda image: image, where='memory')


class Source:
  """Info and lazily built splits of one configured data set."""

  def __init__(self, info: DatasetInfo, train: Callable[[], Split], eval_: Callable[[], Split]):
    self.info = info
    self._train, self._eval = train, eval_

  @functools.cached_property
  def train(self) -> Split:
    return self._train()

  @functools.cached_property
  def eval(self) -> Split:
    return self._eval()


def _folder_source(spec: SourceSpec) -> Source:
  classes = folder_lib.class_names(spec.root, spec.train_split)
  train = folder_lib.list_split(spec.root, spec.train_split, classes, spec.on_bad_image)
  if spec.subset is not None:
    _check_subset(spec, len(train.labels), train.directory)
    keep = folder_lib.balanced_subset(train.labels, spec.subset)
    train = folder_lib.Listing(train.directory, train.paths[keep], train.labels[keep])
  eval_ = folder_lib.list_split(spec.root, spec.eval_split, classes, spec.on_bad_image)

  def load_file(path: tf.Tensor) -> tf.Tensor:
    return preprocess.decode(tf.io.read_file(path), spec.image_size)

  def split(listing: folder_lib.Listing) -> Split:
    if not spec.cache:
      return ArraySplit(tf.constant(listing.paths), listing.labels, load_file,
                        where=listing.directory)
    records = tf.data.Dataset.from_tensor_slices((listing.paths, listing.labels))
    return _in_memory(records, len(listing.labels), load_file,
                      lambda positions: str(listing.paths[positions].tolist()))

  info = DatasetInfo(spec.name, len(classes), classes, len(train.labels), len(eval_.labels),
                     spec.image_size)
  return Source(info, lambda: split(train), lambda: split(eval_))


def _tfds_source(spec: SourceSpec) -> Source:
  builder = tfds_source.open_builder(spec.tfds_name, spec.data_dir)
  for name in (spec.train_split, spec.eval_split):
    tfds_source.check_split(builder, name)
  mocked = tfds_source.is_mocked()

  def size(split: str) -> int:
    # Under the mock, info.splits is empty or does not match the fake data: count the data.
    if mocked:
      return int(_read_tfds(builder, split, shuffle_seed=None).cardinality())
    return builder.info.splits[split].num_examples

  train_split = spec.train_split
  if spec.subset is not None:
    _check_subset(spec, size(train_split), f'{builder.data_dir} ({train_split})')
    # TFDS stores examples in a shuffled order, so the first `subset` are a fixed random sample.
    train_split = f'{train_split}[:{spec.subset}]'

  def load(encoded: tf.Tensor) -> tf.Tensor:
    return preprocess.decode(encoded, spec.image_size)

  def split(name: str) -> Split:
    n = size(name)
    if not spec.cache:
      return StreamSplit(builder, name, n, spec.shuffle_buffer, load)
    return _in_memory(_read_tfds(builder, name, shuffle_seed=None), n, load,
                      lambda positions: f'{spec.tfds_name}:{name} examples {positions}')

  classes = tuple(builder.info.features[builder.info.supervised_keys[1]].names)
  info = DatasetInfo(spec.name, len(classes), classes, size(train_split), size(spec.eval_split),
                     spec.image_size)
  return Source(info, lambda: split(train_split), lambda: split(spec.eval_split))


def _check_subset(spec: SourceSpec, available: int, where: str) -> None:
  if spec.subset > available:
    raise DataError(f'data config: subset={spec.subset} exceeds the {available} training examples '
                    f'in {where}; lower --config.data.subset or leave it unset.')


@functools.lru_cache(maxsize=2)
def _cached_source(spec: SourceSpec) -> Source:
  return _folder_source(spec) if spec.tfds_name is None else _tfds_source(spec)


def open_source(spec: SourceSpec) -> Source:
  """Returns the source of `spec`, memoized per process (listings and cached images are reused)."""
  if spec.tfds_name is not None and tfds_source.is_mocked():
    return _tfds_source(spec)  # Mock data differs between mock_data contexts: never memoize it.
  return _cached_source(spec)
