"""asga_jax.onednn: oneDNN convolutions equal XLA's in value and every derivative.

The reference is ``lax.conv_general_dilated`` (XLA's own convolution) and JAX's
autodiff of it. oneDNN sums in another order, so values agree to float32
round-off relative to each output's scale.
"""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from asga_jax import onednn, quant
from asga_jax.onednn import build
from tests.cpu_flags_script import compiled_value_and_grad

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5  # of each result's largest entry (measured: 3e-7 to 2e-6)

pytestmark = pytest.mark.skipif(not build.load(), reason='oneDNN kernels not buildable here')

# (input shape, kernel shape, strides, padding): ResNet's layers and odd cases.
CASES = [
    ((3, 8, 8, 3), (3, 3, 3, 4), (1, 1), 'SAME'),          # a stem: 3 input channels
    ((2, 9, 9, 4), (3, 3, 4, 8), (2, 2), 'SAME'),          # strided, odd size
    ((2, 8, 8, 4), (1, 1, 4, 8), (2, 2), 'VALID'),         # 1x1 shortcut
    ((2, 7, 9, 5), (3, 2, 5, 3), (2, 1), ((2, 0), (1, 3))),  # uneven everything
    ((2, 16, 16, 3), (4, 4, 3, 6), (4, 4), 'VALID'),       # patch embedding
]


def _reference(x, kernel, strides, padding):
  return lax.conv_general_dilated(x, kernel, strides, padding,
                                  dimension_numbers=onednn.DIMENSION_NUMBERS)


def _operands(case, seed=0):
  x_shape, k_shape, strides, padding = case
  kx, kk = jax.random.split(jax.random.key(seed))
  return (jax.random.normal(kx, x_shape), jax.random.normal(kk, k_shape), strides, padding)


def _close(actual, expected):
  for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    assert a.shape == b.shape
    scale = float(jnp.max(jnp.abs(b)))
    assert float(jnp.max(jnp.abs(a - b))) <= TOLERANCE * scale


def _loss(conv):
  # Nonlinear, so gradients and Hessian-vector products depend on the convolution.
  return lambda x, kernel, strides, padding: jnp.sum(jnp.sin(conv(x, kernel, strides, padding)))


@pytest.mark.parametrize('case', CASES)
def test_value_and_gradients(case):
  x, kernel, strides, padding = _operands(case)
  _close(onednn.conv2d(x, kernel, strides, padding), _reference(x, kernel, strides, padding))
  grad = lambda conv: jax.jit(jax.grad(_loss(conv), (0, 1)), static_argnums=(2, 3))
  _close(grad(onednn.conv2d)(x, kernel, strides, padding),
         grad(_reference)(x, kernel, strides, padding))


@pytest.mark.parametrize('case', CASES[:2])
def test_hessian_vector_products(case):
  # Forward over reverse, as analysis.hessian does: the transposes' own derivatives.
  x, kernel, strides, padding = _operands(case)
  tangents = (jnp.cos(x), jnp.sin(kernel))

  def hvp(conv):
    grad = jax.grad(lambda xk: _loss(conv)(*xk, strides, padding))
    return jax.jvp(grad, ((x, kernel),), (tangents,))[1]
  _close(hvp(onednn.conv2d), hvp(_reference))


@pytest.mark.parametrize('in_axes', [(0, None), (None, 0), (0, 0), (1, 0)])
def test_vmap(in_axes):
  x, kernel, strides, padding = _operands(CASES[1])
  xs, kernels = jnp.stack([x, 2 * x], axis=in_axes[0] or 0), jnp.stack([kernel, -kernel])
  args = (xs if in_axes[0] is not None else x, kernels if in_axes[1] is not None else kernel)

  def batched(conv):
    f = jax.value_and_grad(lambda x, k: _loss(conv)(x, k, strides, padding), (0, 1))
    return jax.vmap(f, in_axes)(*args)
  _close(batched(onednn.conv2d), batched(_reference))


def test_explicit_padding():
  assert onednn.explicit_padding((1, 32, 32, 3), (3, 3, 3, 8), (2, 2), 'SAME') == (0, 1, 0, 1)
  assert onednn.explicit_padding((1, 8, 8, 3), (3, 3, 3, 8), (1, 1), 1) == (1, 1, 1, 1)
  assert onednn.explicit_padding((1, 8, 8, 3), (3, 3, 3, 8), (1, 1), ((2, 0), (1, 3))) == (
      2, 0, 1, 3)
  assert onednn.explicit_padding((1, 8, 8, 3), (3, 3, 3, 8), (1, 1), (0, 1, 2, 3)) == (0, 1, 2, 3)


