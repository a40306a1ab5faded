"""Sharpness diagnostics of a trained state: lambda_max and loss landscapes.

The loss they look at is the mean cross-entropy on a few fixed, unaugmented
training batches with BatchNorm in eval mode (running statistics), so that it
is a deterministic function of the parameters, as in PyHessian and Li et al.
Results go to the stage directory: ``diagnostics.json``, ``landscape_1d.png``
/ ``.npz`` and ``landscape_2d.png`` / ``.npz``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging

from asga_jax import data, optim
from asga_jax.analysis import (filter_normalized_direction, landscape_1d, landscape_2d,
                               plot_landscape_1d, plot_landscape_2d, save_landscape,
                               top_hessian_eigenvalue)
from asga_jax.files import write_json
from asga_jax.train import sharding
from asga_jax.train.config import landscape_kinds
from asga_jax.train.steps import TrainState, cross_entropy

DIAGNOSTICS_FILE = 'diagnostics.json'


def fixed_train_batches(data_config: ml_collections.ConfigDict, batch_size: int,
                        num_batches: int) -> list[dict[str, jax.Array]]:
  """The first ``num_batches`` unaugmented train batches of epoch 0, seed 0."""
  config = data_config.copy_and_resolve_references()
  with config.unlocked():
    config.augment = False
  batch_size = min(batch_size, data.get_info(config).num_train)
  with contextlib.closing(data.train_batches(
      config, global_batch_size=batch_size, seed=0, epoch=0,
      process_index=jax.process_index(), process_count=jax.process_count())) as batches:
    mesh = sharding.make_mesh()
    return [sharding.put_batch(b, mesh) for b in itertools.islice(batches, num_batches)]


def eval_mode_loss(model: nn.Module, batch_stats: Any, batches: list[dict[str, jax.Array]]
                   ) -> Callable[[Any], jax.Array]:
  """params -> mean cross-entropy over ``batches``, BatchNorm on running statistics."""

  def loss(params):
    total = 0.0
    for batch in batches:
      logits = model.apply({'params': params, 'batch_stats': batch_stats}, batch['image'],
                           train=False)
      total = total + cross_entropy(logits, batch['label']).mean()
    return total / len(batches)

  return loss


class Diagnostics:
  """lambda_max and landscapes of one stage's model, on fixed batches."""

  def __init__(self, config: ml_collections.ConfigDict, model: nn.Module,
               data_config: ml_collections.ConfigDict, stage_dir: str, stage: str):
    self.settings, self.model = config.diagnostics, model
    self.stage_dir, self.stage = stage_dir, stage
    self.seed, self._data_config = config.seed, data_config
    self._batch_size = config.eval_batch_size
    self._batches = None
    self._lambda_max: tuple[int, float] | None = None  # (step, value) of the last measurement

  def _loss(self, state: TrainState) -> Callable[[Any], jax.Array]:
    if self._batches is None:
      self._batches = fixed_train_batches(self._data_config, self._batch_size,
                                          self.settings.num_batches)
    return eval_mode_loss(self.model, state.batch_stats, self._batches)

  def lambda_max(self, state: TrainState) -> float:
    """Top Hessian eigenvalue w.r.t. the network weights (kernels and biases)."""
    step = int(state.step)
    if self._lambda_max is not None and self._lambda_max[0] == step:
      return self._lambda_max[1]
    result = top_hessian_eigenvalue(self._loss(state), state.params,
                                    key=jax.random.key(self.seed),
                                    num_iters=self.settings.lambda_max_iters,
                                    tol=self.settings.lambda_max_tol,
                                    mask=optim.label_mask(optim.WEIGHTS))
    logging.info('%s: lambda_max %.4g (%d power iterations)', self.stage, float(result.value),
                 int(result.iterations))
    self._lambda_max = (step, float(result.value))
    return self._lambda_max[1]

  def landscapes(self, state: TrainState) -> dict[str, str]:
    """Writes the configured 1-D/2-D landscapes; returns {kind: png path}."""
    written, loss = {}, self._loss(state)
    key1, key2 = jax.random.split(jax.random.key(self.seed))
    d1 = filter_normalized_direction(state.params, key1)
    span = self.settings.landscape_span
    title = f'{self.stage}: loss along filter-normalized directions'
    for kind in landscape_kinds(self.settings):
      base = os.path.join(self.stage_dir, f'landscape_{kind}')
      if kind == '1d':
        alphas, losses = landscape_1d(loss, state.params, d1, span=span,
                                      points=self.settings.landscape_points)
        save_landscape(base + '.npz', alphas=alphas, losses=losses)
        plot_landscape_1d({self.stage: (alphas, losses)}, base + '.png', title=title)
      else:
        d2 = filter_normalized_direction(state.params, key2)
        alphas, betas, losses = landscape_2d(loss, state.params, d1, d2, span=span,
                                             points=self.settings.landscape_grid)
        save_landscape(base + '.npz', alphas=alphas, betas=betas, losses=losses)
        # Clip the corners so that the basin around the trained point stays visible.
        plot_landscape_2d(alphas, betas, losses, base + '.png', title=title,
                          vmax=float(np.quantile(losses, 0.8)))
      written[kind] = base + '.png'
      logging.info('%s: %s landscape -> %s (.npz beside it)', self.stage, kind, base + '.png')
    return written

  def finish(self, state: TrainState) -> dict[str, Any]:
    """End-of-stage diagnostics, cached in diagnostics.json for the final step."""
    path = os.path.join(self.stage_dir, DIAGNOSTICS_FILE)
    step = int(state.step)
    if os.path.isfile(path):
      with open(path) as f:
        cached = json.load(f)
      if cached.get('step') == step:
        return cached
    result: dict[str, Any] = {'step': step}
    if self.settings.lambda_max:
      result['lambda_max'] = self.lambda_max(state)
    if landscape_kinds(self.settings):
      result['landscapes'] = self.landscapes(state)
    if jax.process_index() == 0:
      write_json(path, result)
    return result
