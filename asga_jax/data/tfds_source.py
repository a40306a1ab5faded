"""Opening TFDS data sets offline, without ever triggering a download."""

from __future__ import annotations

import tensorflow_datasets as tfds

from asga_jax.data.base import DataError


def is_mocked() -> bool:
  """Whether `tfds.testing.mock_data` is active.

  Under the mock, builders are never "prepared" (no files exist) yet `as_dataset` serves fake
  examples, so the missing-data check must not fire and split sizes must come from the data.
  mock_data replaces `DatasetBuilder.as_dataset` with a function defined in
  tensorflow_datasets.testing; checking where the method comes from needs no private API and no
  attempt to read (or download) real data.
  """
  return tfds.core.DatasetBuilder.as_dataset.__module__.startswith('tensorflow_datasets.testing')


def open_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  """Returns the builder of a prepared TFDS data set.

  Never calls `download_and_prepare`: offline, TFDS retries the download for ~205 s before failing.

  Raises:
    DataError: the data set is not prepared under `data_dir`; the message says where it looked and
      how to provide the data.
  """
  builder = tfds.builder(name, data_dir=data_dir)
  if is_mocked() or builder.is_prepared():
    return builder
  raise DataError(
      f'TFDS data set {name!r} was not found: nothing is prepared in {builder.data_dir} '
      f'(data_dir={data_dir or "the TFDS default"}), and this machine cannot download it. '
      f'Either prepare it on a machine with internet (`tfds build {name} --data_dir DIR`; '
      'imagenet2012 also needs --manual_dir with the downloaded tars), copy DIR here and set '
      '--config.data.data_dir=DIR; or read an image folder instead: --config.data.name=folder '
      '--config.data.folder=PATH (PATH/train/<class>/<image>, PATH/test/<class>/<image>) or '
      '--config.data.archive=PATH.tar.gz.')


def check_split(builder: tfds.core.DatasetBuilder, split: str) -> None:
  """Raises DataError if a prepared builder has no split `split` (not checkable under the mock)."""
  if not is_mocked() and split not in builder.info.splits:
    raise DataError(f'TFDS data set {builder.name!r} in {builder.data_dir} has no split {split!r}; '
                    f'its splits are {sorted(builder.info.splits)}. Set '
                    '--config.data.train_split / --config.data.eval_split.')