def _custom_calls(compiled) -> int:
  return compiled.as_text().count('custom_call_target="asga_onednn_conv')


# ResNet-8 has 9 convolutions (stem, 2 per block, 2 shortcuts): each runs forward, input
# gradient and kernel gradient, but the full-precision stem needs no input gradient (the
# quantized one does, for its input quantizer's clipping level).
@pytest.mark.parametrize('spec,calls,tolerance', [
    (quant.QuantSpec(), 9 + 8 + 9, 1e-5),
    # Round-off moves a few quantizer inputs across a rounding step (as in test_cpu_flags).
    (quant.QuantSpec(mode='supernet', w_bits=(2, 4), a_bits=(2, 4)), 9 + 9 + 9, 5e-3),
], ids=['fp', 'supernet'])
def test_a_resnet_runs_on_onednn_with_the_same_loss_and_gradients(spec, calls, tolerance,
                                                                   monkeypatch):
  step, params = compiled_value_and_grad(spec)
  assert _custom_calls(step) == calls
  loss, grads = step(params)
  monkeypatch.setenv(onednn.conv.OPT_OUT, '0')
  assert not onednn.enabled()
  reference, params = compiled_value_and_grad(spec)
  assert _custom_calls(reference) == 0
  ref_loss, ref_grads = reference(params)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  a, b = (np.concatenate([np.ravel(g) for g in jax.tree.leaves(t)]) for t in (grads, ref_grads))
  assert np.linalg.norm(a - b) <= tolerance * np.linalg.norm(b)


def test_groups_and_bfloat16_keep_xlas_convolution():
  x, kernel, _, padding = _operands(CASES[0])
  pads = onednn.explicit_padding(x.shape, kernel.shape, (1, 1), padding)
  assert onednn.supported(x, kernel, pads)
  assert not onednn.supported(x, kernel, pads, feature_group_count=3)
  assert not onednn.supported(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), pads)
  assert not onednn.supported(x, kernel, (-1, 0, 0, 0))


def test_the_build_is_cached_per_source_and_environment(tmp_path, monkeypatch):
  root = build.onednn_root()
  monkeypatch.setenv('ASGA_JAX_CACHE', str(tmp_path))
  target = build.library_path(root)
  assert target.parent == tmp_path and not target.exists()
  build.compile_library(root, target)
  assert target.is_file() and list(tmp_path.iterdir()) == [target]  # no partial file left
  monkeypatch.setattr(build, 'SOURCE', tmp_path / 'changed.cc')
  build.SOURCE.write_text('// another source\n')
  assert build.library_path(root) != target


def test_a_missing_onednn_or_a_failed_build_is_named(tmp_path, monkeypatch):
  root = build.onednn_root()
  monkeypatch.setenv('ASGA_ONEDNN_ROOT', str(tmp_path))
  with pytest.raises(build.BuildError, match='pip install onednn-cpu-gomp'):
    build.onednn_root()
  monkeypatch.setattr(build, 'SOURCE', tmp_path / 'broken.cc')
  build.SOURCE.write_text('this is not C++\n')
  with pytest.raises(build.BuildError, match='compiling broken.cc failed'):
    build.compile_library(root, tmp_path / 'broken.so')
  assert sorted(p.name for p in tmp_path.iterdir()) == ['broken.cc']  # no partial build


def test_without_onednn_the_layers_fall_back_to_xla(tmp_path):
  # A fresh process, as build.load() runs once per process.
  script = ('import jax, jax.numpy as jnp\n'
            'from asga_jax import onednn\n'
            'x, k = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))\n'
            'assert not onednn.enabled()\n'
            'y = jax.jit(onednn.conv2d)(x, k)\n'  # still lowers: to XLA's convolution
            'print(float(y[0, 3, 3, 0]), float(y[0, 0, 0, 0]))\n')
  env = {**os.environ, 'ASGA_ONEDNN_ROOT': str(tmp_path), 'ASGA_JAX_CACHE': str(tmp_path),
         'PYTHONPATH': str(ROOT), 'JAX_PLATFORMS': 'cpu'}
  result = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True,
                          text=True, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split() == ['27.0', '12.0']  # 3x3x3 ones inside, 2x2x3 in a corner
  assert "XLA's own convolutions will be used on CPU" in result.stderr
  assert 'pip install onednn-cpu-gomp' in result.stderr
