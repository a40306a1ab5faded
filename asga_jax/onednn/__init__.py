"""oneDNN convolutions for XLA:CPU (see :mod:`asga_jax.onednn.conv`)."""

from asga_jax.onednn import build, conv
from asga_jax.onednn.conv import (DIMENSION_NUMBERS, conv2d, enabled, explicit_padding,
                                  supported)

__all__ = ['DIMENSION_NUMBERS', 'build', 'conv', 'conv2d', 'enabled', 'explicit_padding',
           'supported']
