"""Timed train steps: every step kind the library runs, on one model, batch and device.

Each step is compiled ahead of time with the train state donated (SAQ-ET as two
compiled phases, as the trainer runs it) and warmed up over one period of its
phases; then, for several rounds, every variant runs a block of consecutive
timed steps, in reversed order every other round so that no variant always
follows the same one. A round's cost of a variant is its median step (for
SAQ-ET the medians of its two phases weighted by their frequency, which
amortizes the sharpness pass every tau steps); a ratio is the median over
rounds of the two variants' per-round ratio, so that a shared machine's slow
drifts cancel. Compile time, the model's FLOPs (6 per MAC and example for each
gradient evaluation: what MFU divides), XLA's cost model (FLOPs, bytes
accessed: noise-free, for ratios finer than the timing noise; on GPU it leaves
out the convolutions, which run as cuDNN calls) and XLA's memory plan are
reported separately. All variants share the loss
and base optimizer (SGD, momentum 0.9):

fp group (full precision): fp_sgd; fp_sam (``asga_jax.optim.sam``, rho 0.1).
qat group (the finetune step, fixed 4-bit QAT): qat_sgd; saq (SAQ case 3 every
  step); saq_et (SAQ efficient training, tau=4 unless ``saq_tau`` says otherwise).
supernet group (the search step, supernet over the model's bit candidates,
  lambda 0.1): supernet_sgd (one gradient evaluation); asga, sam (two);
  optax_sam (``optax.contrib.sam`` in opaque mode, two: the external peer).
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from asga_jax import models, optim
from asga_jax.quant import LayerBits, LayerCost, QuantSpec, collect_layer_costs, complexity_loss
from asga_jax.train import steps


def optax_sam_step(model, tx, costs, comp_weight, sharpness_step=None):
  """The same search step, driven by optax.contrib.sam's opaque-mode convention."""
  del sharpness_step  # one phase
  task_loss = steps.make_task_loss(model)

  def step(state, batch):
    (loss, (_, batch_stats)), task_grads = jax.value_and_grad(task_loss, has_aux=True)(
        state.params, state.batch_stats, batch)
    comp_grads = jax.grad(complexity_loss)(state.params, costs)
    grads = jax.tree.map(lambda g, c: g + comp_weight * c, task_grads, comp_grads)
    grad_fn = lambda p, _: jax.grad(lambda q: task_loss(q, state.batch_stats, batch)[0])(p)
    updates, opt_state = tx.update(grads, state.opt_state, state.params, grad_fn=grad_fn)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         batch_stats=batch_stats, opt_state=opt_state), {'loss': loss}

  return step


PHASE_NAMES = {True: 'sharpness', False: 'reuse'}  # SAQ-ET's phases, as the results name them


@dataclasses.dataclass
class Variant:
  """One timed step kind: its phases (one, or SAQ-ET's two), compiled ahead of time.

  ``make_step(sharpness_step=phase)`` builds the step function of a phase (as
  :func:`steps.make_train_step`); with ``period > 1`` the step with index i
  runs phase ``i % period == 0``. The model's layer ``costs`` (MACs) and
  ``evals`` (gradient evaluations of a step, of the sharpness phase when there
  are two; the other phase takes one) give the model FLOPs.
  """
  variables: Any
  tx: optax.GradientTransformation
  make_step: Callable[..., Callable[..., Any]]
  costs: tuple[LayerCost, ...]
  evals: int = 1
  period: int = 1
  compiled: dict[bool | None, Any] = dataclasses.field(default_factory=dict, init=False)

  def compile(self, batch) -> tuple[Any, dict[str, float]]:
    """(fresh train state, compile seconds and XLA's cost and memory per step)."""
    state = steps.create_train_state(jax.tree.map(jnp.copy, dict(self.variables)), self.tx)
    phases = (None,) if self.period == 1 else (True, False)
    t0 = time.perf_counter()
    self.compiled = {p: jax.jit(self.make_step(sharpness_step=p), donate_argnums=0)
                     .lower(state, batch).compile() for p in phases}
    seconds = time.perf_counter() - t0
    cost = {k: sum(self.weight(p) * float(self.compiled[p].cost_analysis()[k]) for p in phases)
            for k in ('flops', 'bytes accessed')}
    memory = [self.compiled[p].memory_analysis() for p in phases]
    planned = max(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                  + m.temp_size_in_bytes for m in memory)
    # A gradient evaluation is 6 FLOPs per MAC and example (forward 2, backward 4).
    evals = sum(self.weight(p) * (1 if p is False else self.evals) for p in phases)
    macs = sum(c.macs for c in self.costs)
    model_flops = 6 * macs * batch['image'].shape[0] * evals
    return state, {'compile_s': seconds, 'model_gflops': model_flops / 1e9,
                   'gflops': cost['flops'] / 1e9,
                   'gbytes_accessed': cost['bytes accessed'] / 1e9,
                   'xla_memory_mb': planned / 2**20}

  def phase(self, index: int) -> bool | None:
    """The phase of step ``index``: None (one phase), or whether it is SAQ-ET's sharpness step."""
    return None if self.period == 1 else index % self.period == 0

  def weight(self, phase: bool | None) -> float:
    """How often ``phase`` runs."""
    return {None: 1.0, True: 1.0 / self.period, False: 1.0 - 1.0 / self.period}[phase]

  def run(self, state, batch) -> tuple[Any, bool | None, float]:
    """One step (continuing the state's step count): (state, its phase, seconds)."""
    phase = self.phase(int(state.step))
    t0 = time.perf_counter()
    state, metrics = self.compiled[phase](state, batch)
    jax.block_until_ready((state, metrics))
    return state, phase, time.perf_counter() - t0


