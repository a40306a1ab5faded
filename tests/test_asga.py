"""ASGA transform: a plain-numpy reference of the update, composition, flatness."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from asga_jax import models, optim
from asga_jax.analysis import top_hessian_eigenvalue
from asga_jax.optim.asga import next_rho
from asga_jax.quant import QuantSpec, collect_layer_costs, complexity_loss

A = np.array([[3.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 0.3]])
C = np.array([1.0, -2.0, 0.5])
LAM = 0.3


def task_loss_np(w, z):
  d = w - C
  return 0.5 * d @ A @ d + 0.25 * np.sum((z - w[:2]) ** 2)


def task_grad_np(w, z):
  gz = 0.5 * (z - w[:2])
  gw = A @ (w - C)
  gw[:2] -= gz
  return gw, gz


def asga_reference(steps, *, rho0, rho_max, phi, mu, epsilon, lr, momentum, adaptive=True):
  """The update rule written out with numpy, step by step."""
  w, z = np.array([2.0, 1.0, -1.0]), np.array([0.5, -0.5])
  mw, mz = np.zeros(3), np.zeros(2)
  rho, trace = rho0, []
  for _ in range(steps):
    gw, gz = task_grad_np(w, z)
    loss = task_loss_np(w, z)
    w_adv = w + (rho / np.linalg.norm(gw) - mu) * gw  # only w is perturbed
    h = task_loss_np(w_adv, z) - loss
    aw, az = task_grad_np(w_adv, z)
    fw = gw + epsilon * aw
    fz = gz + LAM * z + epsilon * az  # grads = task + lambda * grad(0.5 |z|^2)
    sigma = 2 * h / rho**2
    if phi is None and h > 0:
      phi = rho0 * np.log1p(h)
    if phi is not None and adaptive:
      rho = min(rho_max, phi / np.log1p(h)) if h > 0 else rho_max
    mw, mz = momentum * mw + fw, momentum * mz + fz
    w, z = w - lr * mw, z - lr * mz
    trace.append((w.copy(), z.copy(), rho, h, sigma))
  return trace


def run_asga(steps, **kw):
  lr, momentum = kw.pop('lr'), kw.pop('momentum')
  params = {'w': jnp.array([2.0, 1.0, -1.0]), 'z': jnp.array([0.5, -0.5])}
  tx = optim.asga(optax.sgd(lr, momentum=momentum), perturb_mask={'w': True, 'z': False}, **kw)
  state = tx.init(params)
  a, c = jnp.asarray(A), jnp.asarray(C)

  def loss(p):
    d = p['w'] - c
    return 0.5 * d @ a @ d + 0.25 * jnp.sum((p['z'] - p['w'][:2]) ** 2)

  @jax.jit
  def step(params, state):
    value, task_grads = jax.value_and_grad(loss)(params)
    comp_grads = jax.grad(lambda p: 0.5 * jnp.sum(p['z'] ** 2))(params)
    grads = jax.tree.map(lambda g, cg: g + LAM * cg, task_grads, comp_grads)
    updates, state = tx.update(grads, state, params, value=value, task_grads=task_grads,
                               grad_fn=jax.value_and_grad(loss))
    return optax.apply_updates(params, updates), state

  trace = []
  for _ in range(steps):
    params, state = step(params, state)
    s = optim.sharpness_stats(state)
    trace.append((params['w'], params['z'], s['rho'], s['h'], s['sigma_max']))
  return trace


@pytest.mark.parametrize('phi', [None, 0.02])
def test_matches_numpy_reference_with_rho_adaptation(phi):
  hp = dict(rho0=0.1, rho_max=0.4, phi=phi, mu=0.05, epsilon=0.1, lr=0.05, momentum=0.9)
  ours, ref = run_asga(8, **hp), asga_reference(8, **hp)
  rhos = [r[2] for r in ref]
  assert len(set(np.round(rhos, 6))) > 3, 'rho must actually adapt in this test'
  for t, (mine, theirs) in enumerate(zip(ours, ref)):
    for a, b in zip(mine, theirs):
      np.testing.assert_allclose(np.asarray(a), b, rtol=2e-5, atol=1e-6, err_msg=f'step {t}')


def test_fixed_radius_matches_numpy_reference():
  hp = dict(rho0=0.1, rho_max=0.4, phi=None, mu=0.05, epsilon=0.1, lr=0.05, momentum=0.9,
            adaptive=False)
  ours, ref = run_asga(6, **hp), asga_reference(6, **hp)
  assert all(r[2] == 0.1 for r in ref) and all(float(o[2]) == pytest.approx(0.1) for o in ours)
  for t, (mine, theirs) in enumerate(zip(ours, ref)):
    for a, b in zip(mine, theirs):
      np.testing.assert_allclose(np.asarray(a), b, rtol=2e-5, atol=1e-6, err_msg=f'step {t}')


def test_epsilon_zero_reduces_to_base_optimizer():
  params = {'w': jnp.array([1.0, -2.0]), 'b': jnp.array(0.5)}
  loss = lambda p: jnp.sum((p['w'] * p['b'] - 1.0) ** 2)
  base = optax.sgd(0.1, momentum=0.9)
  tx = optim.asga(base, epsilon=0.0, perturb_mask={'w': True, 'b': True})
  s1, s2 = tx.init(params), base.init(params)
  p1 = p2 = params
  for _ in range(5):
    v, g = jax.value_and_grad(loss)(p1)
    u1, s1 = tx.update(g, s1, p1, value=v, grad_fn=jax.value_and_grad(loss))
    u2, s2 = base.update(jax.grad(loss)(p2), s2, p2)
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    jax.tree.map(np.testing.assert_array_equal, p1, p2)
  assert float(optim.sharpness_stats(s1)['h']) != 0.0  # sharpness is still measured


def test_only_masked_leaves_are_perturbed():
  params = {'conv': {'kernel': jnp.ones(3), 'w_logits': jnp.zeros(2)}, 'bn': {'scale': jnp.ones(3),
                                                                           'bias': jnp.zeros(3)}}
  grads = jax.tree.map(jnp.ones_like, params)
  seen = []

  def grad_fn(p):
    seen.append(p)
    return jnp.asarray(1.0), jax.tree.map(jnp.zeros_like, p)

  tx = optim.asga_gradient(rho0=0.3, mu=0.0)  # default mask: the 'weights' label only
  tx.update(grads, tx.init(params), params, value=jnp.asarray(0.0), grad_fn=grad_fn)
  moved = seen[0]
  np.testing.assert_allclose(moved['conv']['kernel'], 1.0 + 0.3 / np.sqrt(3))
  for path in (('conv', 'w_logits'), ('bn', 'scale'), ('bn', 'bias')):
    np.testing.assert_array_equal(moved[path[0]][path[1]], params[path[0]][path[1]])


def test_next_rho_guards():
  kw = dict(rho0=0.1, rho_max=0.5, calibrate=True)
  rho, phi = next_rho(jnp.asarray(0.1), jnp.asarray(jnp.nan), jnp.asarray(0.2), **kw)
  assert float(rho) == pytest.approx(0.1) and float(phi) == pytest.approx(0.1 * np.log1p(0.2))
  rho2, _ = next_rho(rho, phi, jnp.asarray(0.05), **kw)  # smaller gap -> larger radius
  assert float(rho2) == pytest.approx(float(phi) / np.log1p(0.05))
  for h in (0.0, -0.3):  # no ascent: the rule's limit as h -> 0+
    assert float(next_rho(rho, phi, jnp.asarray(h), **kw)[0]) == 0.5
  for h in (jnp.nan, jnp.inf):  # non-finite: unchanged
    assert float(next_rho(jnp.asarray(0.2), phi, jnp.asarray(h), **kw)[0]) == pytest.approx(0.2)
  rho, phi = next_rho(jnp.asarray(0.1), jnp.asarray(jnp.nan), jnp.asarray(-0.1), **kw)
  assert float(rho) == pytest.approx(0.1) and np.isnan(float(phi))  # not calibrated yet


@pytest.mark.parametrize('kwargs,match', [({'rho0': 0.0}, 'rho0'), ({'rho_max': 0.05}, 'rho_max'),
                                          ({'phi': -1.0}, 'phi'), ({'mu': -0.1}, 'mu'),
                                          ({'epsilon': -1.0}, 'epsilon')])
def test_hyperparameter_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    optim.asga_gradient(**kwargs)


def test_missing_extra_args_error():
  tx = optim.asga(optax.sgd(0.1))
  params = {'kernel': jnp.ones(2)}
  with pytest.raises(ValueError, match='grad_fn'):
    tx.update(params, tx.init(params), params)


def test_supernet_with_multi_transform_schedule_and_jit():
  """Weights by SGD on a cosine schedule, logits by Adam, ASGA outside, jitted."""
  spec = QuantSpec(mode='supernet', w_bits=(2, 4), a_bits=(2, 4))
  model = models.ResNet((1, 1), (4, 8), 10, quant=spec)
  x = jax.random.normal(jax.random.key(0), (8, 8, 8, 3))
  y = jnp.arange(8) % 10
  variables = jax.jit(model.init)(jax.random.key(1, impl='rbg'), x)
  costs = collect_layer_costs(model, x)
  params, batch_stats = variables['params'], variables['batch_stats']
  labels = optim.param_labels(params)
  schedule = optax.cosine_decay_schedule(0.05, 10)
  base = optax.multi_transform({'weights': optax.sgd(schedule, momentum=0.9),
                                'norm': optax.sgd(schedule), 'quant': optax.sgd(schedule),
                                'arch': optax.adam(0.01)}, labels)
  tx = optim.asga(base)
  opt_state = tx.init(params)

  def task_loss(p, bs):
    logits, new = model.apply({'params': p, 'batch_stats': bs}, x, train=True,
                              mutable=['batch_stats'])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new['batch_stats']

  @jax.jit
  def step(params, bs, opt_state):
    (value, new_bs), task_grads = jax.value_and_grad(task_loss, has_aux=True)(params, bs)
    comp_grads = jax.grad(complexity_loss)(params, costs)
    grads = jax.tree.map(lambda g, c: g + 5.0 * c, task_grads, comp_grads)
    grad_fn = jax.value_and_grad(lambda p: task_loss(p, bs)[0])  # perturbed pass: stats dropped
    updates, opt_state = tx.update(grads, opt_state, params, value=value, task_grads=task_grads,
                                   grad_fn=grad_fn)
    return optax.apply_updates(params, updates), new_bs, opt_state, value

  p, bs, s = params, batch_stats, opt_state
  losses = []
  for _ in range(4):
    p, bs, s, value = step(p, bs, s)
    losses.append(float(value))
  stats = optim.sharpness_stats(s)
  assert np.isfinite(losses).all() and losses[-1] < losses[0]
  assert float(stats['rho']) > 0 and np.isfinite(float(stats['sigma_max']))
  logits_before = params['stage1']['block0']['conv1']['w_logits']
  logits_after = p['stage1']['block0']['conv1']['w_logits']
  assert not np.allclose(logits_before, logits_after)
  # A strong complexity weight lowers the expected BOPs.
  assert float(complexity_loss(p, costs)) < float(complexity_loss(params, costs))


def test_flatter_minimum_than_sgd_on_ill_conditioned_toy():
  """L(u, v) = (u.v - 1)^2 / 2: minima on u.v = 1 with lambda_max = |u|^2 + |v|^2.

  From an unbalanced start (|u| >> |v|, condition number ~ 90) SGD stops at a
  sharp point of the valley; ASGA's perturbed-gradient term walks along the
  valley towards the flattest point (lambda_max = 2).
  """
  loss = lambda p: 0.5 * (jnp.dot(p['u'], p['v']) - 1.0) ** 2
  p0 = {'u': jnp.array([3.0, 0.5]), 'v': jnp.array([0.2, 0.1])}

  def train(tx, steps=1500):
    p, s = p0, tx.init(p0)

    @jax.jit
    def step(p, s):
      value, g = jax.value_and_grad(loss)(p)
      u, s = tx.update(g, s, p, value=value, grad_fn=jax.value_and_grad(loss))
      return optax.apply_updates(p, u), s

    for _ in range(steps):
      p, s = step(p, s)
    eig = top_hessian_eigenvalue(loss, p, key=jax.random.key(0), num_iters=100).value
    return float(loss(p)), float(eig)

  sgd_loss, sgd_eig = train(optax.with_extra_args_support(optax.sgd(0.05)))
  asga_loss, asga_eig = train(optim.asga(optax.sgd(0.05), perturb_mask={'u': True, 'v': True}))
  assert sgd_loss < 1e-4 and asga_loss < 1e-3  # both reach the valley
  assert sgd_eig > 8.0 and asga_eig < 2.5, (sgd_eig, asga_eig)


def test_hessian_power_iteration_on_known_quadratic():
  a = jnp.diag(jnp.array([5.0, 2.0, 0.5]))
  eig, vec, _ = top_hessian_eigenvalue(lambda p: 0.5 * p @ a @ p, jnp.ones(3),
                                       key=jax.random.key(0), num_iters=200, tol=1e-7)
  assert float(eig) == pytest.approx(5.0, rel=1e-4)
  assert abs(float(vec[0])) == pytest.approx(1.0, rel=1e-3)
