"""SAM, SAQ (cases 1-3, efficient training), m-sharpness and the probe."""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from asga_jax import optim
from asga_jax.quant import LayerBits, QuantDense, QuantSpec
from asga_jax.quant.layers import PERTURB
from asga_jax.train import steps

A = np.array([[2.0, 0.3, 0.0], [0.3, 1.0, 0.1], [0.0, 0.1, 0.5]])
C = np.array([1.0, -1.0, 0.5])
LR, MOMENTUM, LAM = 0.05, 0.9, 0.2


# --------------------------------------------------------------------------- SAM
def test_sam_matches_optax_contrib_sam():
  key = jax.random.key(0)
  x = jax.random.normal(key, (16, 5))
  y = jnp.sin(x @ jnp.arange(1.0, 6.0))
  loss = lambda p: jnp.mean((jnp.tanh(x @ p['w1']) @ p['w2'] + p['b'] - y) ** 2)
  params = {'w1': jax.random.normal(jax.random.key(1), (5, 4)) * 0.5,
            'w2': jax.random.normal(jax.random.key(2), (4,)), 'b': jnp.zeros(())}
  everything = jax.tree.map(lambda _: True, params)
  ours = optim.sam(optax.sgd(0.1, momentum=0.9), rho=0.07, perturb_mask=everything)
  peer = optax.contrib.sam(optax.sgd(0.1, momentum=0.9),
                           optax.chain(optax.contrib.normalize(), optax.sgd(0.07)),
                           sync_period=2, opaque_mode=True)
  p1, p2, s1, s2 = params, params, ours.init(params), peer.init(params)
  for _ in range(6):
    v, g = jax.value_and_grad(loss)(p1)
    u1, s1 = ours.update(g, s1, p1, value=v, grad_fn=jax.value_and_grad(loss))
    u2, s2 = peer.update(jax.grad(loss)(p2), s2, p2, grad_fn=lambda p, _: jax.grad(loss)(p))
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p1, p2)


def _quadratic(p):
  d = p['w'] - jnp.asarray(C)
  return 0.5 * d @ jnp.asarray(A) @ d + 0.5 * jnp.sum((p['b'] - p['w'][:2]) ** 2)


def _quadratic_np(w, b):
  d = w - C
  return 0.5 * d @ A @ d + 0.5 * np.sum((b - w[:2]) ** 2)


def _quadratic_grad_np(w, b):
  gb = b - w[:2]
  gw = A @ (w - C)
  gw[:2] -= gb
  return gw, gb


def _run(tx, steps_, extra=None):
  """Momentum-SGD steps on the quadratic; grads include LAM * b (a complexity-like term)."""
  params = {'w': jnp.array([2.0, 1.0, -1.0]), 'b': jnp.array([0.5, -0.5])}
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    value, task_grads = jax.value_and_grad(_quadratic)(params)
    grads = {'w': task_grads['w'], 'b': task_grads['b'] + LAM * params['b']}
    updates, state = tx.update(grads, state, params, value=value, task_grads=task_grads,
                               grad_fn=jax.value_and_grad(_quadratic), **(extra or {}))
    return optax.apply_updates(params, updates), state

  trace = []
  for _ in range(steps_):
    params, state = step(params, state)
    trace.append((params['w'], params['b'], optim.sharpness_stats(state).get('h')))
  return trace


def test_sam_matches_numpy_reference_keeping_other_gradient_terms():
  rho = 0.1
  w, b = np.array([2.0, 1.0, -1.0]), np.array([0.5, -0.5])
  mw, mb, ref = np.zeros(3), np.zeros(2), []
  for _ in range(5):
    gw, gb = _quadratic_grad_np(w, b)
    n = np.sqrt(np.sum(gw**2) + np.sum(gb**2))
    wa, ba = w + rho * gw / n, b + rho * gb / n
    h = _quadratic_np(wa, ba) - _quadratic_np(w, b)
    aw, ab = _quadratic_grad_np(wa, ba)
    mw, mb = MOMENTUM * mw + aw, MOMENTUM * mb + ab + LAM * b
    w, b = w - LR * mw, b - LR * mb
    ref.append((w.copy(), b.copy(), h))
  ours = _run(optim.sam(optax.sgd(LR, momentum=MOMENTUM), rho=rho,
                        perturb_mask={'w': True, 'b': True}), 5)
  for (a1, a2, a3), (r1, r2, r3) in zip(ours, ref):
    np.testing.assert_allclose(a1, r1, rtol=1e-5)
    np.testing.assert_allclose(a2, r2, rtol=1e-5)
    np.testing.assert_allclose(a3, r3, rtol=1e-4)


