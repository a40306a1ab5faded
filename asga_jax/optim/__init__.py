"""Sharpness-aware optax transforms (SAM, ASGA, SAQ), the complexity term with a BOPs
target, and parameter partitioning."""

from asga_jax.optim.asga import ASGAState, asga, asga_gradient
from asga_jax.optim.complexity import ComplexityState, complexity_penalty, complexity_stats
from asga_jax.optim.partition import (ARCH, LABELS, NORM, QUANT, WEIGHTS, count_params,
                                      label_mask, param_labels)
from asga_jax.optim.sam import SAMState, sam, sam_gradient, sharpness_probe
from asga_jax.optim.saq import SAQState, saq, saq_gradient
from asga_jax.optim.sharpness import sharpness_stats

__all__ = [
    'ARCH',
    'asga',
    'asga_gradient',
    'ASGAState',
    'complexity_penalty',
    'complexity_stats',
    'ComplexityState',
    'count_params',
    'label_mask',
    'LABELS',
    'NORM',
    'param_labels',
    'QUANT',
    'sam',
    'sam_gradient',
    'SAMState',
    'saq',
    'saq_gradient',
    'SAQState',
    'sharpness_probe',
    'sharpness_stats',
    'WEIGHTS',
]
