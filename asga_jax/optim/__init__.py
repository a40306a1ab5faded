"""Sharpness-aware optax transforms and parameter partitioning."""

from asga_jax.optim.asga import ASGAState, asga, asga_gradient, sharpness_stats
from asga_jax.optim.partition import (ARCH, LABELS, NORM, QUANT, WEIGHTS, count_params,
                                      label_mask, param_labels)
