"""Machinery shared by the sharpness-aware transforms (SAM, ASGA, SAQ).

Calling convention of every transform's ``update``: the gradient to descend
as ``updates`` and, as keyword arguments, ``value`` (the task loss L(t)),
``grad_fn`` (``params -> (L, grad L)`` on the same batch) and optionally
``task_grads`` (grad L(t), when ``updates`` also holds other terms such as
lambda * grad L_comp).

m-sharpness: when ``value`` has a leading axis, every entry belongs to one
sub-batch; ``task_grads`` then has the same leading axis, each sub-batch is
perturbed along its own gradient, and ``grad_fn`` maps per-sub-batch
parameters (leading axis) to per-sub-batch losses and gradients. The
perturbed gradients and gaps are averaged over sub-batches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from asga_jax.optim import partition

Mask = Any  # a pytree of Python bools like params, or a function params -> that


def resolve_mask(mask: Mask | None, params: Any, default: Mask | None = None) -> Any:
  """A pytree of Python bools; ``None`` falls back to ``default``, then to the weights."""
  if mask is None:
    mask = default if default is not None else partition.label_mask(partition.WEIGHTS)
  return mask(params) if callable(mask) else mask


def masked_norm(tree: Any, mask: Any) -> jax.Array:
  """Euclidean norm over the leaves where ``mask`` is True."""
  leaves = [x for x, m in zip(jax.tree.leaves(tree), jax.tree.leaves(mask)) if m]
  if not leaves:
    raise ValueError('the perturbation mask selects no parameters.')
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def perturb(point: Any, direction: Any, mask: Any, rho: jax.Array, mu: float = 0.0
            ) -> tuple[Any, jax.Array]:
  """point + (rho / ||d|| - mu) * d on the masked leaves; returns (moved, ||d||).

  The norm runs over the masked leaves only; a zero direction gives no move.
  """
  norm = masked_norm(direction, mask)
  scale = jnp.where(norm > 0, rho / jnp.where(norm > 0, norm, 1.0), 0.0) - mu
  moved = jax.tree.map(lambda p, d, m: (p + scale * d).astype(p.dtype) if m else p,
                       point, direction, mask)
  # Without the barrier XLA merges the work that the clean and perturbed passes
  # share through the unperturbed leaves (logits, clipping levels), keeps those
  # buffers alive across both passes and fuses less: 5% slower on a CPU ResNet-20.
  return jax.lax.optimization_barrier(moved), norm


def is_chunked(value: jax.Array) -> bool:
  """Whether the loss comes per sub-batch (m-sharpness)."""
  return jnp.ndim(value) == 1


def chunk_mean(tree: Any, chunked: bool) -> Any:
  return jax.tree.map(lambda x: jnp.mean(x, axis=0), tree) if chunked else tree


def ascent(point: Any, direction: Any, mask: Any, rho: jax.Array, mu: float, value: jax.Array,
           evaluate: Callable[[Any], tuple[jax.Array, Any]]) -> tuple[jax.Array, Any]:
  """Evaluates the loss gradient at the perturbed point.

  Args:
    point: where to perturb from (params, or a tuple holding them).
    direction: ascent direction(s), structured like ``point`` (leading
      sub-batch axis when ``value`` is per sub-batch).
    mask: which leaves of ``point`` move.
    rho, mu: move by (rho / ||d|| - mu) * d.
    value: L at ``point`` (scalar, or one per sub-batch).
    evaluate: moved point -> (loss, gradient w.r.t. the params).

  Returns:
    (surrogate gap h = L(moved) - L(point), gradient at the moved point),
    averaged over sub-batches.
  """
  if is_chunked(value):
    moved = jax.vmap(lambda d: perturb(point, d, mask, rho, mu)[0])(direction)
  else:
    moved, _ = perturb(point, direction, mask, rho, mu)
  adv_value, adv_grads = evaluate(moved)
  chunked = is_chunked(value)
  h = jnp.mean(adv_value - value).astype(jnp.float32)
  return h, chunk_mean(adv_grads, chunked)


def sharpness_stats(opt_state: Any) -> dict[str, jax.Array]:
  """rho, h and sigma_max from the first sharpness state inside ``opt_state``.

  Every sharpness transform's state is a NamedTuple with these fields.
  """
  is_stats = lambda n: isinstance(n, tuple) and all(hasattr(n, f) for f in ('rho', 'h',
                                                                           'sigma_max'))
  for node in jax.tree.leaves(opt_state, is_leaf=is_stats):
    if is_stats(node):
      return {'rho': node.rho, 'h': node.h, 'sigma_max': node.sigma_max}
  return {}
