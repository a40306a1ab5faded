"""Loss landscapes along random filter-normalized directions.

Li et al., "Visualizing the Loss Landscape of Neural Nets" (NeurIPS 2018):
the loss is evaluated on a line or a plane through the trained parameters,
spanned by random directions rescaled filter by filter to the norms of the
parameters' filters, so that landscapes of differently scaled networks (e.g.
EdMIPS and ASGA) can be compared. Works on any parameter pytree and any
``loss_fn(params) -> scalar``::

  loss = lambda p: cross_entropy(model.apply({'params': p, **state}, x), y)
  d1, d2 = (filter_normalized_direction(params, k) for k in jax.random.split(key))
  alphas, betas, losses = landscape_2d(loss, params, d1, d2, span=1.0, points=21)
  plot_landscape_2d(alphas, betas, losses, 'landscape.png')
  save_landscape('landscape.npz', alphas=alphas, betas=betas, losses=losses)
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure
from numpy.typing import ArrayLike

from asga_jax.analysis.hessian import Mask, gaussian_leaves, mask_leaves
from asga_jax.files import atomic_write, save_figure

PathLike = str | os.PathLike[str]


@functools.partial(jax.jit, static_argnums=2)
def _filter_normalized(key: jax.Array, leaves: list[jax.Array], selected: tuple[bool, ...]
                       ) -> list[jax.Array]:
  # Noise for every leaf, selected or not: a leaf's direction does not depend
  # on the mask.
  noise = gaussian_leaves(key, [jax.ShapeDtypeStruct(w.shape, jnp.float32) for w in leaves])

  def direction(d: jax.Array, w: jax.Array, s: bool) -> jax.Array:
    if not s or w.ndim < 2:
      return jnp.zeros_like(w)
    w32 = w.astype(jnp.float32)
    filter_norm = lambda t: jnp.sqrt(jnp.sum(jnp.square(t), axis=tuple(range(t.ndim - 1))))
    return (d * (filter_norm(w32) / filter_norm(d))).astype(w.dtype)

  return [direction(*args) for args in zip(noise, leaves, selected)]


def filter_normalized_direction(params: Any, key: jax.Array, *,
                                mask: Mask | None = None) -> Any:
  """A Gaussian random direction, filter-normalized to ``params``.

  Every selected leaf with ndim >= 2 (conv kernels HWIO, dense kernels IO) is
  drawn from N(0, 1) and each filter ``d[..., j]`` (the last axis: output
  channels) is rescaled to the norm of the parameter's filter ``w[..., j]``.
  Leaves with ndim < 2 (biases, BatchNorm scale/bias, clipping levels,
  architecture logits) get a zero direction, as Li et al.'s "ignore biasbn";
  so do the leaves outside the mask.

  Args:
    params: the parameter pytree (the trained point).
    key: PRNG key. A leaf's direction depends on the key and the parameter
      structure, not on the mask.
    mask: which leaves to perturb: a pytree of bools like ``params`` or a
      callable params -> such a pytree (e.g. ``asga_jax.optim.label_mask``).
      None selects every leaf with ndim >= 2.

  Returns:
    A pytree like ``params``.
  """
  leaves, treedef = jax.tree.flatten(params)
  selected = mask_leaves(params, mask) if mask is not None else [True] * len(leaves)
  return treedef.unflatten(_filter_normalized(key, leaves, tuple(selected)))


def _grid_losses(loss_fn: Callable[[Any], jax.Array], params: Any, directions: Sequence[Any],
                 coefficients: np.ndarray) -> np.ndarray:
  """Losses at params + sum_k c[n, k] directions[k], for each row n."""

  @jax.jit
  def loss_at(params: Any, directions: Sequence[Any], c: jax.Array) -> jax.Array:
    moved = jax.tree.map(
        lambda w, *ds: (w + sum(ck * d for ck, d in zip(c, ds))).astype(w.dtype),
        params, *directions)
    return loss_fn(moved)

  # One compiled function of the coefficients; the calls are dispatched
  # asynchronously and read back together.
  losses = [loss_at(params, directions, jnp.asarray(c, jnp.float32)) for c in coefficients]
  return np.asarray(jax.device_get(losses), np.float64)


def landscape_1d(loss_fn: Callable[[Any], jax.Array], params: Any, direction: Any, *,
                 span: float = 1.0, points: int = 21) -> tuple[np.ndarray, np.ndarray]:
  """Loss along the line params + a * direction, a in [-span, span].

  Args:
    loss_fn: params -> scalar loss (close over the data).
    params: the center point (a = 0).
    direction: a pytree like ``params``, e.g. from
      :func:`filter_normalized_direction`.
    span: the line covers a in [-span, span].
    points: grid size; odd sizes include the center.

  Returns:
    (alphas [points], losses [points]) as float64 numpy arrays.
  """
  alphas = np.linspace(-span, span, points)
  return alphas, _grid_losses(loss_fn, params, [direction], alphas[:, None])


def landscape_2d(loss_fn: Callable[[Any], jax.Array], params: Any, d1: Any, d2: Any, *,
                 span: float = 1.0, points: int = 11
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Loss on the plane params + a * d1 + b * d2, a and b in [-span, span].

  Args:
    loss_fn: params -> scalar loss (close over the data).
    params: the center point (a = b = 0).
    d1: first direction, a pytree like ``params``.
    d2: second direction.
    span: both coefficients cover [-span, span].
    points: grid size per axis; odd sizes include the center.

  Returns:
    (alphas [points], betas [points], losses [points, points]) as float64
    numpy arrays; ``losses[i, j]`` is the loss at (alphas[i], betas[j]).
  """
  alphas = np.linspace(-span, span, points)
  betas = np.linspace(-span, span, points)
  grid = np.stack(np.meshgrid(alphas, betas, indexing='ij'), axis=-1).reshape(-1, 2)
  losses = _grid_losses(loss_fn, params, [d1, d2], grid).reshape(points, points)
  return alphas, betas, losses


