"""Types shared by the data modules: the error type and the data set summary."""

from __future__ import annotations

import dataclasses


class DataError(ValueError):
  """A data problem; the message names the problem, where it looked and the fix."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a model and a trainer need to know about a data set.

  Attributes:
    name: the configured data set name ('cifar10', 'folder', 'cifar10_sample', ...).
    num_classes: number of classes (labels are 0..num_classes-1).
    class_names: class names, indexed by label.
    num_train: examples in the train split actually used (after `subset`).
    num_eval: examples in the eval split.
    image_size: side length of the square images in batches.
  """
  name: str
  num_classes: int
  class_names: tuple[str, ...]
  num_train: int
  num_eval: int
  image_size: int
