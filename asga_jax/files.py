"""Atomic file writes: every output appears whole or not at all.

A crash, a kill or a full disk while writing leaves the previous version of
the file (or no file) in place, never a partial one: the content goes to a
temporary file in the same directory, is flushed to disk, and replaces the
target with one ``os.replace``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
from collections.abc import Iterator
from typing import IO, Any

PathLike = str | os.PathLike[str]


@functools.cache
def _file_mode() -> int:
  """Permissions of a newly created file under the process umask (mkstemp's are 0o600)."""
  umask = os.umask(0o022)  # reading the umask means setting it; set it straight back
  os.umask(umask)
  return 0o666 & ~umask


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = 'w') -> Iterator[IO[Any]]:
  """Opens a temporary file that replaces ``path`` when the block completes.

  On an exception (including a failed write such as ENOSPC) the temporary file
  is removed and ``path`` is untouched.

  Example::

    with atomic_write('results.json') as f:
      json.dump(results, f)

  Args:
    path: the file to (re)place.
    mode: 'w' (text) or 'wb' (binary).
  """
  if mode not in ('w', 'wb'):
    raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
  path = os.fspath(path)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or '.',
                             prefix=f'.{os.path.basename(path)}.', suffix='.tmp')
  try:
    os.chmod(tmp, _file_mode())
    with os.fdopen(fd, mode) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def write_json(path: PathLike, content: Any, **kwargs: Any) -> None:
  """Writes ``content`` as indented JSON, atomically (``kwargs`` go to ``json.dump``)."""
  with atomic_write(path) as f:
    json.dump(content, f, indent=2, **kwargs)
    f.write('\n')


def save_figure(fig: Any, path: PathLike, **kwargs: Any) -> None:
  """``fig.savefig`` atomically; the format follows ``path``'s extension."""
  fmt = os.path.splitext(os.fspath(path))[1].lstrip('.') or 'png'
  with atomic_write(path, 'wb') as f:
    fig.savefig(f, format=fmt, **kwargs)
