"""Step times of the search and QAT steps with and without sharpness, and ratios.

  python -m benchmarks.step_time                      # ResNet-20 CIFAR, batch 128
  python -m benchmarks.step_time --rounds 5 --steps 4 --json benchmarks/results/x.json

Each step is compiled ahead of time with the train state donated (SAQ-ET as
two compiled phases, as the trainer runs it) and warmed up over one period of
its phases; then, for ``--rounds`` rounds, every variant runs ``--steps``
consecutive timed steps; ratios are the median over rounds of the rounds' mean
step times (means amortize SAQ-ET's pass every tau steps). Compile time and
XLA's cost model of the compiled step (FLOPs, bytes accessed: noise-free, for
ratios finer than a shared machine's timing noise) are reported separately.
All variants of a group share the model, batch, loss and base optimizer (SGD,
momentum 0.9):

supernet group (the search step, {2,3,4,6}-bit supernet, lambda 0.1):
* supernet_sgd: no sharpness (one gradient evaluation);
* asga, sam: ``asga_jax.optim`` around the same SGD (two evaluations);
* optax_sam: ``optax.contrib.sam`` in opaque mode (two evaluations), the peer.
qat group (the finetune step, fixed 4-bit QAT):
* qat_sgd; saq: SAQ case 3 every step; saq_et: SAQ efficient training, tau=4.

Targets: asga / supernet_sgd <= 2.05, asga / optax_sam <= 1.03,
saq_et / qat_sgd <= 1.15 (SAQ paper: 1.12).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from asga_jax import models, optim
from asga_jax.quant import LayerBits, QuantSpec, collect_layer_costs, complexity_loss
from asga_jax.train import steps

TARGETS = {'asga/supernet_sgd': 2.05, 'asga/optax_sam': 1.03, 'saq_et/qat_sgd': 1.15}


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


@dataclasses.dataclass
class Variant:
  """One timed step kind: its phases (one, or SAQ-ET's two), compiled ahead of time.

  ``make_step(sharpness_step=phase)`` builds the step function of a phase (as
  :func:`steps.make_train_step`); with ``period > 1`` the step with index i
  runs phase ``i % period == 0``.
  """
  variables: Any
  tx: optax.GradientTransformation
  make_step: Callable[..., Callable[..., Any]]
  period: int = 1
  compiled: dict[bool | None, Any] = dataclasses.field(default_factory=dict, init=False)

  def compile(self, batch) -> tuple[Any, float, dict[str, float]]:
    """(fresh train state, compile seconds, XLA cost per step averaged over a period)."""
    state = steps.create_train_state(jax.tree.map(jnp.copy, dict(self.variables)), self.tx)
    phases = (None,) if self.period == 1 else (True, False)
    t0 = time.perf_counter()
    self.compiled = {p: jax.jit(self.make_step(sharpness_step=p), donate_argnums=0)
                     .lower(state, batch).compile() for p in phases}
    seconds = time.perf_counter() - t0
    weight = {None: 1.0, True: 1.0 / self.period, False: 1.0 - 1.0 / self.period}
    cost = {k: sum(weight[p] * float(self.compiled[p].cost_analysis()[k]) for p in phases)
            for k in ('flops', 'bytes accessed')}
    return state, seconds, cost

  def run(self, state, batch) -> tuple[Any, float]:
    """One step (continuing the state's step count) and its seconds."""
    index = int(state.step)
    t0 = time.perf_counter()
    state, metrics = self.compiled[None if self.period == 1 else index % self.period == 0](
        state, batch)
    jax.block_until_ready((state, metrics))
    return state, time.perf_counter() - t0


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='resnet20', choices=sorted(models.MODELS))
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--size', type=int, default=32)
  parser.add_argument('--steps', type=int, default=8,
                      help='timed steps per variant and round (a multiple of SAQ-ET tau=4)')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--group', default='all', choices=('supernet', 'qat', 'all'))
  parser.add_argument('--json', default=None, help='write the results here as JSON')
  args = parser.parse_args()

  rng = np.random.default_rng(0)
  batch = {'image': jnp.asarray(rng.normal(size=(args.batch, args.size, args.size, 3)),
                                jnp.float32),
           'label': jnp.asarray(rng.integers(0, 10, args.batch), jnp.int32)}
  base = optax.sgd(0.01, momentum=0.9)
  variants: dict[str, Variant] = {}
  if args.group in ('supernet', 'all'):
    model = models.create_model(args.model, num_classes=10, quant=QuantSpec(mode='supernet'))
    variables = jax.jit(model.init)(jax.random.key(0), batch['image'][:1])
    costs = collect_layer_costs(model, batch['image'][:1])
    for name, tx in (('supernet_sgd', base), ('asga', optim.asga(base)),
                     ('sam', optim.sam(base, rho=0.1))):
      tx = optax.chain(optim.complexity_penalty(costs, weight=0.1), tx)
      variants[name] = Variant(variables, tx, functools.partial(
          steps.make_train_step, model, tx, costs=costs))
    sam = optax.contrib.sam(base, optax.chain(optax.contrib.normalize(), optax.sgd(0.1)),
                            sync_period=2, opaque_mode=True)
    variants['optax_sam'] = Variant(variables, sam,
                                    functools.partial(optax_sam_step, model, sam, costs, 0.1))
  if args.group in ('qat', 'all'):
    model = models.create_model(args.model, num_classes=10,
                                quant=QuantSpec(mode='fixed', uniform=LayerBits(4, 4)))
    variables = jax.jit(model.init)(jax.random.key(0), batch['image'][:1])
    for name, tx, qgrads, tau in (('qat_sgd', base, False, 1),
                                  ('saq', optim.saq(base, rho=0.5), True, 1),
                                  ('saq_et', optim.saq(base, rho=0.5, tau=4), True, 4)):
      variants[name] = Variant(variables, tx, functools.partial(
          steps.make_train_step, model, tx, quantized_grads=qgrads), period=tau)

  states, compile_s, cost = {}, {}, {}
  for name, variant in variants.items():
    states[name], compile_s[name], cost[name] = variant.compile(batch)
    for _ in range(variant.period):  # warm-up
      states[name], _ = variant.run(states[name], batch)
  # Blocks of consecutive steps (as in training), in reversed order every other
  # round so that no variant always follows the same one; ratios are taken per
  # round, then their median, so slow drifts of a shared machine cancel.
  per_round = {name: [] for name in variants}
  all_times = {name: [] for name in variants}
  for r in range(args.rounds):
    for name in (list(variants) if r % 2 == 0 else reversed(list(variants))):
      times = []
      for _ in range(args.steps):
        states[name], seconds = variants[name].run(states[name], batch)
        times.append(seconds)
      per_round[name].append(statistics.fmean(times))  # amortizes SAQ-ET's tau period
      all_times[name].extend(times)
  results = {}
  for name, times in all_times.items():
    results[name] = {'median_ms': 1e3 * statistics.median(times), 'min_ms': 1e3 * min(times),
                     'max_ms': 1e3 * max(times), 'compile_s': compile_s[name],
                     'round_means_ms': [1e3 * t for t in per_round[name]],
                     'gflops': cost[name]['flops'] / 1e9,
                     'gbytes_accessed': cost[name]['bytes accessed'] / 1e9}
    r = results[name]
    print(f'{name:>12}: {r["median_ms"]:7.1f} ms/step (min {r["min_ms"]:.1f}, max '
          f'{r["max_ms"]:.1f}); compile {r["compile_s"]:.1f} s; XLA cost {r["gflops"]:.2f} '
          f'GFLOP, {r["gbytes_accessed"]:.2f} GB accessed', flush=True)
  ratios, cost_ratios = {}, {}
  for key in TARGETS:
    a, b = key.split('/')
    if a in per_round and b in per_round:
      ratios[key] = statistics.median(x / y for x, y in zip(per_round[a], per_round[b]))
      cost_ratios[key] = results[a]['gbytes_accessed'] / results[b]['gbytes_accessed']
  for key, value in ratios.items():
    verdict = 'ok' if value <= TARGETS[key] else 'ABOVE TARGET'
    print(f'{key:>18}: {value:.3f}  (target <= {TARGETS[key]}) {verdict}; '
          f'bytes-accessed ratio {cost_ratios[key]:.3f}')
  if {'saq', 'saq_et', 'qat_sgd'} <= set(per_round):
    # SAQ-ET pays one SAQ step every tau: its ratio cannot go below this.
    tau = variants['saq_et'].period
    ratios['saq_et_floor'] = 1 + (statistics.median(
        x / y for x, y in zip(per_round['saq'], per_round['qat_sgd'])) - 1) / tau
    print(f'{"saq_et floor":>18}: {ratios["saq_et_floor"]:.3f}  (1 + (saq/qat_sgd - 1) / tau, '
          f'tau={tau})')
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, 'w') as f:
      json.dump({'model': args.model, 'batch': args.batch, 'size': args.size,
                 'steps': args.steps, 'rounds': args.rounds, 'device': jax.devices()[0].device_kind,
                 'backend': jax.default_backend(), 'cpu_count': os.cpu_count(),
                 'machine': platform.machine(), 'jax': jax.__version__,
                 'xla_flags': os.environ.get('XLA_FLAGS', ''), 'results': results,
                 'ratios': ratios, 'bytes_accessed_ratios': cost_ratios, 'targets': TARGETS},
                f, indent=2)
    print(f'wrote {args.json}')


if __name__ == '__main__':
  main()
