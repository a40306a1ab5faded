"""Quantized Conv and Dense layers: full precision, supernet or fixed policy.

Each layer reads its mode and bits from a :class:`QuantSpec` and its own module
path, so one model definition serves every mode with the same parameter names:

=============  ==========================================================
parameter      meaning
=============  ==========================================================
kernel, bias   the layer's weights (every mode)
w_clip, a_clip SAQ clipping levels (quantized modes, ``quantizer='clip'``)
w_step, a_step LSQ step sizes (quantized modes, ``quantizer='lsq'``; one
               per candidate in supernet mode)
w_logits,      architecture logits over the weight / activation bit
a_logits       candidates (supernet mode only; see optim.partition)
=============  ==========================================================

:class:`QuantMatmul` quantizes both operands of an activation product
(attention), with the activation quantizer and the same parameter names.

Supernet mode follows EdMIPS' composite convolution: the weights are mixed as
sum_j softmax(w_logits)_j Q_{b_j}(w), the input as sum_k softmax(a_logits)_k
Q_{b_k}(x), and ONE convolution runs on the two mixtures.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from asga_jax import onednn
from asga_jax.quant import quantizers
from asga_jax.quant.spec import QuantSpec, Resolved

ARCH_LOGITS = ('w_logits', 'a_logits')
QUANT_PARAMS = ('w_clip', 'a_clip', 'w_step', 'a_step')
# Variable collection of additive perturbations of the quantized weights (the
# hook of SAQ-style sharpness-aware training): one 'kernel' entry per layer,
# created as zeros by `init`; applied only when passed to `apply`.
PERTURB = 'perturb'

# He-normal (fan_out), as torchvision initializes ResNet convolutions.
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def layer_path(module: nn.Module) -> str:
  """The '/'-joined module path that names a layer in policies and reports.

  A layer used on its own (not inside a model) is named by its ``name``.
  """
  return '/'.join(module.path) or (module.name or '')


def _probs(module: nn.Module, name: str, bits: tuple[int, ...] | None) -> jax.Array | None:
  """Softmax over the bit candidates (supernet), or None for one bit width."""
  if bits is None or len(bits) == 1:
    return None
  logits = module.param(name, nn.initializers.zeros_init(), (len(bits),), jnp.float32)
  return jax.nn.softmax(logits)


def _lsq_step(module: nn.Module, name: str, x: jax.Array, bits: tuple[int, ...],
              signed: bool) -> jax.Array:
  shape = () if len(bits) == 1 else (len(bits),)
  init = lambda _: jnp.stack([quantizers.lsq_init_step(x, b, signed) for b in bits]
                             ).reshape(shape).astype(jnp.float32)
  return module.param(name, init)


def _weight_perturbation(module: nn.Module, kernel: jax.Array) -> jax.Array | None:
  """The layer's entry of the ``perturb`` collection, if one was passed."""
  if module.is_initializing() or module.has_variable(PERTURB, 'kernel'):
    return module.variable(PERTURB, 'kernel', jnp.zeros, kernel.shape, jnp.float32).value
  return None


def _quantize_activation(module: nn.Module, x: jax.Array, bits: tuple[int, ...],
                         probs: jax.Array | None, spec: QuantSpec, signed: bool,
                         prefix: str) -> jax.Array:
  """Quantizes an activation with the spec's quantizer; params ``{prefix}_clip/_step``."""
  if spec.quantizer == 'lsq':
    step = _lsq_step(module, f'{prefix}_step', x, bits, signed)
    return quantizers.quantize_lsq(x, step, bits, signed, probs)
  clip = module.param(f'{prefix}_clip', nn.initializers.constant(spec.a_clip_init), (),
                      jnp.float32)
  quantize = quantizers.quantize_signed if signed else quantizers.quantize_unsigned
  return quantize(x, jnp.abs(clip), bits, probs)


def quantize_operands(module: nn.Module, x: jax.Array, kernel: jax.Array,
                      q: Resolved, spec: QuantSpec, signed_input: bool
                      ) -> tuple[jax.Array, jax.Array]:
  """Quantizes (input, kernel) of a layer as ``q`` says, creating its params.

  A ``perturb`` entry is added to the quantized kernel: in the normalized
  domain for the clipping quantizer, in the kernel's own scale otherwise.
  """
  w_probs = _probs(module, 'w_logits', q.w_bits)
  a_probs = _probs(module, 'a_logits', q.a_bits)
  perturbation = _weight_perturbation(module, kernel)
  if q.w_bits is not None:
    if spec.quantizer == 'lsq':
      step = _lsq_step(module, 'w_step', kernel, q.w_bits, signed=True)
      kernel = quantizers.quantize_lsq(kernel, step, q.w_bits, True, w_probs)
    else:
      clip = module.param('w_clip', nn.initializers.constant(spec.w_clip_init), (), jnp.float32)
      kernel = quantizers.quantize_weight(kernel, jnp.abs(clip), q.w_bits, w_probs, perturbation)
      perturbation = None  # applied inside the quantizer
  if q.a_bits is not None:
    x = _quantize_activation(module, x, q.a_bits, a_probs, spec, signed_input, 'a')
  if perturbation is not None:
    kernel = kernel + perturbation
  return x, kernel


