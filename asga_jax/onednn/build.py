"""Builds and loads the oneDNN convolution kernels (``conv.cc``) for XLA:CPU.

oneDNN comes from PyPI (``onednn-cpu-gomp`` and ``onednn-devel-cpu-gomp``,
in requirements.txt on x86-64 Linux): its wheels put ``libdnnl.so`` and the
headers under the environment's data directory (``<venv>/lib``,
``<venv>/include``). ``ASGA_ONEDNN_ROOT`` names another installation with the
same layout. The kernels are compiled once with the system's C++ compiler
(about 5 s) into ``$ASGA_JAX_CACHE`` (default ``~/.cache/asga_jax``), under a
name that hashes the source, jaxlib's version and the oneDNN path, so a
changed source or environment builds anew. A build goes to a temporary file
and is renamed into place: processes building at once never load half a file.

When anything is missing (no oneDNN, no compiler, another OS or processor),
:func:`load` logs why once and returns False; the layers then use XLA's own
convolutions, which give the same results more slowly.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import sysconfig
import tempfile

import jax
import jaxlib

log = logging.getLogger(__name__)

SOURCE = pathlib.Path(__file__).with_name('conv.cc')
# JAX target name -> exported handler symbol in conv.cc.
TARGETS = {
    'asga_onednn_conv_forward': 'AsgaOnednnConvForward',
    'asga_onednn_conv_backward_data': 'AsgaOnednnConvBackwardData',
    'asga_onednn_conv_backward_weights': 'AsgaOnednnConvBackwardWeights',
}


class BuildError(RuntimeError):
  """The kernels cannot be built here; the message says what is missing."""


def onednn_root() -> pathlib.Path:
  """The installation holding ``include/oneapi/dnnl/dnnl.hpp`` and ``lib/libdnnl.so*``."""
  root = pathlib.Path(os.environ.get('ASGA_ONEDNN_ROOT') or sysconfig.get_path('data'))
  if not (root / 'include' / 'oneapi' / 'dnnl' / 'dnnl.hpp').is_file():
    raise BuildError(
        f'no oneDNN headers under {root}/include: pip install onednn-cpu-gomp==2023.2.0 '
        'onednn-devel-cpu-gomp==2023.2.0 (requirements.txt does on x86-64 Linux), or set '
        'ASGA_ONEDNN_ROOT to a oneDNN 3.x installation')
  if not any((root / 'lib').glob('libdnnl.so*')):
    raise BuildError(f'no libdnnl.so under {root}/lib: pip install onednn-cpu-gomp==2023.2.0')
  return root


def cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get('ASGA_JAX_CACHE')
                      or pathlib.Path.home() / '.cache' / 'asga_jax')


def library_path(root: pathlib.Path) -> pathlib.Path:
  """Where the build for this source, jaxlib and oneDNN lives."""
  digest = hashlib.sha256()
  for part in (SOURCE.read_bytes(), jaxlib.__version__.encode(), str(root).encode()):
    digest.update(part)
  return cache_dir() / f'onednn_conv_{digest.hexdigest()[:16]}.so'


def compile_library(root: pathlib.Path, target: pathlib.Path) -> None:
  """Compiles ``conv.cc`` into ``target`` (atomically)."""
  compiler = os.environ.get('CXX') or shutil.which('g++') or shutil.which('c++')
  if compiler is None:
    raise BuildError('no C++ compiler (g++ or $CXX) to build the oneDNN kernels')
  target.parent.mkdir(parents=True, exist_ok=True)
  fd, partial = tempfile.mkstemp(prefix=target.stem, suffix='.so.tmp', dir=target.parent)
  os.close(fd)
  command = [compiler, '-O2', '-std=c++17', '-shared', '-fPIC', '-w', str(SOURCE),
             f'-I{jax.ffi.include_dir()}', f'-I{root / "include"}', f'-L{root / "lib"}',
             '-ldnnl', f'-Wl,-rpath,{root / "lib"}', '-o', partial]
  try:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
      raise BuildError(f'compiling {SOURCE.name} failed:\n{" ".join(command)}\n'
                       f'{result.stderr[-4000:]}')
    os.replace(partial, target)
  finally:
    if os.path.exists(partial):
      os.remove(partial)


def build() -> pathlib.Path:
  """Path of the compiled kernels, building them first if needed.

  Raises:
    BuildError: this machine cannot build them (the message says why).
  """
  if platform.system() != 'Linux' or platform.machine() not in ('x86_64', 'AMD64'):
    raise BuildError(f'the oneDNN kernels are built for x86-64 Linux only, not '
                     f'{platform.system()} {platform.machine()}')
  root = onednn_root()
  target = library_path(root)
  if not target.is_file():
    log.info('Building the oneDNN convolution kernels into %s', target)
    compile_library(root, target)
  return target


@functools.cache
def load() -> bool:
  """Builds (once per environment) and registers the kernels with XLA:CPU.

  Returns:
    True if the kernels are registered; False (logged once, with the reason)
    if they cannot be built here.
  """
  try:
    library = ctypes.CDLL(str(build()))
  except (BuildError, OSError) as error:
    log.warning('XLA\'s own convolutions will be used on CPU (slower): %s', error)
    return False
  for name, symbol in TARGETS.items():
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, symbol)),
                                platform='cpu')
  return True
