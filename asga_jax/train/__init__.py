"""The training program: config, steps, stages, checkpoints, metrics.

Imports TensorFlow (through the input pipeline); the notebook-facing library
(:mod:`asga_jax.quant`, :mod:`asga_jax.optim`) does not.
"""

from asga_jax.train.config import ConfigError, default_config, validate_config
from asga_jax.train.trainer import train_and_evaluate

__all__ = [
    'ConfigError',
    'default_config',
    'train_and_evaluate',
    'validate_config',
]
