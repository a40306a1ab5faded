"""Run by test_sharding.py (python -m tests.multidevice_script) with 8 simulated CPU devices.

Prints one JSON object: for each check, the largest relative difference of
parameters (and BatchNorm statistics): data-parallel steps on 8 devices (state
replicated, or FSDP-sharded) against one-device steps, m-sharpness against the global
ascent, and a checkpoint saved from 8 devices against its restores onto meshes of 1 and 4 devices.
The ASGA search checks report the difference relative to the distance the
steps moved (see test_sharding.SEARCH_TOLERANCE).
"""

import json
import os
import sys
import tempfile

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8')

import jax  # noqa: E402  (after XLA_FLAGS)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from asga_jax import models, optim, quant  # noqa: E402
from asga_jax.quant import LayerBits, QuantSpec  # noqa: E402
from asga_jax.train import sharding, steps  # noqa: E402
from asga_jax.train.checkpoints import StageCheckpoints  # noqa: E402
from tests.reference import difference_per_distance_moved  # noqa: E402


def max_rel_diff(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))) /
                   (np.max(np.abs(np.asarray(y))) + 1e-12))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def compare(model, tx, batch, num_steps=2, single_kwargs=None, fsdp=False, **kwargs):
  """(max relative difference, parameters' difference per distance moved, final sharded state).

  ``single_kwargs`` change the 1-device step.
  """
  variables = jax.jit(model.init)(jax.random.key(0, impl='rbg'), batch['image'][:1])
  single = steps.jit_train_step(model, tx, **{**kwargs, **(single_kwargs or {})})
  mesh = sharding.make_mesh()
  a = steps.create_train_state(jax.tree.map(jnp.copy, variables), tx)
  # min_size=64: the tiny test model's kernels are split too.
  b, shardings = steps.init_train_state(variables, tx, mesh, fsdp=fsdp, min_size=64)
  if fsdp:
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(b.params))
  sharded = steps.jit_train_step(model, tx, mesh=mesh, state_sharding=shardings, **kwargs)
  global_batch = sharding.put_batch(batch, mesh)
  assert len(global_batch['image'].sharding.device_set) == 8
  for i in range(num_steps):
    a, _ = single(a, batch, i)
    b, _ = sharded(b, global_batch, i)
  return (max(max_rel_diff(b.params, a.params), max_rel_diff(b.batch_stats, a.batch_stats)),
          difference_per_distance_moved(*(jax.tree.leaves(jax.device_get(t))
                                          for t in (a.params, b.params, variables['params']))), b)


def main() -> None:
  assert jax.device_count() == 8, jax.devices()
  rng = np.random.default_rng(0)
  batch = {'image': rng.normal(size=(16, 16, 16, 3)).astype(np.float32),
           'label': rng.integers(0, 10, 16).astype(np.int32)}
  results = {}
  supernet = models.resnet8(10, width=4, quant=QuantSpec(mode='supernet'))
  costs = quant.collect_layer_costs(supernet, jnp.zeros((1, 16, 16, 3)))
  tx = optax.chain(optim.complexity_penalty(costs, weight=0.1),
                   optim.asga(optax.sgd(0.05, momentum=0.9)))
  _, results['search_asga'], state = compare(supernet, tx, batch, costs=costs)
  _, results['search_asga_fsdp'], _ = compare(supernet, tx, batch, costs=costs, fsdp=True)
  fixed = models.resnet8(10, width=4, quant=QuantSpec(mode='fixed', uniform=LayerBits(4, 4)))
  results['finetune_sgd'], _, _ = compare(fixed, optax.sgd(0.05, momentum=0.9, nesterov=True),
                                          batch)
  # m-sharpness with m = the per-device batch (2): each replica perturbs along its own
  # gradient. Sharded, it equals the one-device reference over the same sub-batches,
  # and differs from the global ascent direction.
  sam = optim.sam(optax.sgd(0.05), rho=0.5)
  results['m_sharpness_vs_reference'], _, _ = compare(fixed, sam, batch, m_sharpness=2)
  results['m_sharpness_vs_global'], _, _ = compare(fixed, sam, batch, m_sharpness=2,
                                                   single_kwargs={'m_sharpness': 0})
  # A checkpoint written from 8 devices restores onto 1 and onto 4.
  with tempfile.TemporaryDirectory() as directory:
    ckpts = StageCheckpoints(directory, keep=1)
    ckpts.save(2, state, {'epoch': 0})
    ckpts.wait()
    for n in (1, 4):
      mesh = sharding.make_mesh(jax.devices()[:n])
      target = sharding.put_replicated(jax.tree.map(jnp.zeros_like, jax.device_get(state)), mesh)
      restored, _ = ckpts.restore(target)
      assert {d.id for d in jax.tree.leaves(restored.params)[0].sharding.device_set} == \
          {d.id for d in jax.devices()[:n]}
      results[f'restore_8_to_{n}'] = max_rel_diff(restored.params, state.params)
    ckpts.close()
  json.dump(results, sys.stdout)


if __name__ == '__main__':
  main()
