"""Analysis of trained models: Hessian eigenvalues, plots."""

from asga_jax.analysis.hessian import hvp, top_hessian_eigenvalue
