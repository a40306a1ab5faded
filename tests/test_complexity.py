"""MACs/BOPs from traced shapes against hand arithmetic and published counts."""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asga_jax import models, optim
from asga_jax.quant import (Policy, QuantConv, QuantDense, QuantSpec, argmax_policy,
                            collect_layer_costs, complexity_loss, expected_bits, format_report,
                            layer_report, mean_expected_bits, policy_bops, reference_bops,
                            total_bops)


class TwoLayer(nn.Module):
  quant: QuantSpec

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(QuantConv(8, (3, 3), (2, 2), padding=1, quant=self.quant, name='conv')(x))
    x = QuantConv(8, (3, 3), padding=1, feature_group_count=8, quant=self.quant, name='dw')(x)
    return QuantDense(10, quant=self.quant, name='fc')(jnp.mean(x, axis=(1, 2)))


def test_two_layer_net_against_hand_arithmetic():
  spec = QuantSpec(mode='supernet', w_bits=(2, 4), a_bits=(2, 8), edge_bits=None)
  model = TwoLayer(spec)
  costs = {c.path: c for c in collect_layer_costs(model, jnp.zeros((2, 8, 8, 3)))}
  # conv: 4x4 outputs x 8 channels x (3*3*3) = 3456; depthwise: 4*4*8 * 3*3*1 = 1152; fc: 8*10.
  assert costs['conv'].macs == 4 * 4 * 8 * 27
  assert costs['dw'].macs == 4 * 4 * 8 * 9
  assert costs['fc'].macs == 80
  assert costs['conv'].num_weights == 27 * 8 and costs['fc'].num_weights == 90
  assert costs['dw'].out_shape == (4, 4, 8) and costs['conv'].in_shape == (8, 8, 3)

  params = flax.core.unfreeze(
      jax.jit(model.init)(jax.random.key(0, impl='rbg'), jnp.zeros((1, 8, 8, 3))))
  params = params['params']
  params['conv']['w_logits'] = jnp.array([0.0, np.log(3.0)])  # p = (.25, .75): E[bw] = 3.5
  params['conv']['a_logits'] = jnp.array([0.0, 0.0])           # E[ba] = 5
  params['dw']['w_logits'] = jnp.array([np.log(3.0), 0.0])     # E = .75*2 + .25*4 = 2.5
  params['dw']['a_logits'] = jnp.array([0.0, np.log(2.0)])     # E = 2/3*8 + 1/3*2 = 6
  params['fc']['w_logits'] = params['fc']['a_logits'] = jnp.array([0.0, 100.0])  # 4 and 8
  expected = 3456 * 3.5 * 5 + 1152 * 2.5 * 6 + 80 * 4 * 8
  clist = tuple(costs.values())
  np.testing.assert_allclose(total_bops(params, clist), expected, rtol=1e-5)
  np.testing.assert_allclose(complexity_loss(params, clist),
                             expected / ((3456 + 1152 + 80) * 64), rtol=1e-5)

  mean_w, mean_a = mean_expected_bits(params, clist)
  np.testing.assert_allclose([mean_w, mean_a], [(3.5 + 2.5 + 4) / 3, (5 + 6 + 8) / 3], rtol=1e-5)

  # d E[b] / d logit_j = p_j (b_j - E[b]).
  grads = jax.grad(complexity_loss)(params, clist)
  p = np.array([0.25, 0.75])
  expected_grad = 3456 * 5 * p * (np.array([2, 4]) - 3.5) / ((3456 + 1152 + 80) * 64)
  np.testing.assert_allclose(grads['conv']['w_logits'], expected_grad, rtol=1e-4)


