"""Train state and the jitted train/eval steps of every stage.

One train step serves every stage: full-precision pretraining, supernet search
(plain or sharpness-aware) and fixed-policy QAT. The optimizer decides what a
step does; the step always hands it the extra arguments a sharpness-aware
transform needs (``value``, ``grad_fn``, ``task_grads``, ``quantized_grads``),
which plain optax optimizers ignore.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from asga_jax.optim import complexity_stats, sharpness_stats
from asga_jax.quant import LayerCost, complexity_loss, mean_expected_bits, total_bops
from asga_jax.quant.layers import PERTURB
from asga_jax.train import sharding

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]


class TrainState(flax.struct.PyTreeNode):
  """Everything a step changes: step count, parameters, BN statistics, optimizer.

  ``nonfinite_streak`` counts the latest consecutive steps skipped for a
  non-finite loss or gradient, ``nonfinite_total`` all skipped steps (None
  outside training).
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  nonfinite_streak: jax.Array | None = None
  nonfinite_total: jax.Array | None = None


def create_train_state(variables: Mapping[str, Any], tx: optax.GradientTransformation
                       ) -> TrainState:
  params = variables['params']
  # One zero per counter: a jitted init returning one array in several places would hand the
  # donating train step the same buffer twice.
  zero = lambda: jnp.zeros([], jnp.int32)
  return TrainState(step=zero(), params=params, batch_stats=variables.get('batch_stats', {}),
                    opt_state=tx.init(params), nonfinite_streak=zero(), nonfinite_total=zero())


def all_finite(tree: Any) -> jax.Array:
  """True when every floating-point entry of ``tree`` is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def guard_nonfinite(old: TrainState, new: TrainState, *checked: Any) -> TrainState:
  """``new``, or ``old`` with the step advanced if anything in ``new`` or ``checked`` is not finite.

  A skipped step consumes its batch (the data position and ``step`` move on)
  but changes no parameter, statistic or optimizer state, so a NaN batch or a
  gradient overflow never reaches the state, nor a checkpoint.
  """
  ok = all_finite((new.params, new.batch_stats, checked))
  # A cond choosing between computed values, not an elementwise where: XLA would fuse a where
  # into the gradient computation and compile a supernet step 10x slower (124 s vs 13 s).
  params, batch_stats, opt_state = jax.lax.cond(
      ok, lambda: (new.params, new.batch_stats, new.opt_state),
      lambda: (old.params, old.batch_stats, old.opt_state))
  bad = 1 - ok.astype(jnp.int32)
  return new.replace(params=params, batch_stats=batch_stats, opt_state=opt_state,
                     nonfinite_streak=(old.nonfinite_streak + bad) * bad,
                     nonfinite_total=old.nonfinite_total + bad)


def init_train_state(variables: Mapping[str, Any], tx: optax.GradientTransformation, mesh: Mesh,
                     *, fsdp: bool = False, min_size: int = 2 ** 16) -> tuple[TrainState, Any]:
  """The initial train state, built on ``mesh`` in the layout the train step uses.

  The state's shapes come from ``jax.eval_shape``, its shardings from
  :func:`sharding.state_shardings`, and one jit with those ``out_shardings``
  builds it, so each device only ever holds its own slice (FSDP) and every
  process of a multi-host run gets the same global arrays. ``variables`` must
  be the same on every process (host arrays or arrays on one local device).

  Returns:
    (state, its shardings) -- the shardings are :func:`jit_train_step`'s
    ``state_sharding``.
  """
  variables = jax.device_get(variables)  # host copies: valid jit inputs on any mesh
  create = lambda v: create_train_state(v, tx)
  shardings = sharding.state_shardings(jax.eval_shape(create, variables), mesh, fsdp=fsdp,
                                       min_size=min_size)
  return jax.jit(create, out_shardings=shardings)(variables), shardings


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0
                  ) -> jax.Array:
  """Per-example softmax cross-entropy with optional label smoothing."""
  if not label_smoothing:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def make_task_loss(model: nn.Module, label_smoothing: float = 0.0) -> Callable[..., Any]:
  """``task_loss(params, batch_stats, batch, weight_perturbation=None)``.

  Returns (loss, (logits, new batch_stats)); ``weight_perturbation`` (the
  model's ``perturb`` collection) is added to the quantized kernels.
  """

  def task_loss(params, batch_stats, batch, weight_perturbation=None):
    variables = {'params': params, 'batch_stats': batch_stats}
    if weight_perturbation is not None:
      variables[PERTURB] = weight_perturbation
    logits, updated = model.apply(variables, batch['image'], train=True,
                                  mutable=['batch_stats'])
    loss = cross_entropy(logits, batch['label'], label_smoothing).mean()
    return loss, (logits, updated['batch_stats'])

  return task_loss


def zero_weight_perturbation(model: nn.Module, images: jax.Array) -> Any:
  """Zeros shaped like the model's ``perturb`` collection (one entry per quantized kernel)."""
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images[:1])
  if PERTURB not in shapes:
    raise ValueError(f'{type(model).__name__} has no quantized layers to perturb.')
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[PERTURB])


