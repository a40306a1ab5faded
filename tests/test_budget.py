"""BOPs targets: parsing, the dual-ascent lambda, fitting a policy, and a search to 3MP/4MP."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from asga_jax import models, optim, quant
from asga_jax.quant import LayerCost, QuantSpec
from asga_jax.train import steps

BITS = (2, 3, 4, 6)


def _cost(path, macs, searchable=True):
  bits = BITS if searchable else (8,)
  return LayerCost(path=path, kind='QuantConv', macs=macs, num_weights=0, in_shape=(),
                   out_shape=(), w_bits=bits, a_bits=bits, searchable=searchable)


COSTS = (_cost('stem', 100, searchable=False), _cost('a', 1000), _cost('b', 4000),
         _cost('head', 10, searchable=False))
EDGE = 110 * 64  # the 8-bit edge layers


def _params(w_choice, a_choice):
  """Logits whose argmax is the given candidate index per layer (a, b)."""
  onehot = lambda i: jnp.asarray(np.eye(len(BITS))[i] * 2.0)
  return {p: {'w_logits': onehot(w), 'a_logits': onehot(a)}
          for p, w, a in zip(('a', 'b'), w_choice, a_choice)}


def test_targets_parse_to_hand_computed_bops():
  assert quant.uniform_bops(COSTS, 3) == EDGE + 5000 * 9
  assert quant.target_bops('3MP', COSTS) == EDGE + 5000 * 9
  assert quant.target_bops(' 4mp ', COSTS) == EDGE + 5000 * 16
  assert quant.target_bops('0.0001G', COSTS) == pytest.approx(1e5)
  assert quant.target_bops('0.05M', COSTS) == pytest.approx(5e4)
  assert quant.target_bops(6e4, COSTS) == 6e4
  assert quant.bops_range(COSTS) == (EDGE + 5000 * 4, EDGE + 5000 * 36)


@pytest.mark.parametrize('target,match', [('3 bits', 'not understood'), ('1MP', 'outside'),
                                          ('1G', 'outside')])
def test_bad_targets_say_what_is_wrong(target, match):
  with pytest.raises(ValueError, match=match):
    quant.target_bops(target, COSTS)


def test_argmax_bops_is_the_policy_cost():
  params = _params((1, 3), (2, 0))  # a: 3/4 bits, b: 6/2 bits
  assert float(quant.argmax_bops(params, COSTS)) == EDGE + 1000 * 12 + 4000 * 12


def test_complexity_penalty_matches_numpy_reference():
  target, rate, lam0 = quant.target_bops('3MP', COSTS), 0.3, 0.5
  tx = optim.complexity_penalty(COSTS, weight=lam0, target_bops=target, rate=rate)
  params = _params((3, 3), (3, 3))  # 6/6 everywhere: over budget
  state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  comp_grads = jax.grad(quant.complexity_loss)(params, COSTS)
  lam = lam0
  for _ in range(4):
    updates, state = tx.update(zeros, state, params)
    for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(comp_grads)):
      np.testing.assert_allclose(u, lam * np.asarray(g), rtol=1e-6)
    bops = EDGE + 5000 * 36
    lam = lam * np.exp(rate * (bops / target - 1))
    assert float(state.weight) == pytest.approx(lam, rel=1e-6)
    assert float(state.argmax_bops) == bops
  # Under budget, lambda shrinks; a fixed weight never moves.
  _, state = tx.update(zeros, state, _params((0, 0), (0, 0)))
  assert float(state.weight) < lam
  fixed = optim.complexity_penalty(COSTS, weight=0.2)
  _, fixed_state = fixed.update(zeros, fixed.init(params), params)
  assert float(fixed_state.weight) == pytest.approx(0.2)


def test_fit_moves_the_least_certain_layer_first():
  # a: 6/6 (barely preferred over 4), b: 6/6 (strongly preferred): 25% over 3MP+.
  params = {'a': {'w_logits': jnp.array([0., 0., 1.9, 2.]),
                  'a_logits': jnp.array([0., 0., 0., 2.])},
            'b': {'w_logits': jnp.array([0., 0., 0., 9.]), 'a_logits': jnp.array([0., 0., 0., 9.])}}
  target = EDGE + 1000 * 24 + 4000 * 36
  fit = quant.fit_policy_to_budget(params, COSTS, target, tolerance=0.01)
  assert fit.moves == (('a', 'w', 6, 4),)
  assert fit.bops == target and fit.argmax_bops == EDGE + 5000 * 36
  # Far under a large target: layers move up until inside the band.
  fit = quant.fit_policy_to_budget(_params((0, 0), (0, 0)), COSTS,
                                   quant.target_bops('4MP', COSTS), tolerance=0.05)
  assert abs(fit.bops / quant.target_bops('4MP', COSTS) - 1) <= 0.05


def _search(target: str, num_steps: int = 120):
  model = models.resnet8(10, width=8, quant=QuantSpec(mode='supernet'))
  rng = np.random.default_rng(0)
  batch = {'image': jnp.asarray(rng.normal(size=(16, 16, 16, 3)), jnp.float32),
           'label': jnp.asarray(rng.integers(0, 10, 16))}
  variables = jax.jit(model.init)(jax.random.key(0, impl='rbg'), batch['image'][:1])
  costs = quant.collect_layer_costs(model, batch['image'][:1])
  bops = quant.target_bops(target, costs)
  group = lambda p: jax.tree.map(lambda label: 'arch' if label == optim.ARCH else 'net',
                                 optim.param_labels(p))
  tx = optax.chain(optim.complexity_penalty(costs, weight=0.1, target_bops=bops),
                   optax.multi_transform({'net': optax.sgd(0.01, momentum=0.9),
                                          'arch': optax.adam(5e-3, b1=0.5)}, group))
  state = steps.create_train_state(variables, tx)
  step = jax.jit(steps.make_train_step(model, tx, costs=costs))
  for _ in range(num_steps):
    state, metrics = step(state, batch)
  return quant.fit_policy_to_budget(jax.device_get(state.params), costs, bops), bops, metrics


def test_search_to_3mp_and_4mp_lands_within_5_percent_and_is_monotonic():
  fit3, bops3, metrics3 = _search('3MP')
  fit4, bops4, metrics4 = _search('4MP')
  assert abs(fit3.bops / bops3 - 1) <= 0.05
  assert abs(fit4.bops / bops4 - 1) <= 0.05
  assert fit4.bops > fit3.bops
  # Dual ascent did most of the work: the plain argmax policy is already close.
  for fit, bops in ((fit3, bops3), (fit4, bops4)):
    assert abs(fit.argmax_bops / bops - 1) < 0.35
    assert len(fit.moves) <= 8
  assert float(metrics3['comp_weight']) != 0.1  # lambda was adapted
