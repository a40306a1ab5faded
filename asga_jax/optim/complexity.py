"""The complexity term of differentiable MPQ as an optax transform, with a BOPs target.

``complexity_penalty(costs, weight=lam)`` adds lam * grad L_comp(params) to the
updates (L_comp = expected BOPs / BOPs at 8/8 bits; it depends on the
architecture logits only). With ``target_bops`` it also adapts lam after every
step by log-space dual ascent on the argmax policy's BOPs B:

  lam <- clip(lam * exp(rate * (B / target - 1)), min_weight, max_weight)

so lam grows while the policy the search would return is over budget and
shrinks while it is under, and no lambda sweep is needed. The multiplicative
form keeps lam positive and makes ``rate`` independent of the model's scale.
:func:`asga_jax.quant.budget.fit_policy_to_budget` closes the last gap after
the search.

Put it first in the chain, so that sharpness-aware transforms see the full
gradient as ``updates`` (their ``task_grads`` stay the task gradient)::

  tx = optax.chain(
      optim.complexity_penalty(costs, target_bops=quant.budget.target_bops('3MP', costs)),
      optim.asga_gradient(),
      optax.sgd(0.01, momentum=0.9))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from asga_jax.quant.budget import argmax_bops
from asga_jax.quant.complexity import LayerCost, complexity_loss


class ComplexityState(NamedTuple):
  """State of :func:`complexity_penalty`.

  Attributes:
    weight: lambda, the weight of L_comp in the next step.
    argmax_bops: BOPs per example of the argmax policy at the last step.
  """
  weight: jax.Array
  argmax_bops: jax.Array


def complexity_penalty(costs: Sequence[LayerCost], *, weight: float = 0.1,
                       target_bops: float | None = None, rate: float = 0.05,
                       min_weight: float = 1e-4, max_weight: float = 100.0
                       ) -> optax.GradientTransformation:
  """Adds ``weight * grad L_comp``; adapts the weight toward ``target_bops`` if given.

  Args:
    costs: the supernet's layer costs (:func:`asga_jax.quant.collect_layer_costs`).
    weight: lambda (fixed), or its initial value with a target.
    target_bops: BOPs per example to reach (see
      :func:`asga_jax.quant.budget.target_bops`); None keeps lambda fixed.
    rate: dual-ascent step in log space per step (0.05: lambda doubles in
      about 14 steps at 100% over budget).
    min_weight, max_weight: bounds of lambda.

  Returns:
    An ``optax.GradientTransformation``; its update needs ``params``.
  """
  if not weight >= 0:
    raise ValueError(f'the complexity weight (lambda) must be >= 0, got {weight}.')
  if target_bops is not None:
    if not target_bops > 0:
      raise ValueError(f'target_bops must be positive, got {target_bops}.')
    if not (rate > 0 and 0 < min_weight <= weight <= max_weight):
      raise ValueError('with a BOPs target, rate must be > 0 and min_weight <= weight <= '
                       f'max_weight with min_weight > 0; got rate={rate}, '
                       f'weight={weight}, bounds=({min_weight}, {max_weight}).')

  def init_fn(params: Any) -> ComplexityState:
    return ComplexityState(weight=jnp.asarray(weight, jnp.float32),
                           argmax_bops=argmax_bops(params, costs))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError('complexity_penalty needs `params` (the architecture logits).')
    comp_grads = jax.grad(complexity_loss)(params, costs)
    updates = jax.tree.map(lambda u, c: u + state.weight * c.astype(u.dtype), updates,
                           comp_grads)
    bops = argmax_bops(params, costs)
    new_weight = state.weight
    if target_bops is not None:
      new_weight = jnp.clip(state.weight * jnp.exp(rate * (bops / target_bops - 1.0)),
                            min_weight, max_weight)
    return updates, ComplexityState(weight=new_weight, argmax_bops=bops)

  return optax.GradientTransformation(init_fn, update_fn)


def complexity_stats(opt_state: Any) -> dict[str, jax.Array]:
  """lambda and the argmax policy's GBOPs from a :class:`ComplexityState` in ``opt_state``."""
  for node in jax.tree.leaves(opt_state, is_leaf=lambda n: isinstance(n, ComplexityState)):
    if isinstance(node, ComplexityState):
      return {'comp_weight': node.weight, 'argmax_gbops': node.argmax_bops / 1e9}
  return {}
