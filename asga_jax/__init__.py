"""asga_jax: generalizable mixed-precision quantization with sharpness-aware search.

The notebook-facing library (no TensorFlow import):

* :mod:`asga_jax.quant`: quantizers, quantized layers, MACs/BOPs, policies;
* :mod:`asga_jax.optim`: the ASGA optax transform and parameter partitioning;
* :mod:`asga_jax.models`: ResNets built from the quantized layers;
* :mod:`asga_jax.analysis`: Hessian eigenvalues and plots.

The training program (``python -m asga_jax.main``) lives in :mod:`asga_jax.train`
and :mod:`asga_jax.data`.
"""

from asga_jax import models, optim, quant

__version__ = '0.1.0'

__all__ = [
    '__version__',
    'models',
    'optim',
    'quant',
]
