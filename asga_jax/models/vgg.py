"""VGG16 with BatchNorm (Simonyan & Zisserman, 2015) built from quantized layers.

Thirteen 3x3 convolutions ``conv1`` .. ``conv13`` (each followed by BatchNorm
and ReLU; 2x2 max-pooling after conv2, 4, 7, 10 and 13), then the classifier
``fc1``, ``fc2`` (ReLU) and ``head``. The 8-bit edge layers are ``conv1`` and
``head``. No dropout: the models here are deterministic functions of their
variables.

The ImageNet variant pools to 7x7 and has 4096-wide fully connected layers
(138M parameters, 15.5 GMACs at 224x224); the CIFAR variant (32 px, 1x1 after
the last pool) uses 512-wide ones, as is usual on CIFAR. Names are the same,
so a policy searched on one applies to the other.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from asga_jax.models.common import Stem, batch_norm, check_stem
from asga_jax.quant import QuantConv, QuantDense, QuantSpec

# Output channels of the 13 convolutions in units of ``width`` (64); 'M' pools.
VGG16_LAYOUT = (1, 1, 'M', 2, 2, 'M', 4, 4, 4, 'M', 8, 8, 8, 'M', 8, 8, 8, 'M')


class VGG(nn.Module):
  """VGG with BatchNorm.

  Attributes:
    num_classes: classifier outputs.
    width: channels of the first convolution (64).
    stem: 'cifar' (512-wide classifier on 1x1 features) or 'imagenet'
      (7x7 average pool, 4096-wide classifier).
    quant: quantization; ``conv1`` and ``head`` are 8-bit edge layers.
    dtype: computation dtype.
    layout: channel multipliers and pools (default VGG16).
  """
  num_classes: int
  width: int = 64
  stem: Stem = 'cifar'
  quant: QuantSpec = QuantSpec()
  dtype: Any = jnp.float32
  layout: tuple[Any, ...] = VGG16_LAYOUT

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    check_stem(self.stem)
    conv = functools.partial(QuantConv, kernel_size=(3, 3), padding=1, quant=self.quant,
                             dtype=self.dtype)
    index = 0
    for item in self.layout:
      if item == 'M':
        if min(x.shape[1:3]) < 2:
          raise ValueError(f'VGG pools five times: inputs need at least 32x32 pixels, got '
                           f'{self.layout.count("M")} pools on a {x.shape[1]}x{x.shape[2]} map.')
        x = nn.max_pool(x, (2, 2), (2, 2))
        continue
      index += 1
      x = conv(self.width * item, edge=index == 1, signed_input=index == 1,
               name=f'conv{index}')(x)
      x = nn.relu(batch_norm(train, self.dtype, f'bn{index}')(x))
    if self.stem == 'imagenet':
      x = adaptive_average_pool(x, 7)
      hidden = self.width * 64
    else:
      hidden = self.width * 8
    x = x.reshape(x.shape[0], -1)
    dense = functools.partial(QuantDense, quant=self.quant, dtype=self.dtype)
    x = nn.relu(dense(hidden, name='fc1')(x))
    x = nn.relu(dense(hidden, name='fc2')(x))
    x = dense(self.num_classes, edge=True, name='head')(x)
    return x.astype(jnp.float32)


def _pool_matrix(size_in: int, size_out: int) -> np.ndarray:
  """(size_out, size_in) averaging weights of PyTorch's adaptive average pooling."""
  m = np.zeros((size_out, size_in), np.float32)
  for i in range(size_out):
    start, end = (i * size_in) // size_out, -(-((i + 1) * size_in) // size_out)
    m[i, start:end] = 1.0 / (end - start)
  return m


def adaptive_average_pool(x: jax.Array, size: int) -> jax.Array:
  """Average-pools (N, H, W, C) to (N, size, size, C) as torch's AdaptiveAvgPool2d."""
  rows, cols = _pool_matrix(x.shape[1], size), _pool_matrix(x.shape[2], size)
  return jnp.einsum('ih,jw,nhwc->nijc', rows, cols, x).astype(x.dtype)


def vgg16(num_classes: int, *, stem: Stem = 'cifar', quant: QuantSpec = QuantSpec(),
          width: int = 64, dtype: Any = jnp.float32) -> VGG:
  """VGG16-BN: 138M parameters and 15.5 GMACs at 224x224 (ImageNet stem)."""
  return VGG(num_classes, width, stem, quant, dtype)
