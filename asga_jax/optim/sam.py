"""SAM (Foret et al., 2021) and a sharpness probe, as optax transforms.

SAM: t_adv = t + rho * g / ||g||, and the task-loss gradient is replaced by
grad L(t_adv) (other terms of the gradient, e.g. lambda * grad L_comp, are
kept). With the perturbation on every leaf it equals ``optax.contrib.sam``
(opaque mode, sync_period=2, normalized-SGD adversary).

The probe measures the same surrogate gap h = L(t_adv) - L(t) and
sigma_max ~ 2 h / rho^2 without changing the gradient: the sharpness of a
plain (e.g. EdMIPS) run, as the ASGA paper's baseline column in Table 3.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from asga_jax.optim import sharpness
from asga_jax.optim.sharpness import Mask


class SAMState(NamedTuple):
  """State of :func:`sam_gradient` and :func:`sharpness_probe`.

  Attributes:
    count: steps taken.
    rho: the (fixed) perturbation radius.
    h: surrogate gap of the last step.
    sigma_max: 2 h / rho^2 of the last step.
  """
  count: jax.Array
  rho: jax.Array
  h: jax.Array
  sigma_max: jax.Array


def _sam_like(rho: float, perturb_mask: Mask | None, apply: bool
              ) -> optax.GradientTransformationExtraArgs:
  if not rho > 0:
    raise ValueError(f'rho must be positive, got {rho}.')

  def init_fn(params: Any) -> SAMState:
    del params
    # Distinct arrays per field: one array in two places breaks buffer donation.
    return SAMState(count=jnp.zeros([], jnp.int32), rho=jnp.asarray(rho, jnp.float32),
                    h=jnp.zeros([], jnp.float32), sigma_max=jnp.zeros([], jnp.float32))

  def update_fn(updates, state, params=None, *, value=None, grad_fn=None, task_grads=None,
                **extra_args):
    del extra_args
    if params is None or value is None or grad_fn is None:
      raise ValueError('SAM needs `params` and the keyword arguments `value` (task loss) and '
                       '`grad_fn` (params -> (loss, grads)).')
    chunked = sharpness.is_chunked(value)
    if chunked and task_grads is None:
      raise ValueError('per-sub-batch `value` (m-sharpness) needs per-sub-batch `task_grads`.')
    direction = updates if task_grads is None else task_grads
    h, adv_grads = sharpness.ascent(params, direction,
                                    sharpness.resolve_mask(perturb_mask, params), state.rho,
                                    0.0, value, grad_fn)
    if apply:
      if task_grads is None:
        updates = adv_grads
      else:  # swap the task gradient for the perturbed one; keep the other terms
        clean = sharpness.chunk_mean(task_grads, chunked)
        updates = jax.tree.map(lambda u, c, a: u - c + a, updates, clean, adv_grads)
    return updates, SAMState(count=optax.safe_increment(state.count), rho=state.rho, h=h,
                             sigma_max=2.0 * h / jnp.square(state.rho))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def sam_gradient(*, rho: float = 0.05, perturb_mask: Mask | None = None
                 ) -> optax.GradientTransformationExtraArgs:
  """Replaces the task-loss gradient by SAM's (chain it before an optimizer).

  Args:
    rho: perturbation radius (SAM's default 0.05).
    perturb_mask: which leaves are perturbed (default: the network weights,
      ``partition.label_mask('weights')``); every leaf gets the gradient at
      the perturbed point.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` called as
    ``update(grads, state, params, value=loss, grad_fn=fn[, task_grads=g])``.
  """
  return _sam_like(rho, perturb_mask, apply=True)


def sam(base_optimizer: optax.GradientTransformation, *, rho: float = 0.05,
        perturb_mask: Mask | None = None) -> optax.GradientTransformationExtraArgs:
  """``optax.chain(sam_gradient(...), base_optimizer)``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from asga_jax.optim import sam
    >>> loss = lambda p: jnp.sum((p['w'] - 1.0) ** 2)
    >>> params = {'w': jnp.zeros(3)}
    >>> tx = sam(optax.sgd(0.1), rho=0.05, perturb_mask={'w': True})
    >>> state = tx.init(params)
    >>> value, grads = jax.value_and_grad(loss)(params)
    >>> updates, state = tx.update(grads, state, params, value=value,
    ...                            grad_fn=jax.value_and_grad(loss))
    >>> float(state[0].h) > 0
    True
  """
  return optax.chain(sam_gradient(rho=rho, perturb_mask=perturb_mask), base_optimizer)


def sharpness_probe(*, rho: float = 0.1, perturb_mask: Mask | None = None
                    ) -> optax.GradientTransformationExtraArgs:
  """Measures h and sigma_max at radius ``rho`` and leaves the gradient unchanged.

  Costs a second gradient evaluation per step, like SAM.
  """
  return _sam_like(rho, perturb_mask, apply=False)