def test_probe_measures_without_changing_the_update():
  base = optax.sgd(LR, momentum=MOMENTUM)
  probed = _run(optax.chain(optim.sharpness_probe(rho=0.1, perturb_mask={'w': True, 'b': True}),
                            base), 4)
  plain = _run(optax.with_extra_args_support(base), 4)
  sam_h = _run(optim.sam(base, rho=0.1, perturb_mask={'w': True, 'b': True}), 1)[0][2]
  for (w1, b1, h), (w2, b2, _) in zip(probed, plain):
    np.testing.assert_array_equal(w1, w2)
    np.testing.assert_array_equal(b1, b2)
    assert float(h) > 0
  np.testing.assert_allclose(probed[0][2], sam_h, rtol=1e-6)  # same gap on the same first point


# --------------------------------------------------------------------------- SAQ
# A toy "quantized layer": the quantized weights in the normalized domain are
# z = 2 w (+ the perturbation e added after quantization); b is a bias-like
# parameter perturbed in parameter space. L = 0.5 (z - C)' A (z - C) + 0.5 |b - z[:2]|^2.
def _saq_loss(params, wp=None):
  z = 2.0 * params['layer']['kernel'] + (0.0 if wp is None else wp['layer']['kernel'])
  d = z - jnp.asarray(C)
  return 0.5 * d @ jnp.asarray(A) @ d + 0.5 * jnp.sum((params['bias'] - z[:2]) ** 2)


def _saq_np(w, b, e):
  z = 2.0 * w + e
  d = z - C
  loss = 0.5 * d @ A @ d + 0.5 * np.sum((b - z[:2]) ** 2)
  gz = A @ d
  gz[:2] -= b - z[:2]
  return loss, gz, b - z[:2]  # loss, dL/dz (= dL/dQ(w)), dL/db


def saq_reference(case, steps_, *, rho, vanilla, tau, beta):
  w, b = np.array([1.0, 0.2, -0.4]), np.array([0.3, -0.2])
  mw, mb, gv_w, gv_b, h, out = np.zeros(3), np.zeros(2), None, None, 0.0, []
  for t in range(steps_):
    loss, gz, gb = _saq_np(w, b, 0.0)
    gw = 2.0 * gz
    if t % tau == 0:
      dw = gz if case == 3 else gw
      n = np.sqrt(np.sum(dw**2) + np.sum(gb**2))
      if case == 2:
        w_adv, e = w + rho * gw / n, 0.0
      else:
        w_adv, e = w, rho * dw / n
      adv_loss, az, ab = _saq_np(w_adv, b + rho * gb / n, e)
      h = adv_loss - loss
      gs_w, gs_b = 2.0 * az, ab
      coef = (gs_w @ gw + gs_b @ gb) / (gw @ gw + gb @ gb)
      gv_w, gv_b = gs_w - coef * gw, gs_b - coef * gb
    else:
      scale = beta * np.sqrt(gw @ gw + gb @ gb) / np.sqrt(gv_w @ gv_w + gv_b @ gv_b)
      gs_w, gs_b = gw + scale * gv_w, gb + scale * gv_b
    fw = gs_w + (gw if vanilla else 0.0)
    fb = gs_b + (gb if vanilla else 0.0) + LAM * b
    mw, mb = MOMENTUM * mw + fw, MOMENTUM * mb + fb
    w, b = w - LR * mw, b - LR * mb
    out.append((w.copy(), b.copy(), h))
  return out


