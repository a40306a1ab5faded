"""Power iteration against explicit Hessians: a tiny MLP, quadratics, masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from asga_jax.analysis import top_hessian_eigenvalue


def _mlp_problem():
  """A 4-5-3 tanh MLP (43 parameters) regressing random targets, and its params."""
  kx, ky, k1, k2 = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(kx, (32, 4))
  y = jax.random.normal(ky, (32, 3))
  params = {'w1': 0.5 * jax.random.normal(k1, (4, 5)), 'b1': jnp.zeros(5),
            'w2': 0.5 * jax.random.normal(k2, (5, 3)), 'b2': jnp.zeros(3)}

  def loss(p):
    out = jnp.tanh(x @ p['w1'] + p['b1']) @ p['w2'] + p['b2']
    return 0.5 * jnp.mean(jnp.sum((out - y) ** 2, axis=-1))

  return loss, params


def _quadratic(h: jax.Array):
  """0.5 p^T h p over p = concat(a [3], b [2]), as a loss of {'a', 'b'}."""
  return lambda p: 0.5 * jnp.concatenate([p['a'], p['b']]) @ h @ jnp.concatenate([p['a'], p['b']])


def test_lambda_max_of_mlp_near_minimum_matches_eigvalsh():
  loss, params = _mlp_problem()

  @jax.jit
  def descend(p):
    step = lambda _, p: jax.tree.map(lambda w, g: w - 0.2 * g, p, jax.grad(loss)(p))
    return jax.lax.fori_loop(0, 500, step, p)

  params = descend(params)
  flat, unravel = ravel_pytree(params)
  eigs = jnp.linalg.eigvalsh(jax.jit(jax.hessian(lambda f: loss(unravel(f))))(flat))
  # Near the minimum the top eigenvalue dominates in magnitude, so power
  # iteration finds lambda_max.
  assert eigs[-1] > 0 and eigs[-1] > abs(eigs[0]), eigs
  eig, vec, iterations = top_hessian_eigenvalue(loss, params, key=jax.random.key(1),
                                                num_iters=1000, tol=1e-7)
  assert float(eig) == pytest.approx(float(eigs[-1]), rel=0.01)
  assert 1 < iterations <= 1000
  assert float(jnp.linalg.norm(ravel_pytree(vec)[0])) == pytest.approx(1.0, rel=1e-4)


def test_known_quadratic_and_masked_block():
  diag = jnp.array([5.0, 2.0, 0.5, 3.0, 1.0])
  q, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(0), (5, 5)))
  coupled = q @ jnp.diag(diag) @ q.T  # PSD, spectrum `diag`, blocks coupled
  params = {'a': jnp.ones(3), 'b': jnp.ones(2)}
  kwargs = dict(key=jax.random.key(2), num_iters=500, tol=1e-7)

  eig, vec, _ = top_hessian_eigenvalue(_quadratic(jnp.diag(diag)), params, **kwargs)
  assert float(eig) == pytest.approx(5.0, rel=1e-4)
  assert abs(float(vec['a'][0])) == pytest.approx(1.0, rel=1e-3)
  eig, _, _ = top_hessian_eigenvalue(_quadratic(coupled), params, **kwargs)
  assert float(eig) == pytest.approx(5.0, rel=1e-3)

  # Only 'b': the top eigenvalue of the b-b block; 'a' is held fixed.
  block_max = float(jnp.linalg.eigvalsh(coupled[3:, 3:])[-1])
  for mask in ({'a': False, 'b': True}, lambda p: {'a': False, 'b': True}):
    eig, vec, _ = top_hessian_eigenvalue(_quadratic(coupled), params, mask=mask, **kwargs)
    assert float(eig) == pytest.approx(block_max, rel=1e-3)
    np.testing.assert_array_equal(vec['a'], 0.0)
    np.testing.assert_allclose(coupled[3:, 3:] @ vec['b'], block_max * vec['b'], atol=1e-3)


def test_iteration_cap_and_tolerance():
  loss = _quadratic(jnp.diag(jnp.array([5.0, 2.0, 0.5, 3.0, 1.0])))
  params = {'a': jnp.ones(3), 'b': jnp.ones(2)}
  key = jax.random.key(0)
  assert top_hessian_eigenvalue(loss, params, key=key, num_iters=1).iterations == 1
  # tol=0 never converges, so the cap stops it.
  assert top_hessian_eigenvalue(loss, params, key=key, num_iters=7, tol=0.0).iterations == 7
  # H = 2 I: the first estimate is exact, the second confirms it.
  result = top_hessian_eigenvalue(_quadratic(2.0 * jnp.eye(5)), params, key=key, num_iters=50)
  assert result.iterations == 2
  assert float(result.value) == pytest.approx(2.0, rel=1e-6)
  with pytest.raises(ValueError, match='num_iters'):
    top_hessian_eigenvalue(loss, params, key=key, num_iters=0)
  with pytest.raises(ValueError, match='selects no'):
    top_hessian_eigenvalue(loss, params, key=key, mask={'a': False, 'b': False})