def stored_once(x: jax.Array) -> jax.Array:
  """``x`` unchanged, but computed once into memory instead of inside each consumer.

  A convolution's input feeds the forward convolution and, transposed, the
  weight gradient. XLA:CPU fuses cheap elementwise producers into every
  consumer, so that transpose recomputes the whole BatchNorm/ReLU/residual
  chain (or the quantizer) element by element, in a strided loop about 8x
  slower than its tiled transpose of a stored array. Storing it made the
  ResNet-20 steps 9-29% faster on CPU (README, Performance). The oneDNN
  convolutions (custom calls, whose operands XLA stores anyway) do not need it.
  Division is one of the operations XLA does not duplicate; dividing by ones
  it cannot see through (an optimization barrier) keeps ``x`` exact (x / 1 is
  x in IEEE arithmetic) and stores it. The division costs one fused
  elementwise pass, far less than the recomputation (measured in
  ``benchmarks/results/``).
  """
  return x / jax.lax.optimization_barrier(jnp.ones_like(x))


class QuantConv(nn.Module):
  """2-D convolution (NHWC) with quantized weights and input.

  Attributes:
    features: output channels.
    kernel_size: (height, width).
    strides: (height, width) strides.
    padding: 'SAME', 'VALID', an int (symmetric) or explicit pairs.
    feature_group_count: groups; ``in_channels`` for a depthwise convolution.
    use_bias: add a bias.
    quant: the model's quantization spec.
    edge: first or last layer of the network (bits fixed by
      ``quant.edge_bits``, never searched).
    signed_input: the input can be negative (e.g. the normalized image); ReLU
      outputs are not.
    dtype: computation dtype (quantization runs in float32 first).
  """
  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: Sequence[int] = (1, 1)
  padding: Any = 'SAME'
  feature_group_count: int = 1
  use_bias: bool = False
  quant: QuantSpec = QuantSpec()
  edge: bool = False
  signed_input: bool = False
  dtype: Any = jnp.float32

  def fan_in(self, in_features: int) -> int:
    kh, kw = self.kernel_size
    return kh * kw * in_features // self.feature_group_count

  def num_weights(self, in_features: int) -> int:
    return self.fan_in(in_features) * self.features + (self.features if self.use_bias else 0)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cin = x.shape[-1]
    if cin % self.feature_group_count:
      raise ValueError(f'{layer_path(self)}: {cin} input channels are not divisible by '
                       f'{self.feature_group_count} groups.')
    kernel = self.param('kernel', conv_kernel_init,
                        (*self.kernel_size, cin // self.feature_group_count, self.features),
                        jnp.float32)
    q = self.quant.resolve(layer_path(self), self.edge)
    x, kernel = quantize_operands(self, x, kernel, q, self.quant, self.signed_input)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    padding = onednn.explicit_padding(x.shape, kernel.shape, self.strides, self.padding)
    if onednn.supported(x, kernel, padding, self.feature_group_count):
      y = onednn.conv2d(x, kernel, self.strides, padding)
    else:
      y = jax.lax.conv_general_dilated(
          stored_once(x), kernel, window_strides=tuple(self.strides),
          padding=onednn.conv.pairs(padding), dimension_numbers=onednn.DIMENSION_NUMBERS,
          feature_group_count=self.feature_group_count)
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros_init(), (self.features,),
                         jnp.float32).astype(self.dtype)
    return y


class QuantDense(nn.Module):
  """Dense layer (on the last axis) with quantized weights and input.

  Attributes: as :class:`QuantConv` (``features``, ``use_bias``, ``quant``,
  ``edge``, ``signed_input``, ``dtype``) plus ``kernel_init``.
  """
  features: int
  use_bias: bool = True
  quant: QuantSpec = QuantSpec()
  edge: bool = False
  signed_input: bool = False
  kernel_init: Any = nn.initializers.lecun_normal()
  dtype: Any = jnp.float32

  def fan_in(self, in_features: int) -> int:
    return in_features

  def num_weights(self, in_features: int) -> int:
    return in_features * self.features + (self.features if self.use_bias else 0)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', self.kernel_init, (x.shape[-1], self.features), jnp.float32)
    q = self.quant.resolve(layer_path(self), self.edge)
    x, kernel = quantize_operands(self, x, kernel, q, self.quant, self.signed_input)
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros_init(), (self.features,),
                         jnp.float32).astype(self.dtype)
    return y


class QuantMatmul(nn.Module):
  """Product of two activations, ``lhs @ rhs`` over the last/second-to-last axes.

  Attention's Q K^T and A V: both operands are activations, so both use the
  activation quantizer. For bits, policies and BOPs, ``lhs`` plays the input
  (``a_*`` parameters) and ``rhs`` the weights (``w_*`` parameters); the layer
  has no weights of its own and nothing to perturb.

  Attributes:
    quant: the model's quantization spec.
    lhs_signed, rhs_signed: whether each operand can be negative (attention
      probabilities cannot).
    edge: as :class:`QuantConv`.
    dtype: computation dtype.
  """
  quant: QuantSpec = QuantSpec()
  lhs_signed: bool = True
  rhs_signed: bool = True
  edge: bool = False
  dtype: Any = jnp.float32

  def fan_in(self, in_features: int) -> int:
    return in_features

  def num_weights(self, in_features: int) -> int:
    del in_features
    return 0

  @nn.compact
  def __call__(self, lhs: jax.Array, rhs: jax.Array) -> jax.Array:
    q = self.quant.resolve(layer_path(self), self.edge)
    if q.a_bits is not None:
      lhs = _quantize_activation(self, lhs, q.a_bits, _probs(self, 'a_logits', q.a_bits),
                                 self.quant, self.lhs_signed, 'a')
    if q.w_bits is not None:
      rhs = _quantize_activation(self, rhs, q.w_bits, _probs(self, 'w_logits', q.w_bits),
                                 self.quant, self.rhs_signed, 'w')
    return jnp.matmul(lhs.astype(self.dtype), rhs.astype(self.dtype))


QUANT_LAYERS = (QuantConv, QuantDense, QuantMatmul)