def saq_ours(case, steps_, *, rho, vanilla, tau, beta, static_phases=False):
  params = {'layer': {'kernel': jnp.array([1.0, 0.2, -0.4])}, 'bias': jnp.array([0.3, -0.2])}
  zeros = {'layer': {'kernel': jnp.zeros(3)}}
  tx = optim.saq(optax.sgd(LR, momentum=MOMENTUM), rho=rho, case=case, vanilla_loss=vanilla,
                 tau=tau, beta=beta, perturb_mask={'layer': {'kernel': True}, 'bias': True})
  state = tx.init(params)

  def step(params, state, **phase):
    value, (task_grads, qgrads) = jax.value_and_grad(_saq_loss, argnums=(0, 1))(params, zeros)
    grads = {'layer': task_grads['layer'], 'bias': task_grads['bias'] + LAM * params['bias']}
    grad_fn = lambda p, wp=None: jax.value_and_grad(lambda q: _saq_loss(q, wp))(p)
    updates, state = tx.update(grads, state, params, value=value, grad_fn=grad_fn,
                               task_grads=task_grads, quantized_grads=qgrads, **phase)
    return optax.apply_updates(params, updates), state

  phases = {p: jax.jit(functools.partial(step, sharpness_step=p)) for p in (True, False)}
  out = []
  for t in range(steps_):
    step_t = phases[t % tau == 0] if static_phases else jax.jit(step)
    params, state = step_t(params, state)
    out.append((params['layer']['kernel'], params['bias'], optim.sharpness_stats(state)['h']))
  return out


@pytest.mark.parametrize('case,vanilla,tau,static', [
    (1, True, 1, False), (2, True, 1, False), (3, True, 1, False), (3, False, 1, False),
    (3, True, 3, False), (3, True, 3, True)])
def test_saq_matches_numpy_reference(case, vanilla, tau, static):
  hp = dict(rho=0.3, vanilla=vanilla, tau=tau, beta=0.7)
  mine = saq_ours(case, 7, **hp, static_phases=static)
  for t, (mine, ref) in enumerate(zip(mine, saq_reference(case, 7, **hp))):
    for a, b in zip(mine, ref):
      np.testing.assert_allclose(np.asarray(a), b, rtol=2e-5, atol=1e-6,
                                 err_msg=f'case {case}, step {t}')


def _perturbed_pass(case, rho):
  """A 2-bit QuantDense under SAQ; returns (params, perturbed params, the perturbation
  of Q(w), the weights the perturbed pass used)."""
  layer = QuantDense(3, use_bias=False, quant=QuantSpec(mode='fixed', uniform=LayerBits(2, None)),
                     name='fc')
  x = jnp.eye(4)  # output = the layer's effective weights
  variables = layer.init(jax.random.key(0), x)
  params = flax.core.unfreeze(variables['params'])
  target = jax.random.normal(jax.random.key(1), (4, 3))
  apply = lambda p, wp: layer.apply({'params': p} if wp is None else {'params': p, PERTURB: wp}, x)
  loss = lambda p, wp=None: jnp.sum((apply(p, wp) - target) ** 2)
  seen = []

  def grad_fn(p, wp=None):
    seen.append((p, wp, apply(p, wp)))
    return jax.value_and_grad(lambda q: loss(q, wp))(p)

  zeros = jax.tree.map(jnp.zeros_like, variables[PERTURB])
  value, (grads, qgrads) = jax.value_and_grad(loss, argnums=(0, 1))(params, zeros)
  tx = optim.saq_gradient(rho=rho, case=case, perturb_mask={'kernel': True, 'w_clip': False})
  tx.update(grads, tx.init(params), params, value=value, grad_fn=grad_fn, task_grads=grads,
            quantized_grads=qgrads)
  return (params, *seen[0])


def _normalized(weights, kernel, alpha):
  """Weights in the quantizer's domain, in units of the clipping level."""
  return (np.asarray(weights) - np.mean(kernel)) / (np.std(kernel) + 1e-8) / abs(alpha)


