"""Quantizers against hand-computed values and hand-derived gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asga_jax.quant import quantizers as q
from tests import reference


def test_unsigned_hand_values_2bit():
  x = jnp.array([-0.5, 0.1, 0.4, 0.6, 1.2])
  # clip -> [0, .1, .4, .6, 1]; *3 -> [0, .3, 1.2, 1.8, 3]; round; /3.
  np.testing.assert_allclose(q.quantize_unsigned(x, 1.0, 2), [0, 0, 1 / 3, 2 / 3, 1], atol=1e-7)


def test_unsigned_hand_values_3bit_alpha2():
  x = jnp.array([0.3, 1.0, 2.5])
  # x/2 = [.15, .5, 1]; *7 = [1.05, 3.5, 7]; round -> [1, 4 (half to even), 7].
  np.testing.assert_allclose(q.quantize_unsigned(x, 2.0, 3), [2 / 7, 8 / 7, 2.0], atol=1e-6)


def test_signed_hand_values_2bit():
  x = jnp.array([-1.5, -0.3, 0.2, 0.9])
  # u = [0, .35, .6, .95]; *3 = [0, 1.05, 1.8, 2.85] -> [0,1,2,3]/3 -> 2u-1.
  np.testing.assert_allclose(q.quantize_signed(x, 1.0, 2), [-1, -1 / 3, 1 / 3, 1], atol=1e-7)


@pytest.mark.parametrize('bits', [2, 3, 4, 6, 8])
def test_against_numpy_reference(bits):
  x = np.random.default_rng(bits).normal(size=(50,)).astype(np.float32) * 2
  np.testing.assert_allclose(q.quantize_unsigned(x, 1.7, bits),
                             reference.quantize_unsigned(x, 1.7, bits), atol=1e-5)
  np.testing.assert_allclose(q.quantize_signed(x, 1.7, bits),
                             reference.quantize_signed(x, 1.7, bits), atol=1e-5)
  # At most (2**b - 1) + 1 distinct levels, all inside [-alpha, alpha].
  levels = np.unique(np.round(np.asarray(q.quantize_signed(x, 1.7, bits)), 5))
  assert len(levels) <= 2**bits and np.all(np.abs(levels) <= 1.7 + 1e-6)


def test_unsigned_gradients_ste_and_clip():
  x = jnp.array([-0.5, 0.1, 0.4, 0.6, 1.2])
  alpha = 1.0
  gx = jax.grad(lambda v: jnp.sum(q.quantize_unsigned(v, alpha, 2)))(x)
  np.testing.assert_allclose(gx, [0, 1, 1, 1, 0])  # STE inside, zero outside
  ga = jax.grad(lambda a: jnp.sum(q.quantize_unsigned(x, a, 2)))(alpha)
  # inside: D(x/a) - x/a = [0-.1, 1/3-.4, 2/3-.6]; above: 1; below: 0.
  expected = (0 - 0.1) + (1 / 3 - 0.4) + (2 / 3 - 0.6) + 1.0
  np.testing.assert_allclose(ga, expected, rtol=1e-6)


def test_signed_gradients_ste_and_clip():
  x = jnp.array([-1.5, -0.3, 0.2, 0.9])
  gx = jax.grad(lambda v: jnp.sum(q.quantize_signed(v, 1.0, 2)))(x)
  np.testing.assert_allclose(gx, [0, 1, 1, 1])
  ga = jax.grad(lambda a: jnp.sum(q.quantize_signed(x, a, 2)))(1.0)
  # inside: (2D(u)-1) - x/a = [-1/3+.3, 1/3-.2, 1-.9]; outside: sign(x) = -1.
  expected = -1.0 + (-1 / 3 + 0.3) + (1 / 3 - 0.2) + (1 - 0.9)
  np.testing.assert_allclose(ga, expected, rtol=1e-5)


def test_weight_quantizer_matches_reference_and_keeps_scale():
  w = np.random.default_rng(0).normal(0.01, 0.05, size=(3, 3, 4, 8)).astype(np.float32)
  for bits in (2, 4, 6):
    np.testing.assert_allclose(q.quantize_weight(w, 2.5, bits),
                               reference.quantize_weight(w, 2.5, bits), atol=1e-6)
  # 8 bits, clip at 4 std: close to the full-precision weights (same scale).
  err = np.abs(np.asarray(q.quantize_weight(w, 4.0, 8)) - w).max()
  assert err <= w.std() * 4.0 / 255 + 1e-6  # half a step: (2 * 4 / 255) / 2 std units


def test_weight_quantizer_zero_tensor_is_finite():
  w = jnp.zeros((3, 3, 2, 2))
  out = q.quantize_weight(w, 3.0, 2)
  assert np.all(np.isfinite(out)) and np.abs(out).max() < 1e-7
  g = jax.grad(lambda v: jnp.sum(q.quantize_weight(v, 3.0, 2)))(w)
  assert np.all(np.isfinite(g))


def test_weight_quantizer_gradient_is_identity_inside_clip():
  w = jnp.array([-0.2, -0.05, 0.0, 0.04, 0.1, 3.0])
  g = jax.grad(lambda v: jnp.sum(q.quantize_weight(v, 1.0, 4)))(w)
  inside = np.abs((w - w.mean()) / (w.std() + 1e-8)) < 1.0
  np.testing.assert_allclose(g, inside.astype(np.float32), atol=1e-5)


def test_mixture_equals_weighted_sum():
  x = jnp.linspace(-0.2, 1.3, 17)
  bits, probs = (2, 3, 4, 6), jnp.array([0.1, 0.2, 0.3, 0.4])
  mixed = q.quantize_unsigned(x, 1.1, bits, probs)
  manual = sum(p * reference.quantize_unsigned(np.asarray(x), 1.1, b) for p, b in zip(probs, bits))
  np.testing.assert_allclose(mixed, manual, atol=1e-6)
  mixed = q.quantize_signed(x, 1.1, bits, probs)
  manual = sum(p * reference.quantize_signed(np.asarray(x), 1.1, b) for p, b in zip(probs, bits))
  np.testing.assert_allclose(mixed, manual, atol=1e-6)


def _autodiff_quantizer(x, alpha, bits, probs, signed):
  """The clipping quantizer written with the STE round, differentiated by JAX."""
  if signed:
    unit = (jnp.clip(x / alpha, -1.0, 1.0) + 1.0) / 2.0
  else:
    unit = jnp.clip(x / alpha, 0.0, 1.0)
  ste = lambda z: z + jax.lax.stop_gradient(jnp.round(z) - z)
  mixed = sum(p * ste(unit * (2**b - 1)) / (2**b - 1) for p, b in zip(probs, bits))
  return alpha * (2.0 * mixed - 1.0) if signed else alpha * mixed


@pytest.mark.parametrize('signed', [False, True])
@pytest.mark.parametrize('bits', [(4,), (2, 3, 4, 6)])
def test_hand_written_backward_matches_autodiff_of_the_ste(signed, bits):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(0.3, 1.0, size=(4, 5, 6)), jnp.float32)  # some outside the clip
  cotangent = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  logits = jnp.asarray(rng.normal(size=len(bits)), jnp.float32)
  quantize = q.quantize_signed if signed else q.quantize_unsigned

  def loss(fn, x, alpha, logits):
    probs = jax.nn.softmax(logits)
    mixture = fn(x, alpha, bits, probs) if len(bits) > 1 else fn(x, alpha, bits[0], None)
    return jnp.sum(mixture * cotangent)

  ours_fn = lambda *a: quantize(*a[:3], a[3])
  ours = jax.grad(loss, argnums=(1, 2, 3))(ours_fn, x, 1.3, logits)
  reference_fn = lambda x, a, b, p: _autodiff_quantizer(x, a, (b,) if p is None else b,
                                                        [1.0] if p is None else p, signed)
  expected = jax.grad(loss, argnums=(1, 2, 3))(reference_fn, x, 1.3, logits)
  for got, want in zip(ours, expected):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
  if len(bits) == 1:
    np.testing.assert_array_equal(ours[2], 0.0)  # one bit width: the logits do nothing
  # Forward-over-reverse (Hessian-vector products, lambda_max) goes through the hand rule too.
  hvp = lambda fn: jax.jvp(jax.grad(lambda a, l: loss(fn, x, a, l), argnums=(0, 1)),
                           (1.3, logits), (0.7, jnp.ones_like(logits)))[1]
  for got, want in zip(hvp(ours_fn), hvp(reference_fn)):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_several_bits_without_probs_is_an_error():
  with pytest.raises(ValueError, match='mixing probabilities'):
    q.quantize_unsigned(jnp.ones(3), 1.0, (2, 4))


def test_lsq_hand_values_and_step_gradient():
  x = jnp.array([-1.3, 0.26, 0.6, 3.0])
  # 2-bit signed: q_neg=2, q_pos=1; x/s = [-2.6, .52, 1.2, 6] -> clip, round -> [-2,1,1,1].
  np.testing.assert_allclose(q.quantize_lsq(x, 0.5, 2, signed=True), [-1, .5, .5, .5])
  gs = jax.grad(lambda s: jnp.sum(q.quantize_lsq(x, s, 2, signed=True)))(0.5)
  # LSQ: -q_neg below, -x/s + round(x/s) inside, q_pos above; times 1/sqrt(N q_pos).
  expected = (-2 + (-0.52 + 1) + 1 + 1) / np.sqrt(4 * 1)
  np.testing.assert_allclose(gs, expected, rtol=1e-5)
  gx = jax.grad(lambda v: jnp.sum(q.quantize_lsq(v, 0.5, 2, signed=True)))(x)
  np.testing.assert_allclose(gx, [0, 1, 0, 0])


def test_lsq_unsigned_and_init():
  x = jnp.array([0.0, 0.4, 0.9, 5.0])
  # 2-bit unsigned: [0, 3]; x/0.3 = [0, 1.33, 3, 16.7] -> [0, 1, 3, 3].
  np.testing.assert_allclose(q.quantize_lsq(x, 0.3, 2, signed=False), [0, .3, .9, .9], atol=1e-6)
  np.testing.assert_allclose(q.lsq_init_step(x, 2, signed=False),
                             2 * np.mean(np.abs(x)) / np.sqrt(3))


def test_full_precision_markers():
  assert q.is_full_precision(None) and q.is_full_precision(32) and not q.is_full_precision(8)
