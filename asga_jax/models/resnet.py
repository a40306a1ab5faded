"""ResNets (He et al., 2016) built from quantized layers.

Layer names are shared between the CIFAR variant (3x3 stem, no max-pool) and
the ImageNet variant (7x7 stride-2 stem + max-pool): only ``stem_conv`` differs,
and it is an 8-bit edge layer, so a policy searched on one applies to the
other. Blocks are named ``stage{i}/block{j}`` with convolutions ``conv1``,
``conv2`` (and ``conv3`` in bottleneck blocks) and, where the shape changes, a
projection ``shortcut`` (option B). Bottleneck blocks stride in their 3x3
convolution (torchvision's "ResNet v1.5").
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from asga_jax.models.common import Stem, batch_norm, check_stem
from asga_jax.quant import QuantConv, QuantDense, QuantSpec

class BasicBlock(nn.Module):
  """Two 3x3 convolutions with an identity or 1x1-projection shortcut."""
  features: int
  strides: int
  quant: QuantSpec
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = functools.partial(QuantConv, quant=self.quant, dtype=self.dtype)
    y = conv(self.features, (3, 3), (self.strides,) * 2, padding=1, name='conv1')(x)
    y = nn.relu(batch_norm(train, self.dtype, 'bn1')(y))
    y = conv(self.features, (3, 3), padding=1, name='conv2')(y)
    y = batch_norm(train, self.dtype, 'bn2')(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = conv(self.features, (1, 1), (self.strides,) * 2, padding=0, name='shortcut')(x)
      x = batch_norm(train, self.dtype, 'shortcut_bn')(x)
    return nn.relu(y + x)


class BottleneckBlock(nn.Module):
  """1x1 reduce, 3x3 (strided), 1x1 expand to 4x ``features``; projection shortcut."""
  features: int
  strides: int
  quant: QuantSpec
  dtype: Any = jnp.float32
  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = functools.partial(QuantConv, quant=self.quant, dtype=self.dtype)
    y = conv(self.features, (1, 1), padding=0, name='conv1')(x)
    y = nn.relu(batch_norm(train, self.dtype, 'bn1')(y))
    y = conv(self.features, (3, 3), (self.strides,) * 2, padding=1, name='conv2')(y)
    y = nn.relu(batch_norm(train, self.dtype, 'bn2')(y))
    y = conv(self.features * self.expansion, (1, 1), padding=0, name='conv3')(y)
    y = batch_norm(train, self.dtype, 'bn3')(y)
    if self.strides != 1 or x.shape[-1] != self.features * self.expansion:
      x = conv(self.features * self.expansion, (1, 1), (self.strides,) * 2, padding=0,
               name='shortcut')(x)
      x = batch_norm(train, self.dtype, 'shortcut_bn')(x)
    return nn.relu(y + x)


Block = Literal['basic', 'bottleneck']
_BLOCKS = {'basic': BasicBlock, 'bottleneck': BottleneckBlock}


class Stage(nn.Module):
  """A sequence of blocks; the first one may downsample."""
  num_blocks: int
  features: int
  strides: int
  quant: QuantSpec
  dtype: Any = jnp.float32
  block: Block = 'basic'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for j in range(self.num_blocks):
      x = _BLOCKS[self.block](self.features, self.strides if j == 0 else 1, self.quant,
                              self.dtype, name=f'block{j}')(x, train)
    return x


class ResNet(nn.Module):
  """ResNet with basic or bottleneck blocks.

  Attributes:
    stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
    widths: channels per stage, e.g. (64, 128, 256, 512) (bottleneck blocks
      output 4x as many).
    num_classes: classifier outputs.
    stem: 'cifar' (3x3 conv, stride 1) or 'imagenet' (7x7 stride 2 + max-pool).
    quant: quantization of the whole network; the stem and the classifier are
      edge layers (``quant.edge_bits``, 8 by default).
    dtype: computation dtype.
    block: 'basic' (two 3x3) or 'bottleneck' (1x1, 3x3, 1x1).
  """
  stage_sizes: Sequence[int]
  widths: Sequence[int]
  num_classes: int
  stem: Stem = 'cifar'
  quant: QuantSpec = QuantSpec()
  dtype: Any = jnp.float32
  block: Block = 'basic'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if self.block not in _BLOCKS:
      raise ValueError(f'unknown block {self.block!r}; choose one of {sorted(_BLOCKS)}.')
    check_stem(self.stem)
    if self.stem == 'imagenet':
      x = QuantConv(self.widths[0], (7, 7), (2, 2), padding=3, quant=self.quant, edge=True,
                    signed_input=True, dtype=self.dtype, name='stem_conv')(x)
    else:
      x = QuantConv(self.widths[0], (3, 3), padding=1, quant=self.quant, edge=True,
                    signed_input=True, dtype=self.dtype, name='stem_conv')(x)
    x = nn.relu(batch_norm(train, self.dtype, 'stem_bn')(x))
    if self.stem == 'imagenet':
      x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    for i, (n, w) in enumerate(zip(self.stage_sizes, self.widths)):
      x = Stage(n, w, 1 if i == 0 else 2, self.quant, self.dtype, self.block,
                name=f'stage{i + 1}')(x, train)
    x = jnp.mean(x, axis=(1, 2))
    x = QuantDense(self.num_classes, quant=self.quant, edge=True, dtype=self.dtype,
                   name='head')(x)
    return x.astype(jnp.float32)


def _imagenet_resnet(name: str, stage_sizes: Sequence[int], block: Block, doc: str):
  def build(num_classes: int, *, stem: Stem = 'cifar', quant: QuantSpec = QuantSpec(),
            width: int = 64, dtype: Any = jnp.float32) -> ResNet:
    return ResNet(tuple(stage_sizes), tuple(width * m for m in (1, 2, 4, 8)), num_classes, stem,
                  quant, dtype, block)
  build.__name__ = build.__qualname__ = name
  build.__doc__ = doc + ' ``width``: channels of the first stage (64).'
  return build


resnet18 = _imagenet_resnet('resnet18', (2, 2, 2, 2), 'basic',
                            'ResNet-18: 11.7M parameters, 1.82 GMACs at 224x224 (ImageNet stem).')
resnet34 = _imagenet_resnet('resnet34', (3, 4, 6, 3), 'basic',
                            'ResNet-34: 21.8M parameters, 3.67 GMACs at 224x224 (ImageNet stem).')
resnet50 = _imagenet_resnet('resnet50', (3, 4, 6, 3), 'bottleneck',
                            'ResNet-50: 25.6M parameters, 4.1 GMACs at 224x224 (ImageNet stem).')


def resnet_cifar(depth: int, num_classes: int, *, quant: QuantSpec = QuantSpec(),
                 width: int = 16, dtype: Any = jnp.float32) -> ResNet:
  """CIFAR ResNet-(6n+2): three stages of n blocks, width/2x/4x channels.

  ResNet-20 (n=3) has 0.27M parameters and 41M MACs at 32x32.
  """
  if depth < 8 or (depth - 2) % 6:
    raise ValueError(f'CIFAR ResNet depth must be 6n+2 (8, 14, 20, 32, 56, ...), got {depth}.')
  n = (depth - 2) // 6
  return ResNet((n, n, n), tuple(width * m for m in (1, 2, 4)), num_classes, 'cifar', quant, dtype)


resnet8 = functools.partial(resnet_cifar, 8)
resnet20 = functools.partial(resnet_cifar, 20)
resnet32 = functools.partial(resnet_cifar, 32)
resnet56 = functools.partial(resnet_cifar, 56)
