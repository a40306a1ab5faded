"""Model zoo: every model is built from :mod:`asga_jax.quant` layers."""

from collections.abc import Callable
from typing import Any

import flax.linen as nn

from asga_jax.models.resnet import (ResNet, resnet8, resnet18, resnet20, resnet32, resnet56,
                                    resnet_cifar)

MODELS: dict[str, Callable[..., nn.Module]] = {
    'resnet8': resnet8,
    'resnet18': resnet18,
    'resnet20': resnet20,
    'resnet32': resnet32,
    'resnet56': resnet56,
}


def create_model(name: str, **kwargs: Any) -> nn.Module:
  """Builds the model called ``name`` (see ``MODELS``) with its keyword arguments."""
  if name not in MODELS:
    raise ValueError(f'unknown model {name!r}; available: {sorted(MODELS)}.')
  return MODELS[name](**kwargs)
