"""Loss and gradients of small networks under this process's XLA_FLAGS (tests/test_cpu_flags.py).

  python tests/cpu_flags_script.py OUT.npz

Writes, for a full-precision and a supernet ResNet-8 on one fixed batch, the
loss, every gradient leaf and how many convolutions of the compiled step
XLA:CPU handed to its YNN library. ``compiled_value_and_grad`` is shared with
tests/test_stored_once.py.
"""

import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from asga_jax import models, quant


def _ynn_convolutions(hlo: str) -> int:
  """Convolutions in fusion computations: XLA's own (Eigen) ones sit in the entry."""
  entry = hlo.index('\nENTRY')
  return hlo[:entry].count(' convolution(') + hlo[hlo.index('\n}', entry):].count(' convolution(')


def compiled_value_and_grad(spec: quant.QuantSpec, batch_size: int = 16
                            ) -> tuple[Any, Any]:
  """(compiled loss-and-gradient of a width-8 ResNet-8 on a fixed batch, its params)."""
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(batch_size, 16, 16, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, batch_size))
  model = models.create_model('resnet8', num_classes=10, width=8, quant=spec)
  variables = model.init(jax.random.key(0), images[:1])

  def loss_fn(params):
    logits, _ = model.apply({**variables, 'params': params}, images, train=True,
                            mutable=['batch_stats'])
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  params = variables['params']
  return jax.jit(jax.value_and_grad(loss_fn)).lower(params).compile(), params


def main(path: str) -> None:
  specs = {'fp': quant.QuantSpec(),
           'supernet': quant.QuantSpec(mode='supernet', w_bits=(2, 3, 4, 6),
                                       a_bits=(2, 3, 4, 6))}
  out = {}
  for name, spec in specs.items():
    step, params = compiled_value_and_grad(spec)
    out[f'{name}/ynn_convolutions'] = _ynn_convolutions(step.as_text())
    loss, grads = step(params)
    out[f'{name}/loss'] = np.asarray(loss)
    for key, leaf in jax.tree_util.tree_leaves_with_path(grads):
      out[f'{name}/grad{jax.tree_util.keystr(key)}'] = np.asarray(leaf)
  np.savez(path, **out)

if __name__ == '__main__':
  main(sys.argv[1])