def test_saq_case3_perturbs_after_quantization_case2_before():
  grid = np.array([-1, -1 / 3, 1 / 3, 1])  # 2-bit levels of alpha * (2 D(u) - 1)
  on_grid = lambda u: np.all(np.min(np.abs(u[..., None] - grid), axis=-1) < 1e-5)

  # Case 2: w itself moves; the perturbed pass quantizes w + e, so its weights
  # are on the 2-bit grid of the moved kernel (a small e can be rounded away).
  params, moved, wp, used = _perturbed_pass(2, rho=0.05)
  assert wp is None
  assert not np.array_equal(moved['kernel'], params['kernel'])
  assert on_grid(_normalized(used, moved['kernel'], params['w_clip']))

  # Case 3: w stays; e is added to Q(w) in the quantizer's normalized domain,
  # so the weights leave the grid by exactly e, with ||e|| = rho.
  params, moved, wp, used = _perturbed_pass(3, rho=0.05)
  np.testing.assert_array_equal(moved['kernel'], params['kernel'])
  e = np.asarray(wp['kernel'])
  np.testing.assert_allclose(np.linalg.norm(e), 0.05, rtol=1e-5)
  u = _normalized(used, params['kernel'], params['w_clip'])
  assert not on_grid(u)
  clean = QuantDense(3, use_bias=False, quant=QuantSpec(mode='fixed', uniform=LayerBits(2, None))
                     ).apply({'params': params}, jnp.eye(4))
  u_clean = _normalized(clean, params['kernel'], params['w_clip'])
  assert on_grid(u_clean)
  np.testing.assert_allclose(u - u_clean, e / abs(float(params['w_clip'])), atol=1e-5)


@pytest.mark.parametrize('static', [False, True])
def test_saq_efficient_training_counts_gradient_evaluations(static):
  params = {'layer': {'kernel': jnp.array([1.0, 0.2, -0.4])}, 'bias': jnp.array([0.3, -0.2])}
  zeros = {'layer': {'kernel': jnp.zeros(3)}}
  calls = []

  def grad_fn(p, wp=None):
    jax.debug.callback(lambda: calls.append(1))  # runs only when the branch executes
    return jax.value_and_grad(lambda q: _saq_loss(q, wp))(p)

  tau, n = 4, 12
  tx = optim.saq(optax.sgd(0.01), rho=0.3, tau=tau,
                 perturb_mask={'layer': {'kernel': True}, 'bias': True})
  state = tx.init(params)

  def step(params, state, **phase):
    value, (g, qg) = jax.value_and_grad(_saq_loss, argnums=(0, 1))(params, zeros)
    updates, state = tx.update(g, state, params, value=value, grad_fn=grad_fn, task_grads=g,
                               quantized_grads=qg, **phase)
    return optax.apply_updates(params, updates), state

  phases = {p: jax.jit(functools.partial(step, sharpness_step=p)) for p in (True, False)}
  for t in range(n):
    params, state = (phases[t % tau == 0] if static else jax.jit(step))(params, state)
  jax.effects_barrier()
  assert len(calls) == n // tau == 3


def test_saq_sharpness_step_must_be_static():
  params = {'kernel': jnp.ones(2)}
  tx = optim.saq_gradient(case=2, tau=2, perturb_mask={'kernel': True})
  with pytest.raises(TypeError, match='Python bool'):
    tx.update(params, tx.init(params), params, value=jnp.asarray(1.0),
              grad_fn=lambda p, wp=None: (jnp.asarray(1.0), p), sharpness_step=jnp.asarray(True))


def test_saq_case3_requires_quantized_grads():
  params = {'kernel': jnp.ones(2)}
  tx = optim.saq_gradient(case=3, perturb_mask={'kernel': True})
  with pytest.raises(ValueError, match='quantized_grads'):
    tx.update(params, tx.init(params), params, value=jnp.asarray(1.0),
              grad_fn=lambda p, wp=None: (jnp.asarray(1.0), p))


@pytest.mark.parametrize('kwargs,match', [({'case': 4}, 'case'), ({'rho': 0.0}, 'rho'),
                                          ({'tau': 0}, 'tau'), ({'beta': -1.0}, 'beta')])
def test_saq_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    optim.saq_gradient(**kwargs)


