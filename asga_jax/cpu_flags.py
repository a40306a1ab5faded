"""Default XLA:CPU flags of this package's programs (training, benchmarks, tests).

The flags below were chosen with ``python -m benchmarks.run`` (README,
Performance): on a 2-core x86 CPU they make every step kind faster and leave
losses and gradients within float32 round-off of the default (tested in
``tests/test_cpu_flags.py``). They name XLA:CPU options only, so GPU and TPU
compilation is unchanged.

XLA reads ``XLA_FLAGS`` once, when JAX creates its backends (the first device
query or computation), so :func:`apply` must run before that; importing JAX
is fine. A flag already in the user's ``XLA_FLAGS`` wins over the default,
and ``ASGA_CPU_FLAGS=0`` turns the defaults off.
"""

from __future__ import annotations

import logging
import os
from collections.abc import MutableMapping

# flag -> value, and why.
CPU_FLAGS: dict[str, str] = {
    # XLA:CPU hands most convolutions to its YNN library by default; XLA's own
    # (Eigen) convolutions are faster for the 16-64-channel convolutions and
    # the weight gradients of CIFAR ResNets. YNN keeps its other fusions
    # (reductions, dots): turning them off too is slower for ASGA.
    'xla_cpu_experimental_ynn_fusion_type': '-individual_convolution',
}
OPT_OUT = 'ASGA_CPU_FLAGS'


def _names(xla_flags: str) -> set[str]:
  return {item.split('=', 1)[0].lstrip('-') for item in xla_flags.split()}


def apply(environ: MutableMapping[str, str] | None = None) -> list[str]:
  """Adds :data:`CPU_FLAGS` to ``XLA_FLAGS``, keeping every flag already set.

  Args:
    environ: the environment to change (``os.environ`` by default).

  Returns:
    The flags added, as ``--name=value`` strings (empty when opted out or
    all were set by the user).
  """
  environ = os.environ if environ is None else environ
  if environ.get(OPT_OUT, '1') == '0':
    return []
  current = environ.get('XLA_FLAGS', '')
  present = _names(current)
  added = [f'--{name}={value}' for name, value in CPU_FLAGS.items() if name not in present]
  if added:
    environ['XLA_FLAGS'] = ' '.join(filter(None, [current, *added]))
    if environ is os.environ and _backends_initialized():
      logging.warning('XLA flags %s set after JAX initialized its backends: they take effect '
                      'in new processes only.', ' '.join(added))
  return added


def _backends_initialized() -> bool:
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return bool(getattr(xla_bridge, 'backends_are_initialized', lambda: False)())
