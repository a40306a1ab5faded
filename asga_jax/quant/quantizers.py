"""Uniform quantizers with straight-through estimators (pure functions).

Two families:

* The learnable-clipping quantizer of SAQ (Liu et al., eq. 1-3): a tensor is
  clipped by a learnable level ``alpha``, mapped to [0, 1], rounded with step
  ``1 / (2**bits - 1)`` and mapped back. Rounding uses the straight-through
  estimator (d round(z) / dz = 1); clipping and the divisions by ``alpha`` are
  differentiated exactly, which gives ``alpha`` the PACT/SAQ gradient (see
  :func:`quantize_unsigned` and :func:`quantize_signed`).
* LSQ (Esser et al., 2020): a learned step size with its gradient scaled by
  ``1 / sqrt(numel * q_max)``.

``bits=None`` (or 32) means full precision: the input is returned unchanged.
The functions take a sequence of bit widths for the mixed-precision supernet,
where one shared clipping computation feeds every candidate (one clip, one
division, then one rounding per candidate), and a hand-written backward pass
reads the input once for all candidates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

FULL_PRECISION_BITS = 32
# Added to the weight standard deviation so that an all-zero tensor quantizes
# to zeros instead of NaN.
NORM_EPS = 1e-8


def is_full_precision(bits: int | None) -> bool:
  """True when ``bits`` asks for no quantization (None or 32)."""
  return bits is None or bits >= FULL_PRECISION_BITS


@jax.custom_jvp
def round_ste(x: jax.Array) -> jax.Array:
  """Rounds to the nearest integer; the derivative is the identity (STE).

  A custom JVP rather than ``x + stop_gradient(round(x) - x)``: the value is
  exactly ``round(x)`` and XLA computes nothing more than the rounding.
  """
  return jnp.round(x)


# The rule's value is round_ste itself, so that higher derivatives stay STE.
round_ste.defjvp(lambda primals, tangents: (round_ste(primals[0]), tangents[0]))


def _levels(bits: int) -> float:
  return float(2**bits - 1)


def _rounded(unit: jax.Array, bits: int) -> jax.Array:
  """D(unit, 1/(2**bits - 1)): ``unit`` rounded to a multiple of the step (STE)."""
  return round_ste(unit * _levels(bits)) / _levels(bits)


def _mix(rounded: list[jax.Array], probs: jax.Array | None) -> jax.Array:
  """sum_j probs_j * rounded_j (the one tensor when there are no probabilities)."""
  if probs is None:
    if len(rounded) != 1:
      raise ValueError(f'{len(rounded)} bit widths need mixing probabilities.')
    return rounded[0]
  out = jnp.zeros_like(rounded[0])
  for p, r in zip(probs, rounded):
    out = out + p.astype(r.dtype) * r
  return out


# Q(x) = alpha * (s * M(u) - o), u = clip(x / alpha) mapped to [0, 1], M the
# (mixed) rounding: (s, o, u range) = (1, 0, [0, 1]) unsigned, (2, 1, [-1, 1])
# signed. The backward pass is written by hand: autodiff of the mixture made
# one pass over the activation per candidate and per parameter; here dQ/dx is
# one elementwise pass and the gradients of alpha and of every probability are
# one variadic reduction (XLA bytes accessed of the ResNet-20 supernet step:
# 7.44 -> 4.05 GB, `python -m benchmarks.run`).
def _clip_unit(x: jax.Array, alpha: jax.Array, signed: bool) -> tuple[jax.Array, jax.Array]:
  """(x / alpha, its clipped value mapped to [0, 1])."""
  t = x / alpha
  if signed:
    return t, (jnp.clip(t, -1.0, 1.0) + 1.0) * 0.5
  return t, jnp.clip(t, 0.0, 1.0)


def _clip_quantize_value(x: jax.Array, alpha: jax.Array, probs: jax.Array | None,
                         bits: tuple[int, ...], signed: bool) -> jax.Array:
  _, unit = _clip_unit(x, alpha, signed)
  mixed = _mix([_rounded(unit, b) for b in bits], probs)
  return alpha * (2.0 * mixed - 1.0) if signed else alpha * mixed


_clip_quantize = jax.custom_vjp(_clip_quantize_value, nondiff_argnums=(3, 4))


def _clip_quantize_fwd(x, alpha, probs, bits, signed):
  # The plain value, not _clip_quantize: forward-over-reverse (Hessian-vector
  # products) differentiates this rule and the backward one with jvp.
  return _clip_quantize_value(x, alpha, probs, bits, signed), (x, alpha, probs)


@jax.custom_jvp
def _sum_all(*terms: jax.Array) -> tuple[jax.Array, ...]:
  """The sums of same-shaped arrays, as ONE variadic reduction (one pass on CPU)."""
  return jax.lax.reduce(terms, (jnp.zeros((), terms[0].dtype),) * len(terms),
                        lambda a, b: tuple(u + v for u, v in zip(a, b)),
                        tuple(range(terms[0].ndim)))


# JAX's own jvp of a variadic reduction fails on symbolic-zero tangents; a sum
# is linear, so its tangents are the tangents' sums (used by Hessian-vector
# products, which differentiate the backward pass below).
_sum_all.defjvp(lambda primals, tangents: (_sum_all(*primals),
                                           tuple(jnp.sum(t) for t in tangents)))


def _clip_quantize_bwd(bits, signed, residuals, g):
  x, alpha, probs = residuals
  t, unit = _clip_unit(x, alpha, signed)
  inside = (t > -1.0 if signed else t > 0.0) & (t < 1.0)
  total = 1.0 if probs is None else jnp.sum(probs).astype(x.dtype)  # dM/du under the STE
  s, o = (2.0, 1.0) if signed else (1.0, 0.0)
  dx = jnp.where(inside, g * total, 0.0)
  # dQ/dalpha = s M(u) - o - total * t inside the range (exactly s M(u) - o outside),
  # summed as two terms: a reduction of one operand goes to XLA:CPU's YNN
  # library, which cannot fuse the elementwise producers.
  # The STE rounding here too keeps second derivatives (Hessian-vector
  # products through this rule) equal to autodiff's of the STE quantizer.
  rounded = [_rounded(unit, b) for b in bits]
  terms = [g * (s * _mix(rounded, probs) - o), jnp.where(inside, g * t, 0.0)]
  if probs is not None:  # dQ/dp_j = alpha * s * D_j(u)
    terms += [g * r for r in rounded]
  sums = _sum_all(*terms)
  dalpha = jnp.reshape(sums[0] - total * sums[1], jnp.shape(alpha)).astype(alpha.dtype)
  dprobs = None if probs is None else (alpha * s * jnp.stack(sums[2:])).astype(probs.dtype)
  return dx, dalpha, dprobs


_clip_quantize.defvjp(_clip_quantize_fwd, _clip_quantize_bwd)


def _bits_tuple(bits: int | Sequence[int]) -> tuple[int, ...]:
  return (bits,) if isinstance(bits, int) else tuple(bits)


def quantize_unsigned(x: jax.Array, alpha: jax.Array, bits: int | Sequence[int],
                      probs: jax.Array | None = None) -> jax.Array:
  """Unsigned clipping quantizer for non-negative inputs (after ReLU).

  Q(x) = alpha * D(clip(x / alpha, 0, 1)), D rounding to multiples of
  1/(2**b - 1). Gradients (STE on rounding): dQ/dx = 1 inside (0, alpha) and 0
  outside; dQ/dalpha = D(x/alpha) - x/alpha inside, 1 above alpha, 0 below 0.
  In supernet mode dQ/dp_j = alpha * D_j(x/alpha).

  Args:
    x: input tensor.
    alpha: positive clipping level (scalar).
    bits: a bit width, or candidate bit widths when ``probs`` is given.
    probs: mixing probabilities over ``bits`` (supernet mode), or None.

  Returns:
    The quantized tensor (the probability-weighted mixture in supernet mode).
  """
  return _clip_quantize(x, jnp.asarray(alpha, x.dtype), probs, _bits_tuple(bits), False)


def quantize_signed(x: jax.Array, alpha: jax.Array, bits: int | Sequence[int],
                    probs: jax.Array | None = None) -> jax.Array:
  """Signed clipping quantizer (SAQ eq. 1-2 for weights).

  u = (clip(x / alpha, -1, 1) + 1) / 2 in [0, 1], Q(x) = alpha * (2 D(u) - 1).
  Gradients (STE on rounding): dQ/dx = 1 inside (-alpha, alpha), 0 outside;
  dQ/dalpha = (2 D(u) - 1) - x / alpha inside, sign(x) outside.

  Args:
    x: input tensor.
    alpha: positive clipping level (scalar).
    bits: a bit width, or candidate bit widths when ``probs`` is given.
    probs: mixing probabilities over ``bits`` (supernet mode), or None.

  Returns:
    The quantized tensor. Since the probabilities sum to one, the mixture of
    alpha * (2 D_j(u) - 1) equals alpha * (2 sum_j p_j D_j(u) - 1).
  """
  return _clip_quantize(x, jnp.asarray(alpha, x.dtype), probs, _bits_tuple(bits), True)


def quantize_weight(w: jax.Array, alpha: jax.Array, bits: int | Sequence[int],
                    probs: jax.Array | None = None,
                    perturbation: jax.Array | None = None) -> jax.Array:
  """Normalized weight quantizer: standardize, clip-quantize, de-standardize.

  The weights are standardized with their (gradient-stopped) mean and standard
  deviation, quantized with :func:`quantize_signed` (so ``alpha`` is in units
  of standard deviations and is scale-free, as in SAQ's code), then mapped
  back with the same statistics. The last step keeps the layer's output scale
  equal to the full-precision one, so a pretrained model loads unchanged
  (without it, a layer not followed by BatchNorm, such as the classifier,
  would change its logits by 1/std).

  Args:
    w: weight tensor.
    alpha: clipping level in standard deviations.
    bits: a bit width, or candidates when ``probs`` is given.
    probs: supernet mixing probabilities, or None.
    perturbation: added to the quantized weights in the normalized domain,
      before mapping back (SAQ's perturbation of Q_w(w), so that SAQ's radii
      keep their meaning); None adds nothing.

  Returns:
    Quantized weights with the shape and scale of ``w``.
  """
  mean = jax.lax.stop_gradient(jnp.mean(w))
  scale = jax.lax.stop_gradient(jnp.std(w)) + NORM_EPS
  quantized = quantize_signed((w - mean) / scale, alpha, bits, probs)
  if perturbation is not None:
    quantized = quantized + perturbation
  return quantized * scale + mean


def lsq_bounds(bits: int, signed: bool) -> tuple[float, float]:
  """Integer range (-q_neg, q_pos) of a b-bit LSQ quantizer."""
  if signed:
    return float(2**(bits - 1)), float(2**(bits - 1) - 1)
  return 0.0, float(2**bits - 1)


def lsq_init_step(x: jax.Array, bits: int, signed: bool) -> jax.Array:
  """LSQ's step initialization 2 * mean(|x|) / sqrt(q_pos)."""
  _, q_pos = lsq_bounds(bits, signed)
  return 2.0 * jnp.mean(jnp.abs(x)) / jnp.sqrt(q_pos)


def _scale_grad(x: jax.Array, factor: float) -> jax.Array:
  """Identity in the forward pass; multiplies the gradient by ``factor``."""
  return x * factor + jax.lax.stop_gradient(x - x * factor)


def quantize_lsq(x: jax.Array, step: jax.Array, bits: int | Sequence[int],
                 signed: bool, probs: jax.Array | None = None) -> jax.Array:
  """LSQ quantizer: s * round(clip(x / s, -q_neg, q_pos)).

  The step's gradient is scaled by 1 / sqrt(numel * q_pos) (LSQ's g). In
  supernet mode ``step`` holds one step per candidate bit width.

  Args:
    x: input tensor.
    step: step size (scalar), or one per candidate in supernet mode.
    bits: a bit width, or candidates when ``probs`` is given.
    signed: whether ``x`` can be negative.
    probs: supernet mixing probabilities, or None.

  Returns:
    The quantized tensor (or the probability-weighted mixture).
  """
  bits = _bits_tuple(bits)
  steps = jnp.reshape(step, (-1,))
  if probs is None and len(bits) != 1:
    raise ValueError(f'{len(bits)} bit widths need mixing probabilities.')
  out = jnp.zeros_like(x)
  for j, b in enumerate(bits):
    q_neg, q_pos = lsq_bounds(b, signed)
    s = _scale_grad(steps[j], 1.0 / math.sqrt(x.size * q_pos))
    q = round_ste(jnp.clip(x / s, -q_neg, q_pos)) * s
    out = q if probs is None else out + probs[j].astype(x.dtype) * q
  return out
