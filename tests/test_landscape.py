"""Loss landscapes: filter normalization, closed-form grids, a tiny ResNet, files."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from asga_jax import models
from asga_jax.analysis import (filter_normalized_direction, landscape_1d, landscape_2d,
                               plot_landscape_1d, plot_landscape_2d, save_landscape)

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def _params():
  rng = np.random.default_rng(0)
  return jax.tree.map(jnp.asarray, {
      'conv': {'kernel': rng.normal(size=(3, 3, 2, 4)), 'bias': np.ones(4)},
      'dense': {'kernel': rng.normal(size=(4, 3))}, 'bn': {'scale': rng.normal(size=4)}})


def _filter_norms(x: jax.Array) -> np.ndarray:
  return np.linalg.norm(np.asarray(x).reshape(-1, x.shape[-1]), axis=0)


def _half_square(p) -> jax.Array:
  return 0.5 * optax.tree.norm(p, squared=True)


def _numpy_init(model, x: np.ndarray) -> dict:
  """He-normal kernels, unit BN scales and variances, zero biases and means.

  Drawn with numpy: `model.init`'s initializers take seconds to compile on CPU.
  """
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  rng = np.random.default_rng(0)

  def draw(path, s):
    name = path[-1].key
    if name == 'kernel':
      return rng.normal(0.0, np.sqrt(2.0 / np.prod(s.shape[:-1])), s.shape).astype(np.float32)
    return np.full(s.shape, 1.0 if name in ('scale', 'var') else 0.0, np.float32)

  return jax.tree_util.tree_map_with_path(
      draw, {'params': shapes['params'], 'batch_stats': shapes['batch_stats']})


def test_filter_normalized_direction():
  params, key = _params(), jax.random.key(1)
  d = filter_normalized_direction(params, key)
  for name in ('conv', 'dense'):
    np.testing.assert_allclose(_filter_norms(d[name]['kernel']),
                               _filter_norms(params[name]['kernel']), rtol=1e-5)
  assert not np.allclose(d['conv']['kernel'], params['conv']['kernel'])  # random, not a copy
  np.testing.assert_array_equal(d['conv']['bias'], 0.0)
  np.testing.assert_array_equal(d['bn']['scale'], 0.0)

  mask = {'conv': {'kernel': False, 'bias': True}, 'dense': {'kernel': True},
          'bn': {'scale': True}}
  masked = filter_normalized_direction(params, key, mask=mask)
  np.testing.assert_array_equal(masked['conv']['kernel'], 0.0)
  np.testing.assert_array_equal(masked['conv']['bias'], 0.0)  # 1-D: always zero
  np.testing.assert_array_equal(masked['bn']['scale'], 0.0)
  np.testing.assert_array_equal(masked['dense']['kernel'], d['dense']['kernel'])


def test_landscape_1d_matches_closed_form():
  params = _params()
  direction = jax.tree.map(lambda x: jnp.full_like(x, 0.3), params)
  alphas, losses = landscape_1d(_half_square, params, direction, span=2.0, points=21)
  assert alphas.shape == losses.shape == (21,)
  assert losses.dtype == np.float64
  np.testing.assert_allclose(alphas, np.linspace(-2.0, 2.0, 21))
  expected = [_half_square(jax.tree.map(lambda p, d: p + a * d, params, direction))
              for a in alphas]
  np.testing.assert_allclose(losses, expected, rtol=1e-5)
  np.testing.assert_allclose(losses[10], _half_square(params), rtol=1e-6)  # the center


def test_landscape_2d_indexing_matches_closed_form():
  params = {'w': jnp.array([1.0, -2.0]), 'b': jnp.array([0.5])}
  # Orthogonal directions of different norms and slopes: a transposed grid fails.
  d1 = {'w': jnp.array([1.0, 0.0]), 'b': jnp.array([0.0])}
  d2 = {'w': jnp.array([0.0, 0.0]), 'b': jnp.array([3.0])}
  alphas, betas, losses = landscape_2d(_half_square, params, d1, d2, span=1.5, points=5)
  assert alphas.shape == betas.shape == (5,) and losses.shape == (5, 5)
  expected = np.array([[0.5 * ((1 + a) ** 2 + 4 + (0.5 + 3 * b) ** 2) for b in betas]
                       for a in alphas])
  np.testing.assert_allclose(losses, expected, rtol=1e-6)
  assert not np.allclose(losses, losses.T)


def test_tiny_resnet_landscape_plots_and_npz(tmp_path):
  model = models.resnet8(10, width=4)
  rng = np.random.default_rng(1)
  x = rng.normal(size=(16, 8, 8, 3)).astype(np.float32)
  y = rng.integers(0, 10, 16)
  variables = _numpy_init(model, x)

  def loss(p):
    logits = model.apply({'params': p, 'batch_stats': variables['batch_stats']}, x, train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  params = variables['params']
  d1, d2 = (filter_normalized_direction(params, k) for k in jax.random.split(jax.random.key(0)))
  alphas, betas, losses = landscape_2d(loss, params, d1, d2, span=0.5, points=5)
  assert losses.shape == (5, 5)
  assert np.isfinite(losses.min()) and np.all(np.isfinite(losses))
  np.testing.assert_allclose(losses[2, 2], loss(params), rtol=1e-5)

  line = landscape_1d(loss, params, d1, span=0.5, points=5)
  plot_landscape_1d({'model': line, 'model, plane row': (alphas, losses[:, 2])},
                    tmp_path / 'line.png', title='tiny ResNet-8')
  plot_landscape_2d(alphas, betas, losses, tmp_path / 'plane.png', title='tiny ResNet-8')
  plot_landscape_2d(alphas, betas, losses, tmp_path / 'basin.png', vmax=float(losses[2, 2]) + 1)
  save_landscape(tmp_path / 'grid.npz', alphas=alphas, betas=betas, losses=losses)

  for name in ('line.png', 'plane.png', 'basin.png'):
    assert (tmp_path / name).read_bytes()[:8] == PNG_SIGNATURE
  with np.load(tmp_path / 'grid.npz') as grid:
    assert sorted(grid.files) == ['alphas', 'betas', 'losses']
    assert grid['alphas'].shape == grid['betas'].shape == (5,)
    np.testing.assert_array_equal(grid['losses'], losses)
  # No temporary file left behind.
  assert sorted(os.listdir(tmp_path)) == ['basin.png', 'grid.npz', 'line.png', 'plane.png']
