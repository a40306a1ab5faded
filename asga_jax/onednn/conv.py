"""2-D convolution on oneDNN for XLA:CPU, as JAX primitives with full autodiff.

XLA:CPU's own (Eigen) convolutions, and its kernel gradients most, are 2-3x
slower than oneDNN's on the small-channel convolutions of CIFAR ResNets, and
no XLA flag changes that (README, Performance). :func:`conv2d` runs them on
oneDNN instead, through three XLA FFI custom calls (``conv.cc``): the forward
convolution, its input gradient and its kernel gradient.

Each is a JAX primitive, bilinear in its two operands, whose transposes are
the other two (as ``lax.conv_general_dilated``'s are convolutions again), so
``grad``, ``jvp`` and their compositions (Hessian-vector products) all run
on oneDNN. Under ``vmap`` a batch of inputs folds into the example axis;
a batch of kernels runs one convolution per kernel (``lax.map``). Off the
CPU, or where :func:`supported` says no, :func:`conv2d` is
``lax.conv_general_dilated``; each primitive also lowers to it on other
platforms.

Example:
  >>> y = conv2d(x, kernel, strides=(1, 1), padding='SAME')   # NHWC, HWIO
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from asga_jax.onednn import build

DIMENSION_NUMBERS = ('NHWC', 'HWIO', 'NHWC')
OPT_OUT = 'ASGA_ONEDNN'  # '0' turns the oneDNN convolutions off

Padding = tuple[int, int, int, int]  # top, bottom, left, right


def pairs(padding: Padding) -> tuple[tuple[int, int], tuple[int, int]]:
  return (padding[0], padding[1]), (padding[2], padding[3])


def _output_shape(input_shape, kernel_shape, strides, padding) -> tuple[int, ...]:
  n, h, w, _ = input_shape
  kh, kw, _, features = kernel_shape
  return (n, (h + padding[0] + padding[1] - kh) // strides[0] + 1,
          (w + padding[2] + padding[3] - kw) // strides[1] + 1, features)


# XLA's convolutions: the reference, and the lowering off the CPU.
def _xla_forward(x, kernel, *, strides, padding):
  return lax.conv_general_dilated(x, kernel, strides, pairs(padding),
                                  dimension_numbers=DIMENSION_NUMBERS)


def _xla_backward_data(dy, kernel, *, strides, padding, input_shape):
  transpose = jax.linear_transpose(
      lambda x: _xla_forward(x, kernel, strides=strides, padding=padding),
      jax.ShapeDtypeStruct(input_shape, dy.dtype))
  return transpose(dy)[0]


def _xla_backward_weights(x, dy, *, strides, padding, kernel_shape):
  transpose = jax.linear_transpose(
      lambda k: _xla_forward(x, k, strides=strides, padding=padding),
      jax.ShapeDtypeStruct(kernel_shape, x.dtype))
  return transpose(dy)[0]


forward_p = Primitive('asga_onednn_conv_forward')                  # (x, kernel) -> y
backward_data_p = Primitive('asga_onednn_conv_backward_data')      # (dy, kernel) -> dx
backward_weights_p = Primitive('asga_onednn_conv_backward_weights')  # (x, dy) -> dkernel

forward_p.def_abstract_eval(lambda x, kernel, *, strides, padding: jax.core.ShapedArray(
    _output_shape(x.shape, kernel.shape, strides, padding), x.dtype))
backward_data_p.def_abstract_eval(
    lambda dy, kernel, *, strides, padding, input_shape: jax.core.ShapedArray(input_shape,
                                                                              dy.dtype))
backward_weights_p.def_abstract_eval(
    lambda x, dy, *, strides, padding, kernel_shape: jax.core.ShapedArray(kernel_shape,
                                                                          x.dtype))


def _cpu_lowering(target: str, reference):
  rule = jax.ffi.ffi_lowering(target)
  fallback = mlir.lower_fun(reference, multiple_results=False)

  def lower(ctx, *operands, strides, padding, **shape):
    if not build.load():  # logged there; XLA's convolution gives the same result
      return fallback(ctx, *operands, strides=strides, padding=padding, **shape)
    return rule(ctx, *operands, strides=np.asarray(strides, np.int64),
                padding=np.asarray(padding, np.int64))
  return lower


@functools.cache
def _compiled_bind(primitive: Primitive, **params):
  return jax.jit(functools.partial(primitive.bind, **params))


def _eager(primitive: Primitive):
  """Outside jit: one compiled program per primitive and geometry, as jit would."""
  return lambda *args, **params: _compiled_bind(primitive, **params)(*args)


for _primitive, _reference in ((forward_p, _xla_forward),
                               (backward_data_p, _xla_backward_data),
                               (backward_weights_p, _xla_backward_weights)):
  _primitive.def_impl(_eager(_primitive))
  mlir.register_lowering(_primitive, mlir.lower_fun(_reference, multiple_results=False))
  mlir.register_lowering(_primitive, _cpu_lowering(_primitive.name, _reference),
                         platform='cpu')


# Transposes. With y = conv(x, k): <y', conv(x, k)> = <dgrad(y', k), x> = <wgrad(x, y'), k>.
ad.defbilinear(
    forward_p,
    lambda ct, x, kernel, **p: backward_data_p.bind(ct, kernel, input_shape=x.aval.shape, **p),
    lambda ct, x, kernel, **p: backward_weights_p.bind(x, ct, kernel_shape=kernel.aval.shape,
                                                       **p))
ad.defbilinear(
    backward_data_p,
    lambda ct, dy, kernel, *, input_shape, **p: forward_p.bind(ct, kernel, **p),
    lambda ct, dy, kernel, *, input_shape, **p: backward_weights_p.bind(
        ct, dy, kernel_shape=kernel.aval.shape, **p))
ad.defbilinear(
    backward_weights_p,
    lambda ct, x, dy, *, kernel_shape, **p: backward_data_p.bind(dy, ct,
                                                                 input_shape=x.aval.shape, **p),
    lambda ct, x, dy, *, kernel_shape, **p: forward_p.bind(x, ct, **p))


def _batch_rule(primitive: Primitive):
  """vmap: fold a batch of inputs into the example axis, else map over the batch."""

  def rule(args, dims, **params):
    if primitive is not backward_weights_p and dims[1] is None:
      # forward / input gradient with one kernel: the batch joins the example axis.
      a = jnp.moveaxis(args[0], dims[0], 0)
      size = a.shape[0]
      if primitive is backward_data_p:
        params = dict(params, input_shape=(size * params['input_shape'][0],
                                           *params['input_shape'][1:]))
      out = primitive.bind(a.reshape(-1, *a.shape[2:]), args[1], **params)
      return out.reshape(size, -1, *out.shape[1:]), 0
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    mapped = [None if d is None else jnp.moveaxis(a, d, 0)
              for a, d in zip(args, dims)]

    def one(xs):
      operands = [a if m is None else x for a, m, x in zip(args, mapped, xs)]
      return primitive.bind(*operands, **params)
    return lax.map(one, [jnp.zeros((size,)) if m is None else m for m in mapped]), 0
  return rule


for _primitive in (forward_p, backward_data_p, backward_weights_p):
  batching.primitive_batchers[_primitive] = _batch_rule(_primitive)


def explicit_padding(input_shape: Sequence[int], kernel_shape: Sequence[int],
                     strides: Sequence[int], padding: Any) -> Padding:
  """(top, bottom, left, right) for 'SAME', 'VALID', an int, ((t, b), (l, r)) or itself."""
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(tuple(input_shape[1:3]), tuple(kernel_shape[:2]),
                                  tuple(strides), padding)
  elif isinstance(padding, int):
    padding = [(padding, padding)] * 2
  elif len(padding) == 4:
    return tuple(int(p) for p in padding)
  (top, bottom), (left, right) = padding
  return int(top), int(bottom), int(left), int(right)


def enabled() -> bool:
  """oneDNN convolutions are on: CPU backend, one device, not opted out, built."""
  return (os.environ.get(OPT_OUT, '1') != '0' and jax.default_backend() == 'cpu'
          and jax.device_count() == 1 and build.load())


def supported(x: jax.Array, kernel: jax.Array, padding: Padding,
              feature_group_count: int = 1) -> bool:
  """Whether :func:`conv2d` runs this convolution on oneDNN (else on XLA).

  oneDNN runs float32 NHWC convolutions without groups or negative padding
  on one CPU device. Several devices keep XLA's convolutions, which the SPMD
  partitioner can split (a custom call it cannot).
  """
  return (x.ndim == 4 and kernel.ndim == 4 and feature_group_count == 1
          and x.dtype == jnp.float32 and kernel.dtype == jnp.float32
          and min(padding) >= 0 and enabled())


def conv2d(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1),
           padding: Any = 'SAME') -> jax.Array:
  """NHWC x HWIO -> NHWC convolution on oneDNN when lowered for the CPU.

  Where the kernels could not be built, and on other platforms, it lowers to
  XLA's convolution. Layers call it only where :func:`supported` says so.

  Args:
    x: input, (batch, height, width, in_channels), float32.
    kernel: (kh, kw, in_channels, out_channels), float32.
    strides: (height, width) strides.
    padding: 'SAME', 'VALID', an int or ((top, bottom), (left, right)).

  Returns:
    ``lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=
    ('NHWC', 'HWIO', 'NHWC'))``, to float32 round-off.
  """
  pads = explicit_padding(x.shape, kernel.shape, strides, padding)
  return forward_p.bind(x, kernel, strides=tuple(int(s) for s in strides), padding=pads)
