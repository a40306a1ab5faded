"""Top Hessian eigenvalue by power iteration on Hessian-vector products.

Works on any parameter pytree and any ``loss_fn(params) -> scalar``; close
over the data (and, for Flax models, over the non-trainable variables)::

  loss = lambda p: cross_entropy(model.apply({'params': p, **state}, x), y)
  eig = top_hessian_eigenvalue(loss, params, key=jax.random.key(0))
  print(float(eig.value), eig.iterations)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

# A pytree of Python bools with the structure of params, or a function
# params -> such a pytree (as optax masks, e.g. asga_jax.optim.label_mask).
Mask = Any


class HessianEigen(NamedTuple):
  """Result of :func:`top_hessian_eigenvalue`.

  Attributes:
    value: the eigenvalue estimate (float32 scalar).
    vector: the unit eigenvector, a pytree like params (zeros outside the mask).
    iterations: Hessian-vector products used (at most ``num_iters``).
  """
  value: jax.Array
  vector: Any
  iterations: int


def mask_leaves(params: Any, mask: Mask) -> list[bool]:
  """One bool per leaf of ``params`` (in ``jax.tree.leaves`` order).

  Args:
    params: the parameter pytree.
    mask: a pytree of bools with the structure of ``params``, or a callable
      params -> such a pytree.

  Returns:
    The mask's leaves as Python bools.

  Raises:
    ValueError: the mask's structure does not match ``params``.
  """
  if callable(mask):
    mask = mask(params)
  return [bool(m) for m in jax.tree.structure(params).flatten_up_to(mask)]


def gaussian_leaves(key: jax.Array, leaves: Sequence[jax.Array]) -> list[jax.Array]:
  """Standard normal arrays with the shapes and dtypes of ``leaves``.

  One flat draw is split across the leaves: on CPU, one random-number kernel
  compiles far faster than one per leaf shape.

  Args:
    key: PRNG key.
    leaves: arrays (or shape-dtype structs).

  Returns:
    One array per leaf.
  """
  sizes = [x.size for x in leaves]
  flat = jax.random.normal(key, (sum(sizes),), jnp.float32)
  return [part.reshape(x.shape).astype(x.dtype)
          for part, x in zip(jnp.split(flat, np.cumsum(sizes)[:-1]), leaves)]


def hvp(loss_fn: Callable[[Any], jax.Array], params: Any, vector: Any) -> Any:
  """Hessian-vector product H(params) @ vector, forward-over-reverse.

  Args:
    loss_fn: params -> scalar loss.
    params: where to evaluate the Hessian.
    vector: a pytree like ``params``.

  Returns:
    H @ vector, a pytree like ``params``.
  """
  return jax.jvp(jax.grad(loss_fn), (params,), (vector,))[1]


def top_hessian_eigenvalue(loss_fn: Callable[[Any], jax.Array], params: Any, *,
                           key: jax.Array, num_iters: int = 20, tol: float = 1e-4,
                           mask: Mask | None = None) -> HessianEigen:
  """Largest-magnitude Hessian eigenvalue of ``loss_fn`` at ``params``.

  Power iteration on Hessian-vector products converges to the eigenvalue of
  largest magnitude. Near a minimum the Hessian is close to positive
  semi-definite, so that is lambda_max, the usual sharpness measure; far from a
  minimum a large negative eigenvalue can win instead (check the sign).

  With a ``mask``, the Hessian is taken with respect to the selected leaves
  only, the others held fixed at their values in ``params``: the result is the
  top eigenvalue of that diagonal block, and the eigenvector is zero on the
  leaves outside the mask.

  Each iteration is one jitted Hessian-vector product; the loop itself runs
  on the host and stops after the first iteration whose estimate changed by
  less than ``tol`` relative to the previous one, or after ``num_iters``. (Not
  a ``lax.while_loop``: XLA:CPU does not canonicalize the gradient
  convolutions inside loop bodies and runs them about 30x slower.)

  Args:
    loss_fn: params -> scalar loss (close over the data).
    params: where to evaluate the Hessian.
    key: PRNG key of the random start vector.
    num_iters: maximum number of iterations (Hessian-vector products), >= 1.
    tol: relative change of the estimate below which the iteration stops.
    mask: which leaves to differentiate: a pytree of bools like ``params`` or a
      callable params -> such a pytree. None selects every leaf.

  Returns:
    ``HessianEigen(value, vector, iterations)``; unpacks as
    ``eig, vec, iterations = ...``.

  Raises:
    ValueError: ``num_iters`` < 1, or the mask selects no leaf.
  """
  if num_iters < 1:
    raise ValueError(f'num_iters must be >= 1, got {num_iters}.')
  leaves, treedef = jax.tree.flatten(params)
  selected = mask_leaves(params, mask) if mask is not None else [True] * len(leaves)
  if not any(selected):
    raise ValueError('the mask selects no parameter leaf.')

  def merge(sub: list[jax.Array], fixed: list[jax.Array]) -> Any:
    sub_iter, fixed_iter = iter(sub), iter(fixed)
    return treedef.unflatten([next(sub_iter) if s else next(fixed_iter) for s in selected])

  def normalize(t: list[jax.Array]) -> list[jax.Array]:
    norm = optax.tree.norm(t)
    return [(x / norm).astype(x.dtype) for x in t]

  sub = [x for x, s in zip(leaves, selected) if s]
  fixed = [x for x, s in zip(leaves, selected) if not s]

  @jax.jit
  def start(sub: list[jax.Array], key: jax.Array) -> list[jax.Array]:
    return normalize(gaussian_leaves(key, sub))

  @jax.jit
  def iterate(sub: list[jax.Array], fixed: list[jax.Array], v: list[jax.Array]):
    # Differentiating only the selected leaves skips the others' gradients.
    hv = hvp(lambda s: loss_fn(merge(s, fixed)), sub, v)
    return optax.tree.vdot(v, hv).astype(jnp.float32), normalize(hv)

  v, eig, iterations = start(sub, key), None, 0
  while iterations < num_iters:
    prev = eig
    eig, v = iterate(sub, fixed, v)
    iterations += 1
    if prev is not None and abs(float(eig) - float(prev)) < tol * abs(float(eig)):
      break
  vector = merge(v, [jnp.zeros_like(x) for x in fixed])
  return HessianEigen(eig, vector, iterations)
