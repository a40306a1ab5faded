"""ASGA: adaptive sharpness-aware gradient aligning, as an optax transform.

Ma et al., "Learning from Loss Landscape: Generalizable Mixed-Precision
Quantization via Adaptive Sharpness-Aware Gradient Aligning", ICML 2025,
eq. (10)-(12) and appendix A.3. One step at parameters t with task loss L:

  g      = grad L(t)                                    (the caller's pass)
  t_adv  = t + (rho / ||g|| - mu) * g                   (perturbed subtrees only)
  update = grads + epsilon * grad L(t_adv)              (second pass)
  h      = L(t_adv) - L(t)                              (surrogate gap)
  rho    <- min(rho_max, phi / ln(h + 1))               (for the next step)

``grads`` may already contain lambda * grad L_comp; g is the task-loss gradient
(``task_grads``, by default ``grads``). The sharpness estimate
sigma_max ~ 2 h / rho^2 is kept in the state for logging.

Choices the paper leaves open (documented defaults):

* ``phi=None`` calibrates phi = rho0 * ln(1 + h_1) at the first step with a
  positive gap, so rho starts at rho0 at any loss scale; phi is then fixed.
  While h is roughly proportional to rho (h ~ rho ||g|| for small radii), the
  rule answers a large radius with a small one: rho alternates from step to
  step, with rho_t * rho_{t+1} ~ phi / ||g||. Its geometric mean grows as the
  landscape flattens (h shrinks), the behaviour appendix A.3 describes.
* ``adaptive=False`` holds rho at rho0 (the paper's fixed-radius ablation).
* ``rho_max=0.5`` (five times rho0) bounds the radius.
* ``mu=0.01``: the alignment term evaluates the perturbed loss one plain SGD
  step (at the paper's search learning rate 0.01) ahead.
* A finite gap h <= 0 (the ascent step found no higher loss) sets rho to
  rho_max, the limit of the rule as h -> 0+; a non-finite h leaves rho and phi
  unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from asga_jax.optim import sharpness
from asga_jax.optim.sharpness import Mask

GradFn = Callable[[Any], tuple[jax.Array, Any]]


class ASGAState(NamedTuple):
  """State of :func:`asga_gradient`.

  Attributes:
    count: steps taken.
    rho: perturbation radius of the next step.
    phi: scale of the rho rule (NaN until calibrated when ``phi=None``).
    h: surrogate gap L(t_adv) - L(t) of the last step.
    sigma_max: 2 h / rho^2 of the last step (a top-eigenvalue estimate).
  """
  count: jax.Array
  rho: jax.Array
  phi: jax.Array
  h: jax.Array
  sigma_max: jax.Array


def _validate(rho0: float, rho_max: float, phi: float | None, mu: float, epsilon: float) -> None:
  if not rho0 > 0:
    raise ValueError(f'rho0 must be positive, got {rho0}.')
  if not rho_max >= rho0:
    raise ValueError(f'rho_max ({rho_max}) must be >= rho0 ({rho0}).')
  if phi is not None and not phi > 0:
    raise ValueError(f'phi must be positive or None (calibrated), got {phi}.')
  if not mu >= 0:
    raise ValueError(f'mu must be >= 0, got {mu}.')
  if not epsilon >= 0:
    raise ValueError(f'epsilon must be >= 0, got {epsilon}.')


def next_rho(rho: jax.Array, phi: jax.Array, h: jax.Array, *, rho0: float,
             rho_max: float, calibrate: bool) -> tuple[jax.Array, jax.Array]:
  """The adaptive rule rho = min(rho_max, phi / ln(h + 1)) with its guards."""
  finite = jnp.isfinite(h)
  positive = finite & (h > 0)
  if calibrate:
    phi = jnp.where(jnp.isnan(phi) & positive, rho0 * jnp.log1p(jnp.where(positive, h, 1.0)), phi)
  ready = ~jnp.isnan(phi)
  adaptive = jnp.minimum(rho_max, phi / jnp.log1p(jnp.where(positive, h, 1.0)))
  new = jnp.where(positive, adaptive, rho_max)
  return jnp.where(finite & ready, new, rho), phi


def asga_gradient(*, rho0: float = 0.1, rho_max: float = 0.5, phi: float | None = None,
                  mu: float = 0.01, epsilon: float = 0.1, perturb_mask: Mask | None = None,
                  adaptive: bool = True) -> optax.GradientTransformationExtraArgs:
  """Replaces the gradient with the ASGA gradient (chain it before an optimizer).

  Call its ``update`` with keyword arguments ``value`` (the task loss L(t)),
  ``grad_fn`` (``params -> (L, grad L)`` on the same batch, e.g.
  ``jax.value_and_grad(loss)``; with BatchNorm, let it use batch statistics
  and discard the ones it computes, so that running statistics come from the
  clean pass only) and optionally ``task_grads`` (grad L(t) when ``updates``
  also holds other terms such as lambda * grad L_comp).

  Args:
    rho0: perturbation radius of the first step (paper: 0.1).
    rho_max: upper bound of the adaptive radius.
    phi: scale of the rule rho = min(rho_max, phi / ln(h + 1)); None
      calibrates it so that rho = rho0 after the first step (see module doc).
    mu: gradient-alignment step: t_adv = t + (rho / ||g|| - mu) g.
    epsilon: weight of the perturbed loss's gradient (paper: 0.1). With 0 the
      output equals the input gradient (h is still measured).
    perturb_mask: which leaves are perturbed: a pytree of bools like params or
      a function of params returning one. Default: the network weights
      (``partition.label_mask('weights')``). Every leaf still receives
      epsilon * grad L(t_adv), architecture logits included.
    adaptive: False keeps rho = rho0 at every step (the fixed-radius ablation
      of the paper's Figure 4); h and sigma_max are still measured.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  _validate(rho0, rho_max, phi, mu, epsilon)

  def init_fn(params: Any) -> ASGAState:
    del params
    return ASGAState(count=jnp.zeros([], jnp.int32), rho=jnp.asarray(rho0, jnp.float32),
                     phi=jnp.asarray(jnp.nan if phi is None else phi, jnp.float32),
                     h=jnp.zeros([], jnp.float32), sigma_max=jnp.zeros([], jnp.float32))

  def update_fn(updates: Any, state: ASGAState, params: Any = None, *,
                value: jax.Array | None = None, grad_fn: GradFn | None = None,
                task_grads: Any = None, **extra_args: Any) -> tuple[Any, ASGAState]:
    del extra_args
    if params is None or value is None or grad_fn is None:
      raise ValueError('asga needs `params` and the keyword arguments `value` (task loss) '
                       'and `grad_fn` (params -> (loss, grads)): '
                       'tx.update(grads, state, params, value=loss, grad_fn=fn).')
    direction = updates if task_grads is None else task_grads
    h, adv_grads = sharpness.ascent(params, direction,
                                    sharpness.resolve_mask(perturb_mask, params), state.rho, mu,
                                    value, grad_fn)
    if epsilon:
      updates = jax.tree.map(lambda u, a: u + epsilon * a.astype(u.dtype), updates, adv_grads)
    rho, new_phi = state.rho, state.phi
    if adaptive:
      rho, new_phi = next_rho(state.rho, state.phi, h, rho0=rho0, rho_max=rho_max,
                              calibrate=phi is None)
    return updates, ASGAState(count=optax.safe_increment(state.count), rho=rho, phi=new_phi,
                              h=h, sigma_max=2.0 * h / jnp.square(state.rho))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def asga(base_optimizer: optax.GradientTransformation, *, rho0: float = 0.1,
         rho_max: float = 0.5, phi: float | None = None, mu: float = 0.01,
         epsilon: float = 0.1, perturb_mask: Mask | None = None, adaptive: bool = True
         ) -> optax.GradientTransformationExtraArgs:
  """ASGA around a base optimizer: ``optax.chain(asga_gradient(...), base)``.

  The base optimizer sees the whole parameter tree, so it can be an
  ``optax.multi_transform`` with separate optimizers for weights and
  architecture logits (see :mod:`asga_jax.optim.partition`).

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from asga_jax.optim import asga
    >>> loss = lambda p: jnp.sum((p['w'] - 1.0) ** 2)
    >>> params = {'w': jnp.zeros(3)}
    >>> tx = asga(optax.sgd(0.1), perturb_mask={'w': True})
    >>> state = tx.init(params)
    >>> for _ in range(3):
    ...   value, grads = jax.value_and_grad(loss)(params)
    ...   updates, state = tx.update(grads, state, params, value=value,
    ...                              grad_fn=jax.value_and_grad(loss))
    ...   params = optax.apply_updates(params, updates)
    >>> float(loss(params)) < 3.0
    True

  Args:
    base_optimizer: the optimizer that applies the ASGA gradient.
    rho0, rho_max, phi, mu, epsilon, perturb_mask, adaptive: see :func:`asga_gradient`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  return optax.chain(asga_gradient(rho0=rho0, rho_max=rho_max, phi=phi, mu=mu,
                                   epsilon=epsilon, perturb_mask=perturb_mask,
                                   adaptive=adaptive),
                     base_optimizer)
