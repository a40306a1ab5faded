"""Step time of supernet SGD, ASGA and optax.contrib.sam on one model and batch.

  python -m benchmarks.step_time                      # ResNet-20 CIFAR, batch 128
  python -m benchmarks.step_time --rounds 5 --steps 4 --json benchmarks/results/x.json

Each step is jitted with the train state donated and warmed up; then, for
``--rounds`` rounds, every variant runs ``--steps`` timed steps (medians and
per-round ratios reported; compile time reported separately). All
variants share the model, batch, loss and base optimizer (SGD, momentum 0.9):

* sgd: the supernet search step without sharpness (one gradient evaluation);
* asga: ``asga_jax.optim.asga`` around the same SGD (two evaluations);
* optax_sam: ``optax.contrib.sam`` in opaque mode (two evaluations), the peer.

Targets (issue 3): asga / sgd <= 2.05 and asga / optax_sam <= 1.03.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from asga_jax import models, optim
from asga_jax.quant import QuantSpec, collect_layer_costs, complexity_loss
from asga_jax.train import steps

TARGETS = {'asga/sgd': 2.05, 'asga/optax_sam': 1.03}


def optax_sam_step(model, tx, costs, comp_weight):
  """The same search step, driven by optax.contrib.sam's opaque-mode convention."""
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


def compile_step(step, state, batch):
  """Jits ``step`` (state donated); returns (jitted, state, compile + first call seconds)."""
  jitted = jax.jit(step, donate_argnums=0)
  t0 = time.perf_counter()
  state, metrics = jitted(state, batch)
  jax.block_until_ready((state, metrics))
  return jitted, state, time.perf_counter() - t0


def timed_steps(jitted, state, batch, n_steps: int) -> tuple[Any, list[float]]:
  """One untimed warm-up call, then ``n_steps`` timed calls (seconds each)."""
  state, metrics = jitted(state, batch)
  jax.block_until_ready((state, metrics))
  times = []
  for _ in range(n_steps):
    t0 = time.perf_counter()
    state, metrics = jitted(state, batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
  return state, times


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='resnet20', choices=sorted(models.MODELS))
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--size', type=int, default=32)
  parser.add_argument('--steps', type=int, default=5, help='timed steps per variant and round')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--json', default=None, help='write the results here as JSON')
  args = parser.parse_args()

  spec = QuantSpec(mode='supernet', w_bits=(2, 3, 4, 6), a_bits=(2, 3, 4, 6))
  model = models.create_model(args.model, num_classes=10, quant=spec)
  rng = np.random.default_rng(0)
  batch = {'image': jnp.asarray(rng.normal(size=(args.batch, args.size, args.size, 3)),
                                jnp.float32),
           'label': jnp.asarray(rng.integers(0, 10, args.batch), jnp.int32)}
  variables = jax.jit(model.init)(jax.random.key(0), batch['image'][:1])
  costs = collect_layer_costs(model, batch['image'][:1])
  base = optax.sgd(0.01, momentum=0.9)
  comp_weight = 0.1
  variants = {
      'sgd': (base, steps.make_train_step(model, base, costs=costs, comp_weight=comp_weight)),
      'asga': (optim.asga(base),
               steps.make_train_step(model, optim.asga(base), costs=costs,
                                     comp_weight=comp_weight)),
  }
  sam = optax.contrib.sam(base, optax.chain(optax.contrib.normalize(), optax.sgd(0.1)),
                          sync_period=2, opaque_mode=True)
  variants['optax_sam'] = (sam, optax_sam_step(model, sam, costs, comp_weight))

  compiled, states, compile_s = {}, {}, {}
  for name, (tx, step) in variants.items():
    state = steps.create_train_state(jax.tree.map(jnp.copy, variables), tx)  # donated
    compiled[name], states[name], compile_s[name] = compile_step(step, state, batch)
  # Rounds: every variant runs once per round, so slow drifts of a shared machine
  # hit all of them; ratios are taken per round, then their median.
  per_round = {name: [] for name in variants}
  all_times = {name: [] for name in variants}
  for _ in range(args.rounds):
    for name in variants:
      states[name], times = timed_steps(compiled[name], states[name], batch, args.steps)
      per_round[name].append(statistics.median(times))
      all_times[name].extend(times)
  results = {}
  for name, times in all_times.items():
    results[name] = {'median_ms': 1e3 * statistics.median(times), 'min_ms': 1e3 * min(times),
                     'max_ms': 1e3 * max(times), 'compile_s': compile_s[name],
                     'round_medians_ms': [1e3 * t for t in per_round[name]]}
    r = results[name]
    print(f'{name:>10}: {r["median_ms"]:8.1f} ms/step (min {r["min_ms"]:.1f}, max '
          f'{r["max_ms"]:.1f}), compile+first {r["compile_s"]:.1f} s', flush=True)
  ratio = lambda a, b: statistics.median(x / y for x, y in zip(per_round[a], per_round[b]))
  ratios = {'asga/sgd': ratio('asga', 'sgd'), 'asga/optax_sam': ratio('asga', 'optax_sam')}
  for key, value in ratios.items():
    verdict = 'ok' if value <= TARGETS[key] else 'ABOVE TARGET'
    print(f'{key:>16}: {value:.3f}  (target <= {TARGETS[key]}) {verdict}')
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, 'w') as f:
      json.dump({'model': args.model, 'batch': args.batch, 'size': args.size,
                 'steps': args.steps, 'rounds': args.rounds, 'device': jax.devices()[0].device_kind,
                 'backend': jax.default_backend(), 'cpu_count': os.cpu_count(),
                 'machine': platform.machine(), 'jax': jax.__version__,
                 'xla_flags': os.environ.get('XLA_FLAGS', ''), 'results': results,
                 'ratios': ratios, 'targets': TARGETS}, f, indent=2)
    print(f'wrote {args.json}')


if __name__ == '__main__':
  main()