# --------------------------------------------------------------------------- m-sharpness
def test_m_sharpness_perturbs_each_sub_batch_along_its_own_gradient():
  x = jax.random.normal(jax.random.key(0), (8, 3))
  y = x @ jnp.array([1.0, -2.0, 0.5]) + 0.1
  params = {'w': jnp.array([0.2, 0.1, -0.3]), 'b': jnp.asarray(0.0)}
  loss = lambda p, xs, ys: jnp.mean((xs @ p['w'] + p['b'] - ys) ** 2)
  chunks_x, chunks_y = x.reshape(2, 4, 3), y.reshape(2, 4)
  value, task_grads = jax.vmap(jax.value_and_grad(loss), in_axes=(None, 0, 0))(params, chunks_x,
                                                                             chunks_y)
  grad_fn = lambda pk: jax.vmap(jax.value_and_grad(loss))(pk, chunks_x, chunks_y)
  grads = jax.tree.map(lambda g: jnp.mean(g, 0), task_grads)
  mask = {'w': True, 'b': True}
  tx = optim.sam_gradient(rho=0.1, perturb_mask=mask)
  out, state = tx.update(grads, tx.init(params), params, value=value, grad_fn=grad_fn,
                         task_grads=task_grads)
  # Reference: each sub-batch on its own, then the average.
  expected, gaps = [], []
  for i in range(2):
    v_i, g_i = jax.value_and_grad(loss)(params, chunks_x[i], chunks_y[i])
    norm = optax.tree.norm(g_i)
    adv = jax.tree.map(lambda p, g: p + 0.1 * g / norm, params, g_i)
    a_i, ga_i = jax.value_and_grad(loss)(adv, chunks_x[i], chunks_y[i])
    expected.append(ga_i)
    gaps.append(a_i - v_i)
  mean = jax.tree.map(lambda a, b: (a + b) / 2, *expected)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), out, mean)
  np.testing.assert_allclose(state.h, np.mean(gaps), rtol=1e-5)


def test_train_step_m_sharpness_runs_with_ghost_batch_norm():
  from asga_jax import models
  model = models.resnet8(10, width=4, quant=QuantSpec(mode='fixed', uniform=LayerBits(4, 4)))
  x = jax.random.normal(jax.random.key(0), (8, 8, 8, 3))
  batch = {'image': x, 'label': jnp.arange(8) % 10}
  variables = jax.jit(model.init)(jax.random.key(1, impl='rbg'), x)
  tx = optax.chain(optim.saq_gradient(rho=0.3), optax.sgd(0.01))
  state = steps.create_train_state(variables, tx)
  step = jax.jit(steps.make_train_step(model, tx, quantized_grads=True, m_sharpness=4))
  new_state, metrics = step(state, batch)
  assert np.isfinite(float(metrics['loss'])) and float(metrics['h']) != 0.0
  with pytest.raises(ValueError, match='multiple of m'):
    jax.jit(steps.make_train_step(model, tx, quantized_grads=True, m_sharpness=3))(state, batch)


def test_jit_train_step_static_phases_match_in_graph_choice():
  from asga_jax import models
  model = models.resnet8(10, width=4, quant=QuantSpec(mode='fixed', uniform=LayerBits(4, 4)))
  x = jax.random.normal(jax.random.key(0), (8, 8, 8, 3))
  batch = {'image': x, 'label': jnp.arange(8) % 10}
  variables = jax.jit(model.init)(jax.random.key(1, impl='rbg'), x)
  tx = optim.saq(optax.sgd(0.05, momentum=0.9), rho=0.3, tau=2)
  in_graph = jax.jit(steps.make_train_step(model, tx, quantized_grads=True))
  phased = steps.jit_train_step(model, tx, quantized_grads=True, sharpness_period=2)
  a = steps.create_train_state(variables, tx)
  b = steps.create_train_state(jax.tree.map(jnp.copy, variables), tx)  # donated
  for index in range(4):
    a, metrics_a = in_graph(a, batch)
    b, metrics_b = phased(b, batch, index)
    np.testing.assert_allclose(float(metrics_b['h']), float(metrics_a['h']), rtol=1e-5)
  for leaf_a, leaf_b in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_allclose(leaf_b, leaf_a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('tx', [
    optim.sam(optax.sgd(0.1), rho=0.05),
    optax.chain(optim.sharpness_probe(rho=0.05), optax.sgd(0.1)),
    optim.saq(optax.sgd(0.1), rho=0.5, tau=2), optim.asga(optax.sgd(0.1, momentum=0.9)),
], ids=['sam', 'probe', 'saq', 'asga'])
def test_optimizer_state_leaves_are_distinct_arrays(tx):
  """A train step donates its state; one array in two places would be donated twice."""
  params = {'w': jnp.ones((3,)), 'b': jnp.zeros(())}
  state = steps.create_train_state({'params': params}, tx)
  leaves = jax.tree.leaves(state)
  assert len({id(x) for x in leaves}) == len(leaves)
