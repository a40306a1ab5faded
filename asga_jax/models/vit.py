"""Vision Transformers (Dosovitskiy et al., 2021) built from quantized layers.

Every matrix product is quantized: the Dense layers ``query``, ``key``,
``value``, ``out`` (attention) and ``fc1``, ``fc2`` (MLP) of each
``block{i}``, and the two activation products of attention, ``qk`` (Q K^T)
and ``av`` (softmax(Q K^T) V), as :class:`asga_jax.quant.QuantMatmul`. The
8-bit edge layers are ``patch_embed`` and ``head``. The configs quantize ViTs
with the LSQ quantizer (``quant.quantizer='lsq'``), as SAQ does.

The CIFAR variant (32 px) uses 4x4 patches (64 tokens) instead of 16x16
patches at 224 px (196 tokens); only the 8-bit patch embedding and the
position embedding change shape, so a policy searched on one applies to the
other.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from asga_jax.models.common import Stem, check_stem
from asga_jax.quant import QuantConv, QuantDense, QuantMatmul, QuantSpec

PATCH_SIZE = {'cifar': 4, 'imagenet': 16}


class Attention(nn.Module):
  """Multi-head self-attention with quantized projections and products."""
  num_heads: int
  quant: QuantSpec
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n, t, d = x.shape
    if d % self.num_heads:
      raise ValueError(f'hidden size {d} is not divisible by {self.num_heads} heads.')
    dense = functools.partial(QuantDense, quant=self.quant, signed_input=True, dtype=self.dtype)
    heads = lambda y: y.reshape(n, t, self.num_heads, d // self.num_heads).transpose(0, 2, 1, 3)
    q = heads(dense(d, name='query')(x)) * (d // self.num_heads) ** -0.5
    k = heads(dense(d, name='key')(x))
    v = heads(dense(d, name='value')(x))
    logits = QuantMatmul(self.quant, dtype=self.dtype, name='qk')(q, k.transpose(0, 1, 3, 2))
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    y = QuantMatmul(self.quant, lhs_signed=False, dtype=self.dtype, name='av')(probs, v)
    y = y.transpose(0, 2, 1, 3).reshape(n, t, d)
    return dense(d, name='out')(y)


class EncoderBlock(nn.Module):
  """Pre-norm transformer block: x + attention(LN(x)), then x + MLP(LN(x))."""
  num_heads: int
  mlp_dim: int
  quant: QuantSpec
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = functools.partial(QuantDense, quant=self.quant, signed_input=True, dtype=self.dtype)
    x = x + Attention(self.num_heads, self.quant, self.dtype, name='attn')(
        nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name='ln1')(x))
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name='ln2')(x)
    y = nn.gelu(dense(self.mlp_dim, name='fc1')(y), approximate=False)
    return x + dense(x.shape[-1], name='fc2')(y)  # GELU can be negative: signed


class ViT(nn.Module):
  """Vision Transformer with a class token.

  Attributes:
    num_classes: classifier outputs.
    hidden: token width (384 for ViT-S, 768 for ViT-B).
    depth: encoder blocks (12).
    num_heads: attention heads (6 for ViT-S, 12 for ViT-B).
    mlp_dim: MLP width (4 x hidden).
    stem: 'cifar' (4x4 patches) or 'imagenet' (16x16 patches).
    quant: quantization; ``patch_embed`` and ``head`` are 8-bit edge layers.
    dtype: computation dtype.
  """
  num_classes: int
  hidden: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  stem: Stem = 'imagenet'
  quant: QuantSpec = QuantSpec()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train  # no BatchNorm or dropout
    check_stem(self.stem)
    p = PATCH_SIZE[self.stem]
    if x.shape[1] % p or x.shape[2] % p:
      raise ValueError(f'image size {x.shape[1]}x{x.shape[2]} is not a multiple of the '
                       f'{p}x{p} patches of the {self.stem!r} ViT.')
    x = QuantConv(self.hidden, (p, p), (p, p), padding='VALID', use_bias=True, quant=self.quant,
                  edge=True, signed_input=True, dtype=self.dtype, name='patch_embed')(x)
    n, h, w, d = x.shape
    x = x.reshape(n, h * w, d)
    cls = self.param('cls_token', nn.initializers.zeros_init(), (1, 1, d), jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, d)).astype(x.dtype), x], axis=1)
    pos = self.param('pos_embed', nn.initializers.normal(0.02), (1, h * w + 1, d), jnp.float32)
    x = x + pos.astype(x.dtype)
    for i in range(self.depth):
      x = EncoderBlock(self.num_heads, self.mlp_dim, self.quant, self.dtype,
                       name=f'block{i}')(x)
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name='norm')(x)
    x = QuantDense(self.num_classes, quant=self.quant, edge=True, signed_input=True,
                   dtype=self.dtype, name='head')(x[:, 0])
    return x.astype(jnp.float32)


def _vit(name: str, hidden: int, num_heads: int, doc: str):
  def build(num_classes: int, *, stem: Stem = 'imagenet', quant: QuantSpec = QuantSpec(),
            width: int | None = None, depth: int = 12, dtype: Any = jnp.float32) -> ViT:
    d = width or hidden
    heads = num_heads if width is None else max(1, num_heads * width // hidden)
    return ViT(num_classes, d, depth, heads, 4 * d, stem, quant, dtype)
  build.__name__ = build.__qualname__ = name
  build.__doc__ = (doc + ' ``width`` overrides the token width (heads scale with it), '
                   '``depth`` the number of blocks.')
  return build


vit_s16 = _vit('vit_s16', 384, 6, 'ViT-S/16: 22M parameters, 4.6 GMACs at 224x224.')
vit_b16 = _vit('vit_b16', 768, 12, 'ViT-B/16: 86.6M parameters, 17.6 GMACs at 224x224.')