def test_resnet18_imagenet_published_counts():
  model = models.resnet18(1000, stem='imagenet')
  costs = collect_layer_costs(model, jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
  gmacs = sum(c.macs for c in costs) / 1e9
  assert 1.81 <= gmacs <= 1.82, gmacs  # published 1.82G (torchvision 1.814G)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  n = optim.count_params(params['params'])
  assert abs(n - 11.69e6) / 11.69e6 < 0.005, n  # published 11.7M (torchvision 11,689,512)
  assert n == 11_689_512


def test_resnet20_counts():
  costs = collect_layer_costs(models.resnet20(10), jnp.zeros((1, 32, 32, 3)))
  assert abs(sum(c.macs for c in costs) / 1e6 - 40.8) < 0.2  # ~41M MACs, 0.27M params
  assert 0.26e6 < sum(c.num_weights for c in costs) < 0.28e6


def test_fixed_and_edge_bits_in_costs():
  spec = QuantSpec(mode='supernet', w_bits=(2, 3, 4, 6), a_bits=(2, 3, 4, 6))
  costs = {c.path: c for c in collect_layer_costs(models.resnet20(10, quant=spec),
                                                  jnp.zeros((1, 32, 32, 3)))}
  assert costs['stem_conv'].w_bits == (8,) and not costs['stem_conv'].searchable
  assert costs['head'].a_bits == (8,) and not costs['head'].searchable
  conv1 = costs['stage1/block0/conv1']
  assert conv1.w_bits == (2, 3, 4, 6) and conv1.searchable
  assert sum(c.searchable for c in costs.values()) == 20  # 18 convs + 2 shortcuts


def test_policy_from_cifar_resnet18_applies_at_224_with_recomputed_bops():
  spec = QuantSpec(mode='supernet')
  cifar = models.resnet18(10, stem='cifar', quant=spec)
  costs32 = collect_layer_costs(cifar, jnp.zeros((1, 32, 32, 3)))
  params = jax.eval_shape(lambda: cifar.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params['params'])
  policy = argmax_policy(params, costs32)  # all 2-bit at zero logits (first candidate)
  assert len(policy) == 19

  imagenet = models.resnet18(1000, stem='imagenet', quant=spec.with_policy(policy))
  costs224 = collect_layer_costs(imagenet, jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
  assert {c.path for c in costs224 if c.w_bits == (2,)} == set(policy.paths())
  bops224 = policy_bops(policy, costs224)
  by_path = {c.path: c for c in costs224}
  hand = sum(c.macs * 4 for c in costs224 if c.path in policy) + \
      (by_path['stem_conv'].macs + by_path['head'].macs) * 64
  assert bops224 == hand
  # Feature maps are 56/28/14/7 at 224 px against 32/16/8/4 at 32 px: 1.75^2 more MACs.
  searched = lambda costs: sum(c.macs for c in costs if c.path in policy)
  assert searched(costs224) == searched(costs32) * 1.75**2
  assert reference_bops(costs224) == sum(c.macs for c in costs224) * 64


def test_report_rows_and_table():
  model = models.resnet20(10, quant=QuantSpec(mode='supernet'))
  costs = collect_layer_costs(model, jnp.zeros((1, 32, 32, 3)))
  params = jax.jit(model.init)(jax.random.key(0, impl='rbg'), jnp.zeros((1, 32, 32, 3)))['params']
  rows = layer_report(params, costs)
  assert rows[1].expected_w == pytest.approx(3.75) and rows[1].w == 2
  assert rows[0].w == 8 and rows[0].bops_argmax == costs[0].macs * 64
  table = format_report(rows)
  assert 'stage3/block2/conv2' in table and 'total' in table.splitlines()[-1]
  with pytest.raises(ValueError, match='needs the parameters'):
    layer_report(None, costs)
  e_w, e_a = expected_bits(params, costs[1])
  assert float(e_w) == pytest.approx(3.75) and float(e_a) == pytest.approx(3.75)


def test_policy_bops_requires_searchable_layers():
  costs = collect_layer_costs(models.resnet20(10, quant=QuantSpec(mode='supernet')),
                              jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(ValueError, match='not in the policy'):
    policy_bops(Policy.from_dict({'stage1/block0/conv1': (2, 2)}), costs)
