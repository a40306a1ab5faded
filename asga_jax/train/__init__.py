"""The training program: config, steps, stages, checkpoints, metrics.

The step functions (:mod:`asga_jax.train.steps`, :mod:`asga_jax.train.sharding`)
need only JAX, Flax and optax. The program's entry points below bring in
TensorFlow (through the input pipeline) and ml_collections, so they are loaded
on first use: a machine with JAX alone can time the steps
(``python -m benchmarks.run --no-input``), as the CUDA image of a GPU box often
has no TensorFlow.
"""

import importlib
from typing import Any

# public name -> the submodule that defines it
_ENTRY_POINTS = {
    'ConfigError': 'config',
    'default_config': 'config',
    'validate_config': 'config',
    'train_and_evaluate': 'trainer',
}

__all__ = sorted(_ENTRY_POINTS)


def __getattr__(name: str) -> Any:
  if name in _ENTRY_POINTS:
    return getattr(importlib.import_module(f'asga_jax.train.{_ENTRY_POINTS[name]}'), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__() -> list[str]:
  return sorted({*globals(), *__all__})
