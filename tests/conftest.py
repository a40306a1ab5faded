"""Test-suite settings, applied before JAX initializes.

The tests compile many small XLA programs and run each a few times, so XLA's
compile time dominates: skipping LLVM's expensive optimizations and splitting
code generation halves it (results are the same; runtime is a little slower).
A user's own XLA_FLAGS are kept; ASGA_TEST_XLA_FLAGS='' tests without these.
The program's CPU defaults (``asga_jax.cpu_flags``) are added, as in training.
"""

import os

from asga_jax import cpu_flags

_FAST_COMPILE = ('--xla_llvm_disable_expensive_passes=true --xla_backend_optimization_level=0 '
                 '--xla_cpu_parallel_codegen_split_count=8')
os.environ['XLA_FLAGS'] = ' '.join(filter(None, [
    os.environ.get('ASGA_TEST_XLA_FLAGS', _FAST_COMPILE), os.environ.get('XLA_FLAGS', '')]))
cpu_flags.apply()
