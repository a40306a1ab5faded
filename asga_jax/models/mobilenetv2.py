"""MobileNetV2 (Sandler et al., 2018) built from quantized layers.

Inverted residual blocks ``block{i}`` (i = 0..16) hold ``expand`` (1x1; absent
when the expansion is 1), ``depthwise`` (3x3, one group per channel) and
``project`` (1x1, linear); ``final_conv`` is the 1x1 convolution to 1280
channels. The 8-bit edge layers are ``stem_conv`` and ``head``.

The CIFAR variant (32 px) keeps every layer and name and only drops the
stride of the stem and of the second stage, as is usual for 32 px inputs, so
a policy searched on it applies to the ImageNet variant unchanged.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from asga_jax.models.common import Stem, batch_norm, check_stem
from asga_jax.quant import QuantConv, QuantDense, QuantSpec

# (expansion t, output channels c, blocks n, stride s of the first block).
INVERTED_RESIDUAL_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                             (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def make_divisible(value: float, divisor: int = 8) -> int:
  """Rounds channels to a multiple of ``divisor``, never below 90% of ``value``."""
  rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
  return rounded + divisor if rounded < 0.9 * value else rounded


class InvertedResidual(nn.Module):
  """Expand (1x1), depthwise (3x3), project (1x1); identity shortcut when shapes match."""
  features: int
  strides: int
  expansion: int
  quant: QuantSpec
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = functools.partial(QuantConv, quant=self.quant, dtype=self.dtype)
    hidden = x.shape[-1] * self.expansion
    y = x
    if self.expansion != 1:
      # Block inputs are linear projections (signed), except block0's.
      y = conv(hidden, (1, 1), padding=0, signed_input=True, name='expand')(y)
      y = nn.relu6(batch_norm(train, self.dtype, 'expand_bn')(y))
    y = conv(hidden, (3, 3), (self.strides,) * 2, padding=1, feature_group_count=hidden,
             name='depthwise')(y)
    y = nn.relu6(batch_norm(train, self.dtype, 'depthwise_bn')(y))
    # The projection's input is a ReLU6 output (unsigned); its output is linear.
    y = conv(self.features, (1, 1), padding=0, name='project')(y)
    y = batch_norm(train, self.dtype, 'project_bn')(y)
    if self.strides == 1 and x.shape[-1] == self.features:
      y = y + x
    return y


class MobileNetV2(nn.Module):
  """MobileNetV2.

  Attributes:
    num_classes: classifier outputs.
    width_multiplier: scales every layer's channels (1.0: 3.5M parameters,
      0.30 GMACs at 224x224).
    stem: 'cifar' (stride-1 stem and second stage, for 32 px) or 'imagenet'.
    quant: quantization; ``stem_conv`` and ``head`` are 8-bit edge layers.
    dtype: computation dtype.
  """
  num_classes: int
  width_multiplier: float = 1.0
  stem: Stem = 'cifar'
  quant: QuantSpec = QuantSpec()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    check_stem(self.stem)
    cifar = self.stem == 'cifar'
    channels = lambda c: make_divisible(c * self.width_multiplier)
    x = QuantConv(channels(32), (3, 3), (1, 1) if cifar else (2, 2), padding=1,
                  quant=self.quant, edge=True, signed_input=True, dtype=self.dtype,
                  name='stem_conv')(x)
    x = nn.relu6(batch_norm(train, self.dtype, 'stem_bn')(x))
    index = 0
    for stage, (t, c, n, s) in enumerate(INVERTED_RESIDUAL_SETTING):
      stride = 1 if cifar and stage == 1 else s
      for j in range(n):
        x = InvertedResidual(channels(c), stride if j == 0 else 1, t, self.quant, self.dtype,
                             name=f'block{index}')(x, train)
        index += 1
    last = make_divisible(1280 * max(1.0, self.width_multiplier))
    x = QuantConv(last, (1, 1), padding=0, quant=self.quant, signed_input=True,
                  dtype=self.dtype, name='final_conv')(x)
    x = nn.relu6(batch_norm(train, self.dtype, 'final_bn')(x))
    x = jnp.mean(x, axis=(1, 2))
    x = QuantDense(self.num_classes, quant=self.quant, edge=True, dtype=self.dtype,
                   name='head')(x)
    return x.astype(jnp.float32)


def mobilenetv2(num_classes: int, *, stem: Stem = 'cifar', quant: QuantSpec = QuantSpec(),
                width: int = 32, dtype: Any = jnp.float32) -> MobileNetV2:
  """MobileNetV2 (3.5M parameters, 0.30 GMACs at 224x224).

  ``width``: channels of the stem (32); the width multiplier is ``width / 32``.
  """
  return MobileNetV2(num_classes, width / 32, stem, quant, dtype)
