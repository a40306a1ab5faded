"""Quantized layers: composite supernet computation, fixed mode, parameter names."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asga_jax import models
from asga_jax.quant import LayerBits, Policy, PolicyError, QuantConv, QuantDense, QuantSpec
from tests import reference

BITS = (2, 3, 4, 6)


def _init(module, x):
  return jax.jit(module.init)(jax.random.key(0, impl='rbg'), x)['params']


def test_supernet_conv_equals_hand_mixture():
  rng = np.random.default_rng(0)
  x = np.abs(rng.normal(size=(2, 5, 5, 3))).astype(np.float32)  # post-ReLU input
  spec = QuantSpec(mode='supernet', w_bits=BITS, a_bits=BITS)
  layer = QuantConv(4, (3, 3), (2, 2), padding=1, quant=spec)
  params = flax.core.unfreeze(_init(layer, x))
  params['w_logits'] = jnp.array([0.3, -1.0, 2.0, 0.1])
  params['a_logits'] = jnp.array([1.0, 0.5, -0.5, 0.0])
  params['w_clip'], params['a_clip'] = jnp.array(2.2), jnp.array(1.6)
  out = layer.apply({'params': params}, x)

  k = np.asarray(params['kernel'])
  pw, pa = reference.softmax(params['w_logits']), reference.softmax(params['a_logits'])
  w_mix = sum(p * reference.quantize_weight(k, 2.2, b) for p, b in zip(pw, BITS))
  x_mix = sum(p * reference.quantize_unsigned(x, 1.6, b) for p, b in zip(pa, BITS))
  np.testing.assert_allclose(out, reference.conv2d_nhwc(x_mix, w_mix, stride=2, pad=1),
                             rtol=1e-4, atol=1e-5)


def test_supernet_dense_signed_input_equals_hand_mixture():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(3, 6)).astype(np.float32)
  spec = QuantSpec(mode='supernet', w_bits=(2, 4), a_bits=(3, 5))
  layer = QuantDense(5, quant=spec, signed_input=True)
  params = flax.core.unfreeze(_init(layer, x))
  params['w_logits'], params['a_logits'] = jnp.array([0.2, 0.7]), jnp.array([-0.4, 0.9])
  out = layer.apply({'params': params}, x)
  k = np.asarray(params['kernel'])
  pw, pa = reference.softmax(params['w_logits']), reference.softmax(params['a_logits'])
  w_mix = sum(p * reference.quantize_weight(k, 3.0, b) for p, b in zip(pw, (2, 4)))
  x_mix = sum(p * reference.quantize_signed(x, 4.0, b) for p, b in zip(pa, (3, 5)))
  np.testing.assert_allclose(out, x_mix @ w_mix + np.asarray(params['bias']), rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize('w_idx,a_idx', [(0, 3), (2, 1)])
def test_fixed_mode_equals_one_hot_supernet(w_idx, a_idx):
  x = jnp.abs(jax.random.normal(jax.random.key(1), (2, 6, 6, 4)))
  supernet = QuantConv(8, (3, 3), quant=QuantSpec(mode='supernet'), name='conv')
  params = flax.core.unfreeze(_init(supernet, x))
  params['w_logits'] = jnp.full((4,), -1e9).at[w_idx].set(0.0)
  params['a_logits'] = jnp.full((4,), -1e9).at[a_idx].set(0.0)
  policy = Policy.from_dict({'conv': (BITS[w_idx], BITS[a_idx])})
  fixed = QuantConv(8, (3, 3), quant=QuantSpec(mode='fixed', policy=policy), name='conv')
  fixed_params = {k: v for k, v in params.items() if not k.endswith('_logits')}
  np.testing.assert_allclose(supernet.apply({'params': params}, x),
                             fixed.apply({'params': fixed_params}, x), rtol=1e-6, atol=1e-6)


def test_parameter_names_shared_across_modes():
  x = jnp.zeros((1, 32, 32, 3))
  trees = {}
  for mode, extra in [('float', {}), ('supernet', {}),
                      ('fixed', {'uniform': LayerBits(4, 4)})]:
    model = models.resnet20(10, quant=QuantSpec(mode=mode, **extra))
    trees[mode] = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), x))['params']
  paths = lambda t: {jax.tree_util.keystr(p): l.shape for p, l in
                     jax.tree_util.tree_leaves_with_path(t)}
  fixed, supernet, fp = paths(trees['fixed']), paths(trees['supernet']), paths(trees['float'])
  assert {k: v for k, v in supernet.items() if '_logits' not in k} == fixed
  assert {k: v for k, v in fixed.items() if '_clip' not in k} == fp
  # Edge layers carry no logits; every other conv does.
  assert "['stem_conv']['w_logits']" not in str(supernet.keys())
  assert "['head']['a_logits']" not in str(supernet.keys())
  assert "['stage2']['block0']['shortcut']['w_logits']" in supernet


def test_float_mode_is_plain_conv():
  x = jax.random.normal(jax.random.key(2), (1, 4, 4, 3))
  layer = QuantConv(2, (3, 3), padding=1)
  params = _init(layer, x)
  assert set(params) == {'kernel'}
  np.testing.assert_allclose(layer.apply({'params': params}, x),
                             reference.conv2d_nhwc(np.asarray(x), np.asarray(params['kernel']),
                                                   pad=1), rtol=1e-5, atol=1e-5)


def test_edge_layers_are_8bit_in_fixed_mode():
  x = jax.random.normal(jax.random.key(3), (1, 4, 4, 3))
  edge = QuantConv(2, (3, 3), quant=QuantSpec(mode='fixed', uniform=LayerBits(2, 2)), edge=True,
                   signed_input=True)
  params = flax.core.unfreeze(_init(edge, x))
  out = edge.apply({'params': params}, x)
  k = np.asarray(params['kernel'])
  expected = reference.conv2d_nhwc(reference.quantize_signed(np.asarray(x), 4.0, 8),
                                   reference.quantize_weight(k, 3.0, 8), pad=1)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_depthwise_conv_matches_reference():
  x = jnp.abs(jax.random.normal(jax.random.key(4), (2, 5, 5, 6)))
  layer = QuantConv(6, (3, 3), padding=1, feature_group_count=6,
                    quant=QuantSpec(mode='fixed', uniform=LayerBits(4, 4)))
  params = _init(layer, x)
  assert params['kernel'].shape == (3, 3, 1, 6)
  expected = reference.conv2d_nhwc(reference.quantize_unsigned(np.asarray(x), 4.0, 4),
                                   reference.quantize_weight(np.asarray(params['kernel']), 3.0, 4),
                                   pad=1, groups=6)
  np.testing.assert_allclose(layer.apply({'params': params}, x), expected, rtol=1e-4, atol=1e-5)


def test_lsq_layers_supernet_and_fixed():
  x = jax.random.normal(jax.random.key(5), (4, 7))
  supernet = QuantDense(3, quant=QuantSpec(mode='supernet', quantizer='lsq', w_bits=(2, 4),
                                           a_bits=(2, 4)), signed_input=True)
  params = _init(supernet, x)
  assert params['w_step'].shape == (2,) and params['a_step'].shape == (2,)
  fixed = QuantDense(3, quant=QuantSpec(mode='fixed', quantizer='lsq', uniform=LayerBits(4, 4)),
                     signed_input=True)
  assert _init(fixed, x)['w_step'].shape == ()
  grads = jax.jit(jax.grad(lambda p: jnp.sum(supernet.apply({'params': p}, x) ** 2)))(params)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert np.abs(grads['w_logits']).sum() > 0 and np.abs(grads['w_step']).sum() > 0


def test_gradients_reach_logits_and_clips():
  x = jnp.abs(jax.random.normal(jax.random.key(6), (2, 6, 6, 3)))
  layer = QuantConv(4, (3, 3), quant=QuantSpec(mode='supernet'))
  params = _init(layer, x)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply({'params': p}, x) ** 2)))(params)
  for name in ('w_logits', 'a_logits', 'w_clip', 'a_clip', 'kernel'):
    assert np.abs(np.asarray(grads[name])).sum() > 0, name


def test_policy_missing_layer_error_names_it():
  model = models.resnet20(10, quant=QuantSpec(mode='fixed', policy=Policy.from_dict(
      {'stage1/block0/conv1': (4, 4)})))
  with pytest.raises(PolicyError, match='stage1/block0/conv2'):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))))


@pytest.mark.parametrize('kwargs,match', [
    ({'mode': 'int8'}, 'unknown quantization mode'),
    ({'w_bits': (4, 2)}, 'sorted and distinct'),
    ({'a_bits': (2, 2, 4)}, 'sorted and distinct'),
    ({'w_bits': (0, 4)}, r'1\.\.8'),
    ({'a_bits': (2, 16)}, r'1\.\.8'),
    ({'edge_bits': 0}, 'edge_bits'),
    ({'mode': 'fixed'}, 'exactly one of'),
    ({'quantizer': 'pact'}, 'unknown quantizer'),
])
def test_spec_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    QuantSpec(**kwargs)
