"""SAQ: sharpness-aware quantization (Liu et al.), as an optax transform.

Where the perturbation e enters relative to the quantizer Q (SAQ, Table 1):

* case 1: L(Q(w) + e(w))     direction from grad w.r.t. w, added after Q;
* case 2: L(Q(w + e(w)))     direction from grad w.r.t. w, added before Q;
* case 3: L(Q(w) + e(Q(w)))  direction from grad w.r.t. Q(w), added after Q
                             (the paper's choice, and the default).

"After Q" uses the ``perturb`` collection of the quantized layers
(:data:`asga_jax.quant.layers.PERTURB`): ``grad_fn(params,
weight_perturbation)`` evaluates the model with an additive perturbation of
each quantized kernel, and ``quantized_grads`` (the gradient w.r.t. that
collection at zero, i.e. dL/dQ(w), a by-product of the clean backward pass)
gives case 3 its direction. Other perturbed leaves (biases, BatchNorm affine,
optionally clipping levels) move in parameter space along their own gradient,
under one global norm, as in SAQ's code (defaults: biases and BatchNorm in,
clipping levels out).

The update is g_s + g with g_s the gradient at the perturbed point and g the
clean one (the final objective L(w + e_q + e_s) + L(Q(w)), eq. 15), or g_s
alone with ``vanilla_loss=False``. Efficient training (``tau > 1``): g_s is
computed every ``tau`` steps; its component orthogonal to g, g_v, is kept, and
in between g_s ~ g + beta * ||g|| * g_v / ||g_v||, so only N / tau of N steps
pay a second gradient evaluation. Which steps those are is decided inside the
jitted update with ``lax.cond`` on the step count, or, when the caller passes
``sharpness_step=True/False`` (a Python bool, i.e. two compiled steps chosen
by a host-side counter), statically. Prefer the latter on CPU: XLA:CPU does
not canonicalize the gradient convolutions inside a conditional's branch and
runs them about 20x slower; the trainer and the benchmark do so.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from asga_jax.optim import partition, sharpness
from asga_jax.optim.sharpness import Mask

CASES = (1, 2, 3)


class SAQState(NamedTuple):
  """State of :func:`saq_gradient`.

  Attributes:
    count: steps taken.
    rho: the perturbation radius.
    h: surrogate gap of the last step with a sharpness gradient.
    sigma_max: 2 h / rho^2 of that step.
    orthogonal: g_v, the part of g_s orthogonal to g (efficient training;
      an empty tuple when ``tau == 1``).
  """
  count: jax.Array
  rho: jax.Array
  h: jax.Array
  sigma_max: jax.Array
  orthogonal: Any


def _paths(tree: Any) -> set[str]:
  return {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)}


def _pick_like(template: Any, tree: Any) -> Any:
  """The leaves of ``tree`` at the key paths of ``template`` (structured like it)."""
  by_path = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}
  return jax.tree_util.tree_map_with_path(lambda p, _: by_path[jax.tree_util.keystr(p)], template)


def _orthogonal(gs: Any, g: Any) -> Any:
  """gs minus its projection on g."""
  coef = optax.tree.vdot(gs, g) / jnp.maximum(optax.tree.vdot(g, g), 1e-30)
  return jax.tree.map(lambda a, b: a - coef * b, gs, g)


def saq_gradient(*, rho: float = 0.5, case: int = 3, perturb_mask: Mask | None = None,
                 vanilla_loss: bool = True, tau: int = 1, beta: float = 0.7
                 ) -> optax.GradientTransformationExtraArgs:
  """SAQ's gradient (chain it before an optimizer).

  Call ``update(grads, state, params, value=L, grad_fn=fn, task_grads=g,
  quantized_grads=gq)`` where ``fn(params, weight_perturbation=None) ->
  (L, grad L)``; ``quantized_grads`` (dL/dQ(w), structured like the model's
  ``perturb`` collection) is required for cases 1 and 3. With ``tau > 1``,
  the optional keyword ``sharpness_step`` (a Python bool, True exactly when
  ``count % tau == 0``) fixes the kind of step at trace time instead of a
  ``lax.cond`` (see the module docstring).

  Example (SAQ-ET with two compiled steps)::

    tx = asga_jax.optim.saq(optax.sgd(0.1, momentum=0.9), rho=0.5, tau=4)
    # train_step(state, batch, sharpness_step) ends with
    #   tx.update(g, opt_state, params, ..., sharpness_step=sharpness_step)
    steps = {phase: jax.jit(functools.partial(train_step, sharpness_step=phase))
             for phase in (True, False)}
    for i, batch in enumerate(batches):
      state = steps[i % 4 == 0](state, batch)

  Args:
    rho: perturbation radius (SAQ uses 0.3-0.95 for ResNets on ImageNet); the
      quantized weights are perturbed in the quantizer's normalized domain.
    case: 1, 2 or 3 (see the module docstring).
    perturb_mask: which parameter leaves are perturbed (default: labels
      'weights' and 'norm', i.e. kernels, biases and BatchNorm affine; add
      'quant' for clipping levels). Quantized kernels move after Q in cases
      1 and 3.
    vanilla_loss: add the clean gradient g (eq. 15).
    tau: compute the sharpness gradient every ``tau`` steps (1: every step).
    beta: scale of the reused orthogonal component between those steps.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  if case not in CASES:
    raise ValueError(f'SAQ case must be one of {CASES}, got {case!r}.')
  if not rho > 0:
    raise ValueError(f'rho must be positive, got {rho}.')
  if not isinstance(tau, int) or tau < 1:
    raise ValueError(f'tau must be an integer >= 1, got {tau!r}.')
  if not beta >= 0:
    raise ValueError(f'beta must be >= 0, got {beta}.')
  default_mask = partition.label_mask(partition.WEIGHTS, partition.NORM)

  def init_fn(params: Any) -> SAQState:
    orthogonal = jax.tree.map(jnp.zeros_like, params) if tau > 1 else ()
    # Distinct arrays per field: one array in two places breaks buffer donation.
    return SAQState(count=jnp.zeros([], jnp.int32), rho=jnp.asarray(rho, jnp.float32),
                    h=jnp.zeros([], jnp.float32), sigma_max=jnp.zeros([], jnp.float32),
                    orthogonal=orthogonal)

  def sharpness_gradient(params, direction, quantized_grads, value, grad_fn, rho_):
    """(h, g_s): the perturbed pass of the configured case."""
    mask = sharpness.resolve_mask(perturb_mask, params, default_mask)
    if case == 2:
      return sharpness.ascent(params, direction, mask, rho_, 0.0, value, grad_fn)
    if quantized_grads is None:
      raise ValueError(f'SAQ case {case} needs `quantized_grads` (dL/dQ(w), the gradient '
                       "w.r.t. the model's `perturb` collection at zero).")
    quantized = _paths(quantized_grads)
    mask = jax.tree_util.tree_map_with_path(
        lambda p, m: m and jax.tree_util.keystr(p) not in quantized, mask)  # moved after Q
    chunked = sharpness.is_chunked(value)
    zeros = jax.tree.map(jnp.zeros_like, sharpness.chunk_mean(quantized_grads, chunked))
    weight_dir = quantized_grads if case == 3 else _pick_like(quantized_grads, direction)
    qmask = jax.tree.map(lambda _: True, zeros)
    return sharpness.ascent((params, zeros), (direction, weight_dir), (mask, qmask), rho_, 0.0,
                            value, lambda point: grad_fn(point[0], point[1]))

  def update_fn(updates, state, params=None, *, value=None, grad_fn=None, task_grads=None,
                quantized_grads=None, sharpness_step=None, **extra_args):
    del extra_args
    if params is None or value is None or grad_fn is None:
      raise ValueError('SAQ needs `params` and the keyword arguments `value` (task loss), '
                       '`grad_fn` (params, weight_perturbation -> (loss, grads)) and, for '
                       'cases 1 and 3, `quantized_grads`.')
    chunked = sharpness.is_chunked(value)
    direction = updates if task_grads is None else task_grads
    clean = sharpness.chunk_mean(direction, chunked)

    def full(_):
      h, gs = sharpness_gradient(params, direction, quantized_grads, value, grad_fn, state.rho)
      return h, gs, (_orthogonal(gs, clean) if tau > 1 else ())

    def reuse(_):
      gv = state.orthogonal
      scale = beta * optax.tree.norm(clean) / jnp.maximum(optax.tree.norm(gv), 1e-30)
      return state.h, jax.tree.map(lambda g, v: g + scale * v, clean, gv), gv

    if sharpness_step is not None and not isinstance(sharpness_step, bool):
      raise TypeError('sharpness_step must be a Python bool (a static choice), got '
                      f'{type(sharpness_step).__name__}; leave it out to decide in-graph.')
    if tau == 1 or sharpness_step is True:
      h, gs, orthogonal = full(None)
    elif sharpness_step is False:
      h, gs, orthogonal = reuse(None)
    else:
      h, gs, orthogonal = jax.lax.cond(state.count % tau == 0, full, reuse, None)
    base = updates if vanilla_loss else jax.tree.map(lambda u, c: u - c, updates, clean)
    updates = jax.tree.map(lambda u, s: u + s, base, gs)
    return updates, SAQState(count=optax.safe_increment(state.count), rho=state.rho, h=h,
                             sigma_max=2.0 * h / jnp.square(state.rho), orthogonal=orthogonal)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def saq(base_optimizer: optax.GradientTransformation, **kwargs: Any
        ) -> optax.GradientTransformationExtraArgs:
  """``optax.chain(saq_gradient(**kwargs), base_optimizer)``."""
  return optax.chain(saq_gradient(**kwargs), base_optimizer)