def plot_landscape_1d(curves: Mapping[str, tuple[ArrayLike, ArrayLike]], path: PathLike, *,
                      title: str = 'Loss landscape') -> None:
  """Overlays 1-D landscapes of several models on one axes.

  Args:
    curves: label -> (alphas, losses), e.g. ``{'EdMIPS': ..., 'ASGA': ...}``.
    path: output file (PNG by extension).
    title: figure title.
  """
  # A bare Figure (no pyplot) leaves the caller's backend, e.g. a notebook's, alone.
  fig = Figure(figsize=(6.0, 4.2), layout='constrained')
  ax = fig.add_subplot()
  for label, (alphas, losses) in curves.items():
    ax.plot(alphas, losses, marker='o', markersize=3, label=label)
  ax.axvline(0.0, color='gray', linewidth=0.8, linestyle='--')
  ax.set_xlabel('direction coefficient')
  ax.set_ylabel('loss')
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  save_figure(fig, path, dpi=120)


def plot_landscape_2d(alphas: ArrayLike, betas: ArrayLike, losses: ArrayLike, path: PathLike, *,
                      title: str = 'Loss landscape', levels: int = 20,
                      vmax: float | None = None) -> None:
  """Contour plot of a 2-D landscape, the trained point marked at the origin.

  Args:
    alphas: coefficients of direction 1 [n].
    betas: coefficients of direction 2 [m].
    losses: [n, m], ``losses[i, j]`` at (alphas[i], betas[j]), as returned by
      :func:`landscape_2d`.
    path: output file (PNG by extension).
    title: figure title.
    levels: number of contour levels.
    vmax: clip the losses at this value before contouring. Far from the
      minimum the loss grows by orders of magnitude, and linear levels over the
      full range leave the basin in one colour (Li et al. clip likewise).
  """
  fig = Figure(figsize=(6.0, 5.0), layout='constrained')
  ax = fig.add_subplot()
  # contourf wants z[row = y, column = x]; losses are indexed [alpha = x, beta = y].
  z = np.asarray(losses, np.float64).T
  if vmax is not None:
    z = np.minimum(z, vmax)
  filled = ax.contourf(alphas, betas, z, levels=levels, cmap='viridis')
  ax.contour(alphas, betas, z, levels=filled.levels, colors='white', linewidths=0.5, alpha=0.6)
  fig.colorbar(filled, ax=ax, label='loss' if vmax is None else f'loss (clipped at {vmax:.3g})')
  ax.plot([0.0], [0.0], marker='*', markersize=12, color='red', linestyle='none',
          label='trained')
  ax.set_xlabel('direction 1')
  ax.set_ylabel('direction 2')
  ax.set_aspect('equal')
  ax.locator_params(nbins=5)
  ax.set_title(title)
  ax.legend(loc='upper right')
  save_figure(fig, path, dpi=120)


def save_landscape(path: PathLike, **arrays: ArrayLike) -> None:
  """Writes arrays (e.g. alphas, betas, losses) to an ``.npz`` file, atomically.

  The file is written exactly at ``path`` (no ``.npz`` is appended), through a
  temporary file in the same directory and a rename, so readers never see a
  partial file.

  Args:
    path: output file.
    **arrays: the arrays to save, by name; read back with ``np.load(path)``.
  """
  with atomic_write(path, 'wb') as f:
    np.savez(f, **arrays)
