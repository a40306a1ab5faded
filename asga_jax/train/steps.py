"""Train state and the jitted train/eval steps of every stage.

One train step serves every stage: full-precision pretraining, supernet search
(plain or sharpness-aware) and fixed-policy QAT. The optimizer decides what a
step does; the step always hands it the extra arguments a sharpness-aware
transform needs (``value``, ``grad_fn``, ``task_grads``), which plain optax
optimizers ignore.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from asga_jax.optim import sharpness_stats
from asga_jax.quant import LayerCost, complexity_loss, mean_expected_bits, total_bops

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]


class TrainState(flax.struct.PyTreeNode):
  """Everything a step changes: step count, parameters, BN statistics, optimizer."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def create_train_state(variables: Mapping[str, Any], tx: optax.GradientTransformation
                       ) -> TrainState:
  params = variables['params']
  return TrainState(step=jnp.zeros([], jnp.int32), params=params,
                    batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params))


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0
                  ) -> jax.Array:
  """Per-example softmax cross-entropy with optional label smoothing."""
  if not label_smoothing:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def make_task_loss(model: nn.Module, label_smoothing: float = 0.0) -> Callable[..., Any]:
  """``task_loss(params, batch_stats, batch) -> (loss, (logits, new batch_stats))``."""

  def task_loss(params, batch_stats, batch):
    logits, updated = model.apply({'params': params, 'batch_stats': batch_stats},
                                  batch['image'], train=True, mutable=['batch_stats'])
    loss = cross_entropy(logits, batch['label'], label_smoothing).mean()
    return loss, (logits, updated['batch_stats'])

  return task_loss


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, *,
                    costs: Sequence[LayerCost] | None = None, comp_weight: float = 0.0,
                    label_smoothing: float = 0.0) -> Callable[[TrainState, Batch],
                                                              tuple[TrainState, Metrics]]:
  """Builds ``step(state, batch) -> (state, metrics)`` (not jitted; jit it).

  The loss is L(t) + comp_weight * L_comp(t), L the mean cross-entropy and
  L_comp the normalized expected BOPs of :func:`asga_jax.quant.complexity_loss`
  (only when ``costs`` are given, i.e. for the supernet). BatchNorm running
  statistics come from the clean pass; a sharpness-aware transform's second
  pass uses batch statistics and its updated statistics are dropped.

  Args:
    model: a Flax model called as ``model.apply(vars, images, train=True)``.
    tx: the optimizer; sharpness-aware transforms get ``value``, ``grad_fn``
      and ``task_grads`` as extra arguments.
    costs: layer costs of a supernet model, for the complexity loss.
    comp_weight: lambda.
    label_smoothing: label smoothing of the cross-entropy.

  Returns:
    The step function. Metrics: loss (task), accuracy, and for the supernet
    comp_loss, expected GBOPs and mean expected bits of the searched layers
    (bits_w, bits_a), plus rho/h/sigma_max from a sharpness state.
  """
  task_loss = make_task_loss(model, label_smoothing)
  tx = optax.with_extra_args_support(tx)

  def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    (loss, (logits, batch_stats)), task_grads = jax.value_and_grad(task_loss, has_aux=True)(
        state.params, state.batch_stats, batch)
    grads, metrics = task_grads, {}
    if costs:
      comp, comp_grads = jax.value_and_grad(complexity_loss)(state.params, costs)
      grads = jax.tree.map(lambda g, c: g + comp_weight * c, task_grads, comp_grads)
      bits_w, bits_a = mean_expected_bits(state.params, costs)
      metrics.update(comp_loss=comp, gbops=total_bops(state.params, costs) / 1e9,
                     bits_w=bits_w, bits_a=bits_a)
    grad_fn = jax.value_and_grad(lambda p: task_loss(p, state.batch_stats, batch)[0])
    updates, opt_state = tx.update(grads, state.opt_state, state.params, value=loss,
                                   grad_fn=grad_fn, task_grads=task_grads)
    new_state = state.replace(step=state.step + 1,
                              params=optax.apply_updates(state.params, updates),
                              batch_stats=batch_stats, opt_state=opt_state)
    metrics.update(loss=loss, accuracy=jnp.mean(jnp.argmax(logits, -1) == batch['label']),
                   **sharpness_stats(opt_state))
    return new_state, metrics

  return step


def make_eval_step(model: nn.Module) -> Callable[[TrainState, Batch], Metrics]:
  """Builds ``eval_step(state, batch) -> sums`` over the real (mask=1) examples."""

  def eval_step(state: TrainState, batch: Batch) -> Metrics:
    logits = model.apply({'params': state.params, 'batch_stats': state.batch_stats},
                         batch['image'], train=False)
    mask = batch.get('mask', jnp.ones(logits.shape[0]))
    losses = cross_entropy(logits, batch['label'])
    correct = jnp.argmax(logits, -1) == batch['label']
    return {'loss_sum': jnp.sum(losses * mask), 'correct': jnp.sum(correct * mask),
            'count': jnp.sum(mask)}

  return eval_step
