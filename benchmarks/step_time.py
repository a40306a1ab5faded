"""Step times of the search and QAT steps with and without sharpness, and ratios.

  python -m benchmarks.step_time                      # ResNet-20 CIFAR, batch 128
  python -m benchmarks.step_time --rounds 5 --steps 4 --json benchmarks/results/x.json

Each step is jitted with the train state donated and warmed up; then, for
``--rounds`` rounds, every variant runs ``--steps`` timed steps; ratios are the
median over rounds of the rounds' mean step times (means amortize SAQ-ET's
pass every tau steps); compile time reported separately. All
variants of a group share the model, batch, loss and base optimizer (SGD,
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
from asga_jax.quant import LayerBits, QuantSpec, collect_layer_costs, complexity_loss
from asga_jax.train import steps

TARGETS = {'asga/supernet_sgd': 2.05, 'asga/optax_sam': 1.03, 'saq_et/qat_sgd': 1.15}


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
  variants = {}  # name -> (variables, optimizer, step)
  if args.group in ('supernet', 'all'):
    model = models.create_model(args.model, num_classes=10, quant=QuantSpec(mode='supernet'))
    variables = jax.jit(model.init)(jax.random.key(0), batch['image'][:1])
    costs = collect_layer_costs(model, batch['image'][:1])
    search_step = lambda tx: steps.make_train_step(model, tx, costs=costs, comp_weight=0.1)
    sam = optax.contrib.sam(base, optax.chain(optax.contrib.normalize(), optax.sgd(0.1)),
                            sync_period=2, opaque_mode=True)
    for name, tx in (('supernet_sgd', base), ('asga', optim.asga(base)),
                     ('sam', optim.sam(base, rho=0.1))):
      variants[name] = (variables, tx, search_step(tx))
    variants['optax_sam'] = (variables, sam, optax_sam_step(model, sam, costs, 0.1))
  if args.group in ('qat', 'all'):
    model = models.create_model(args.model, num_classes=10,
                                quant=QuantSpec(mode='fixed', uniform=LayerBits(4, 4)))
    variables = jax.jit(model.init)(jax.random.key(0), batch['image'][:1])
    for name, tx, qgrads in (('qat_sgd', base, False),
                             ('saq', optim.saq(base, rho=0.5), True),
                             ('saq_et', optim.saq(base, rho=0.5, tau=4), True)):
      variants[name] = (variables, tx, steps.make_train_step(model, tx, quantized_grads=qgrads))

  compiled, states, compile_s = {}, {}, {}
  for name, (variables, tx, step) in variants.items():
    state = steps.create_train_state(jax.tree.map(jnp.copy, dict(variables)), tx)  # donated
    compiled[name], states[name], compile_s[name] = compile_step(step, state, batch)
  # Rounds: every variant runs once per round, so slow drifts of a shared machine
  # hit all of them; ratios are taken per round, then their median.
  per_round = {name: [] for name in variants}
  all_times = {name: [] for name in variants}
  for _ in range(args.rounds):
    for name in variants:
      states[name], times = timed_steps(compiled[name], states[name], batch, args.steps)
      per_round[name].append(statistics.fmean(times))  # amortizes SAQ-ET's every-tau pass
      all_times[name].extend(times)
  results = {}
  for name, times in all_times.items():
    results[name] = {'median_ms': 1e3 * statistics.median(times), 'min_ms': 1e3 * min(times),
                     'max_ms': 1e3 * max(times), 'compile_s': compile_s[name],
                     'round_means_ms': [1e3 * t for t in per_round[name]]}
    r = results[name]
    print(f'{name:>10}: {r["median_ms"]:8.1f} ms/step (min {r["min_ms"]:.1f}, max '
          f'{r["max_ms"]:.1f}), compile+first {r["compile_s"]:.1f} s', flush=True)
  ratios = {}
  for key in TARGETS:
    a, b = key.split('/')
    if a in per_round and b in per_round:
      ratios[key] = statistics.median(x / y for x, y in zip(per_round[a], per_round[b]))
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