GROUPS = ('fp', 'qat', 'supernet')


def _init(model, batch) -> tuple[Any, tuple[LayerCost, ...]]:
  """(variables, the model's layer costs)."""
  example = batch['image'][:1]
  return jax.jit(model.init)(jax.random.key(0), example), collect_layer_costs(model, example)


def build_variants(model_name: str, batch: dict[str, jax.Array], groups: Sequence[str],
                   saq_tau: int = 4, **model_kwargs: Any) -> dict[str, Variant]:
  """The variants of ``groups`` (see the module docstring) for one model.

  Args:
    model_name: a name of ``asga_jax.models.MODELS``.
    batch: {'image', 'label'} the steps train on.
    groups: some of ``GROUPS``.
    saq_tau: SAQ-ET's period (sharpness gradient every ``saq_tau`` steps).
    **model_kwargs: passed to ``models.create_model`` (num_classes, width, stem, dtype).
  """
  base = optax.sgd(0.01, momentum=0.9)
  variants: dict[str, Variant] = {}
  if 'fp' in groups:
    model = models.create_model(model_name, **model_kwargs)
    variables, costs = _init(model, batch)
    for name, tx, evals in (('fp_sgd', base, 1), ('fp_sam', optim.sam(base, rho=0.1), 2)):
      variants[name] = Variant(variables, tx, functools.partial(steps.make_train_step, model, tx),
                               costs, evals)
  if 'qat' in groups:
    model = models.create_model(model_name, quant=QuantSpec(mode='fixed', uniform=LayerBits(4, 4)),
                                **model_kwargs)
    variables, costs = _init(model, batch)
    for name, tx, qgrads, evals, tau in (('qat_sgd', base, False, 1, 1),
                                         ('saq', optim.saq(base, rho=0.5), True, 2, 1),
                                         ('saq_et', optim.saq(base, rho=0.5, tau=saq_tau), True, 2,
                                          saq_tau)):
      variants[name] = Variant(variables, tx, functools.partial(
          steps.make_train_step, model, tx, quantized_grads=qgrads), costs, evals, period=tau)
  if 'supernet' in groups:
    bits = models.DEFAULT_BITS[model_name]
    model = models.create_model(model_name, quant=QuantSpec(mode='supernet', w_bits=bits,
                                                            a_bits=bits), **model_kwargs)
    variables, costs = _init(model, batch)
    for name, tx, evals in (('supernet_sgd', base, 1), ('asga', optim.asga(base), 2),
                            ('sam', optim.sam(base, rho=0.1), 2)):
      tx = optax.chain(optim.complexity_penalty(costs, weight=0.1), tx)
      variants[name] = Variant(variables, tx, functools.partial(
          steps.make_train_step, model, tx, costs=costs), costs, evals)
    sam = optax.contrib.sam(base, optax.chain(optax.contrib.normalize(), optax.sgd(0.1)),
                            sync_period=2, opaque_mode=True)
    variants['optax_sam'] = Variant(variables, sam, functools.partial(
        optax_sam_step, model, sam, costs, 0.1), costs, evals=2)
  return variants


def time_variants(variants: dict[str, Variant], batch: dict[str, jax.Array], *, rounds: int,
                  steps_per_round: int, log: Callable[[str], None] = print
                  ) -> dict[str, dict[str, Any]]:
  """Compiles, warms up and times every variant (see the module docstring).

  Returns:
    Per variant: median/min/max ms over all timed steps, the per-round step
    cost (``round_ms``, for ratios: the median step of the round, or for
    SAQ-ET the frequency-weighted medians of its two phases, which
    ``phase_round_ms`` also gives apart: 'sharpness' and 'reuse'), ``steps``
    timed, compile seconds, the model's GFLOP per step (``model_gflops``,
    from its MACs), XLA's GFLOP and GB accessed per step, and XLA's
    memory plan (``xla_memory_mb``: arguments + outputs - donated aliases +
    temporaries).
  """
  states, info = {}, {}
  for name, variant in variants.items():
    states[name], info[name] = variant.compile(batch)
    for _ in range(variant.period):  # warm-up
      states[name], _, _ = variant.run(states[name], batch)
    log(f'compiled {name} in {info[name]["compile_s"]:.1f} s')
  per_round = {name: [] for name in variants}
  phase_rounds = {name: {} for name, v in variants.items() if v.period > 1}
  all_times = {name: [] for name in variants}
  for r in range(rounds):
    for name in (list(variants) if r % 2 == 0 else reversed(list(variants))):
      variant, by_phase = variants[name], {}
      for _ in range(steps_per_round):
        states[name], phase, seconds = variant.run(states[name], batch)
        by_phase.setdefault(phase, []).append(seconds)
        all_times[name].append(seconds)
      # Medians resist a shared machine's stalls; phase weights amortize SAQ-ET's period.
      medians = {p: statistics.median(t) for p, t in by_phase.items()}
      per_round[name].append(sum(variant.weight(p) * m for p, m in medians.items()))
      if name in phase_rounds:
        for p, m in medians.items():
          phase_rounds[name].setdefault(PHASE_NAMES[p], []).append(1e3 * m)
  results = {}
  for name, times in all_times.items():
    results[name] = {'median_ms': 1e3 * statistics.median(times), 'min_ms': 1e3 * min(times),
                     'max_ms': 1e3 * max(times), 'steps': len(times),
                     'round_ms': [1e3 * t for t in per_round[name]], **info[name]}
    if name in phase_rounds:
      results[name]['phase_round_ms'] = phase_rounds[name]
  return results
