"""Pieces shared by the model zoo."""

from __future__ import annotations

from typing import Any, Literal

import flax.linen as nn

# Which input resolution a model is laid out for: 'cifar' (32 px) or
# 'imagenet' (224 px). Both variants share layer names, so a policy searched
# on one applies to the other.
Stem = Literal['cifar', 'imagenet']
STEMS = ('cifar', 'imagenet')


def check_stem(stem: str) -> None:
  if stem not in STEMS:
    raise ValueError(f'unknown stem {stem!r}; choose one of {STEMS}.')


def batch_norm(train: bool, dtype: Any, name: str) -> nn.BatchNorm:
  """BatchNorm with PyTorch's BatchNorm2d defaults (momentum 0.1, i.e. 0.9 here; eps 1e-5)."""
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                      dtype=dtype, name=name)
