"""Analysis of trained models: Hessian eigenvalues, plots."""

from asga_jax.analysis.hessian import HessianEigen, hvp, top_hessian_eigenvalue
from asga_jax.analysis.landscape import (filter_normalized_direction, landscape_1d, landscape_2d,
                                         plot_landscape_1d, plot_landscape_2d, save_landscape)

__all__ = [
    'filter_normalized_direction',
    'HessianEigen',
    'hvp',
    'landscape_1d',
    'landscape_2d',
    'plot_landscape_1d',
    'plot_landscape_2d',
    'save_landscape',
    'top_hessian_eigenvalue',
]
