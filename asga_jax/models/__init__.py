"""Model zoo: every model is built from :mod:`asga_jax.quant` layers.

Models listed in ``STEM_MODELS`` come in a CIFAR (32 px) and an ImageNet
(224 px) variant, chosen by their ``stem`` argument, with the same layer
names, so a policy searched on one applies to the other.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn

from asga_jax.models.common import STEMS, Stem, batch_norm
from asga_jax.models.mobilenetv2 import MobileNetV2, mobilenetv2
from asga_jax.models.resnet import (ResNet, resnet8, resnet18, resnet20, resnet32, resnet34,
                                    resnet50, resnet56, resnet_cifar)
from asga_jax.models.vgg import VGG, vgg16
from asga_jax.models.vit import ViT, vit_b16, vit_s16

MODELS: dict[str, Callable[..., nn.Module]] = {
    'resnet8': resnet8,
    'resnet20': resnet20,
    'resnet32': resnet32,
    'resnet56': resnet56,
    'resnet18': resnet18,
    'resnet34': resnet34,
    'resnet50': resnet50,
    'mobilenetv2': mobilenetv2,
    'vgg16': vgg16,
    'vit_s16': vit_s16,
    'vit_b16': vit_b16,
}
STEM_MODELS = frozenset({'resnet18', 'resnet34', 'resnet50', 'mobilenetv2', 'vgg16', 'vit_s16',
                         'vit_b16'})
# Bit candidates of the searched layers, as in the ASGA paper (ViTs as ResNets).
DEFAULT_BITS: dict[str, tuple[int, ...]] = {
    **{name: (2, 3, 4, 6) for name in MODELS},
    'mobilenetv2': (2, 3, 4, 5, 6),
    'vgg16': (2, 3, 4, 5, 6),
}


def create_model(name: str, **kwargs: Any) -> nn.Module:
  """Builds the model called ``name`` (see ``MODELS``) with its keyword arguments."""
  if name not in MODELS:
    raise ValueError(f'unknown model {name!r}; available: {sorted(MODELS)}.')
  return MODELS[name](**kwargs)


__all__ = [
    'batch_norm',
    'create_model',
    'DEFAULT_BITS',
    'MobileNetV2',
    'mobilenetv2',
    'MODELS',
    'ResNet',
    'resnet18',
    'resnet20',
    'resnet32',
    'resnet34',
    'resnet50',
    'resnet56',
    'resnet8',
    'resnet_cifar',
    'Stem',
    'STEM_MODELS',
    'STEMS',
    'VGG',
    'vgg16',
    'ViT',
    'vit_b16',
    'vit_s16',
]