def _split(batch: Batch, size: int) -> Batch:
  """Reshapes every array of ``batch`` to (batch // size, size, ...)."""
  n = batch['image'].shape[0]
  if n % size:
    raise ValueError(f'm-sharpness: the per-process batch ({n}) must be a multiple of m ({size}).')
  return {k: v.reshape(n // size, size, *v.shape[1:]) for k, v in batch.items()}


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, *,
                    costs: Sequence[LayerCost] | None = None,
                    label_smoothing: float = 0.0, quantized_grads: bool = False,
                    m_sharpness: int = 0, sharpness_step: bool | None = None
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
  """Builds ``step(state, batch) -> (state, metrics)`` (not jitted; jit it).

  The loss is L(t), the mean cross-entropy; the complexity term lambda *
  L_comp of a supernet search is the optimizer's
  (:func:`asga_jax.optim.complexity_penalty`). The optimizer gets
  the extra arguments of the sharpness-aware transforms (see
  :mod:`asga_jax.optim.sharpness`): ``value``, ``grad_fn(params,
  weight_perturbation=None)``, ``task_grads`` and ``quantized_grads``. BatchNorm
  running statistics come from the clean pass; a second pass uses batch
  statistics and its updated statistics are dropped.

  Args:
    model: a Flax model called as ``model.apply(vars, images, train=True)``.
    tx: the optimizer.
    costs: layer costs of a supernet model, for its metrics.
    label_smoothing: label smoothing of the cross-entropy.
    quantized_grads: also compute dL/dQ(w) (SAQ cases 1 and 3).
    m_sharpness: if > 0, the clean pass runs on sub-batches of this size (with
      their own BatchNorm statistics, as on separate devices) and the
      sharpness transform perturbs each sub-batch along its own gradient.
    sharpness_step: passed to the optimizer when not None: whether this is a
      step that evaluates the sharpness gradient (SAQ efficient training; see
      :func:`jit_train_step`).

  Returns:
    The step function. Metrics: loss (task), accuracy, and for the supernet
    comp_loss, expected GBOPs and mean expected bits of the searched layers
    (bits_w, bits_a), plus rho/h/sigma_max from a sharpness state and
    lambda (comp_weight) and the argmax policy's GBOPs from a complexity state;
    nonfinite_streak and skipped_steps (see :func:`guard_nonfinite`).
  """
  task_loss = make_task_loss(model, label_smoothing)
  tx = optax.with_extra_args_support(tx)
  phase = {} if sharpness_step is None else {'sharpness_step': sharpness_step}
  quantized_grads = quantized_grads and sharpness_step is not False  # reuse steps skip them

  def clean_pass(params, batch_stats, batch):
    if quantized_grads:
      zeros = zero_weight_perturbation(model, batch['image'])
      (loss, aux), (grads, qgrads) = jax.value_and_grad(task_loss, argnums=(0, 3), has_aux=True)(
          params, batch_stats, batch, zeros)
    else:
      (loss, aux), grads = jax.value_and_grad(task_loss, has_aux=True)(params, batch_stats, batch)
      qgrads = None
    return loss, grads, qgrads, aux

  def perturbed_grads(batch_stats, batch):
    """(params, weight_perturbation) -> (L, grad L) at fixed BN statistics and batch."""
    return lambda p, wp=None: jax.value_and_grad(
        lambda q: task_loss(q, batch_stats, batch, wp)[0])(p)

  def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    if m_sharpness:
      chunks = _split(batch, m_sharpness)
      value, task_grads, qgrads, (logits, batch_stats) = jax.vmap(
          clean_pass, in_axes=(None, None, 0))(state.params, state.batch_stats, chunks)
      logits = logits.reshape(-1, logits.shape[-1])
      batch_stats = jax.tree.map(lambda x: jnp.mean(x, axis=0), batch_stats)
      per_chunk = lambda p, wp, c: perturbed_grads(state.batch_stats, c)(p, wp)
      grad_fn = lambda p, wp=None: jax.vmap(per_chunk, in_axes=(0, None if wp is None else 0, 0))(
          p, wp, chunks)
      mean_grads = jax.tree.map(lambda x: jnp.mean(x, axis=0), task_grads)
    else:
      value, task_grads, qgrads, (logits, batch_stats) = clean_pass(
          state.params, state.batch_stats, batch)
      grad_fn = perturbed_grads(state.batch_stats, batch)
      mean_grads = task_grads
    loss = jnp.mean(value)
    metrics = {}
    if costs:
      bits_w, bits_a = mean_expected_bits(state.params, costs)
      metrics.update(comp_loss=complexity_loss(state.params, costs),
                     gbops=total_bops(state.params, costs) / 1e9, bits_w=bits_w, bits_a=bits_a)
    updates, opt_state = tx.update(mean_grads, state.opt_state, state.params, value=value,
                                   grad_fn=grad_fn, task_grads=task_grads,
                                   quantized_grads=qgrads, **phase)
    new_state = guard_nonfinite(state, state.replace(
        step=state.step + 1, params=optax.apply_updates(state.params, updates),
        batch_stats=batch_stats, opt_state=opt_state), loss, mean_grads)
    labels = batch['label'].reshape(-1)
    metrics.update(loss=loss, accuracy=jnp.mean(jnp.argmax(logits, -1) == labels),
                   nonfinite_streak=new_state.nonfinite_streak,
                   skipped_steps=new_state.nonfinite_total,
                   **sharpness_stats(opt_state), **complexity_stats(opt_state))
    return new_state, metrics

  return step


IndexedStep = Callable[[TrainState, Batch, int], tuple[TrainState, Metrics]]


def jit_train_step(model: nn.Module, tx: optax.GradientTransformation, *,
                   sharpness_period: int = 1, mesh: Mesh | None = None,
                   state_sharding: Any = None, **kwargs: Any) -> IndexedStep:
  """The jitted train step (state donated), as ``step(state, batch, index)``.

  With ``sharpness_period`` p > 1 (SAQ efficient training, tau = p) it holds
  two compiled steps, one that evaluates the sharpness gradient and one that
  reuses it, and runs the first when ``index % p == 0``; ``index`` must count
  the optimizer's updates (``state.step``). Static phases keep the gradient
  convolutions out of a ``lax.cond``, where XLA:CPU runs them ~20x slower.

  Args:
    model, tx: as :func:`make_train_step`.
    sharpness_period: the optimizer's sharpness period (1: every step alike).
    mesh: data-parallel mesh (:mod:`asga_jax.train.sharding`): the batch is
      split over its 'data' axis. None: jit's defaults (one device).
    state_sharding: the state's shardings on ``mesh`` (default replicated;
      see :func:`sharding.state_shardings` for FSDP).
    **kwargs: further arguments of :func:`make_train_step`.

  Returns:
    ``step(state, batch, index) -> (state, metrics)``.
  """
  placement = {}
  if mesh is not None:
    state_sharding = state_sharding or sharding.replicated(mesh)
    placement = dict(in_shardings=(state_sharding, sharding.batch_sharded(mesh)),
                     out_shardings=(state_sharding, sharding.replicated(mesh)))
  compile_ = lambda **phase: jax.jit(make_train_step(model, tx, **kwargs, **phase),
                                     donate_argnums=0, **placement)
  if sharpness_period == 1:
    jitted = compile_()
    return lambda state, batch, index: jitted(state, batch)
  phases = {phase: compile_(sharpness_step=phase) for phase in (True, False)}
  return lambda state, batch, index: phases[index % sharpness_period == 0](state, batch)


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
