"""Run by test_sharding.py as two processes on localhost:
python -m tests.multihost_script PID PORT OUT.

Each process joins through jax.distributed over the loopback address, feeds
its half of a global batch, takes three data-parallel ASGA search steps and
saves its own copy of the parameters to OUT/params_<PID>.npz. Then process 1
receives SIGTERM (a preemption notice) at step 5 of a loop; each process
prints the step at which ``sharding.preemption_reached`` told it to save.
"""

import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from asga_jax import models, optim, quant
from asga_jax.quant import QuantSpec
from asga_jax.train import sharding, steps

GLOBAL_BATCH = 8


def global_batch() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  return {'image': rng.normal(size=(GLOBAL_BATCH, 16, 16, 3)).astype(np.float32),
          'label': rng.integers(0, 10, GLOBAL_BATCH).astype(np.int32)}


def setup():
  model = models.resnet8(10, width=4, quant=QuantSpec(mode='supernet'))
  costs = quant.collect_layer_costs(model, jnp.zeros((1, 16, 16, 3)))
  tx = optax.chain(optim.complexity_penalty(costs, weight=0.1),
                   optim.asga(optax.sgd(0.05, momentum=0.9)))
  variables = jax.jit(model.init)(jax.random.key(0, impl='rbg'), jnp.zeros((1, 16, 16, 3)))
  return model, costs, tx, variables


def main() -> None:
  pid, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
  sharding.initialize_distributed(f'127.0.0.1:{port}', 2, pid)
  assert jax.process_count() == 2 and jax.process_index() == pid
  model, costs, tx, variables = setup()
  mesh = sharding.make_mesh()
  state, shardings = steps.init_train_state(variables, tx, mesh)
  step = steps.jit_train_step(model, tx, costs=costs, mesh=mesh, state_sharding=shardings)
  half = GLOBAL_BATCH // 2
  local = {k: v[pid * half:(pid + 1) * half] for k, v in global_batch().items()}
  for i in range(3):
    state, metrics = step(state, sharding.put_batch(local, mesh), i)
  params = {jax.tree_util.keystr(p): np.asarray(x.addressable_data(0))
            for p, x in jax.tree_util.tree_leaves_with_path(state.params)}
  np.savez(f'{out}/params_{pid}.npz', **params)
  print(f'process {pid}: loss {float(metrics["loss"]):.4f}', flush=True)

  for step in range(1, 1000):
    if pid == 1 and step == 5:
      os.kill(os.getpid(), signal.SIGTERM)  # caught by JAX's preemption notifier
    if sharding.preemption_reached(step):
      print(f'process {pid}: save at step {step}', flush=True)
      break
    time.sleep(0.01)  # a training step


if __name__ == '__main__':
  main()
