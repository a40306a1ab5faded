"""Top Hessian eigenvalue by power iteration on Hessian-vector products."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax


def hvp(loss_fn: Callable[[Any], jax.Array], params: Any, vector: Any) -> Any:
  """Hessian-vector product H(params) @ vector, forward-over-reverse."""
  return jax.jvp(jax.grad(loss_fn), (params,), (vector,))[1]


def top_hessian_eigenvalue(loss_fn: Callable[[Any], jax.Array], params: Any, *,
                           key: jax.Array, num_iters: int = 20, tol: float = 1e-4
                           ) -> tuple[jax.Array, Any]:
  """lambda_max of the Hessian of ``loss_fn`` at ``params`` by power iteration.

  Power iteration converges to the eigenvalue of largest magnitude, which is
  lambda_max near a minimum (where the Hessian is close to PSD).

  Args:
    loss_fn: params -> scalar loss (close over the data).
    params: where to evaluate the Hessian.
    key: PRNG key of the random start vector.
    num_iters: maximum iterations.
    tol: stop when the relative change of the estimate is below this.

  Returns:
    (eigenvalue, unit eigenvector with the structure of params).
  """
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  v = treedef.unflatten([jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])
  normalize = lambda t: jax.tree.map(lambda x: x / optax.tree.norm(t), t)
  product = jax.jit(lambda u: hvp(loss_fn, params, u))
  v, eig = normalize(v), jnp.inf
  for _ in range(num_iters):
    hv = product(v)
    new_eig = float(optax.tree.vdot(v, hv))
    v = normalize(hv)
    converged = abs(new_eig - eig) <= tol * abs(new_eig)
    eig = new_eig
    if converged:
      break
  return jnp.asarray(eig), v
