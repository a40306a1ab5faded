"""Extracting an image-folder archive (.tar.gz) once into a cache folder."""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import zlib

from absl import logging

from asga_jax.data.base import DataError

_MARKER = '.asga_jax_extracted'
_SUFFIXES = ('.tar.gz', '.tgz', '.tar')


def _fingerprint(archive: str) -> str:
  # Path, size and mtime rather than a content hash: hashing a 150 GB ImageNet archive on every run
  # would take minutes, and a replaced or rewritten archive still gets a new fingerprint.
  stat = os.stat(archive)
  key = f'{os.path.realpath(archive)}|{stat.st_size}|{stat.st_mtime_ns}'
  return hashlib.sha256(key.encode()).hexdigest()


def _read_marker(path: str) -> str:
  try:
    with open(path, encoding='utf-8') as f:
      return f.read()
  except FileNotFoundError:
    return ''


def _split_root(folder: str, archive: str) -> str:
  """Returns `folder`, or its single subfolder, whichever holds `train/`."""
  if os.path.isdir(os.path.join(folder, 'train')):
    return folder
  entries = [e for e in os.scandir(folder) if e.is_dir() and not e.name.startswith('.')]
  if len(entries) == 1 and os.path.isdir(os.path.join(entries[0].path, 'train')):
    return entries[0].path
  raise DataError(
      f'Archive {archive} has no train/ folder at its top level (nor inside a single top-level '
      f'folder); found {sorted(e.name for e in os.scandir(folder))}. Expected the image-folder '
      'layout train/<class>/<image>, test/<class>/<image>; repack the archive in that layout.')


def extract_archive(archive: str, cache_dir: str) -> str:
  """Extracts an image-folder archive into `cache_dir` once and returns its split root.

  The archive is unpacked into a temporary folder inside `cache_dir`; a marker holding the archive's
  fingerprint is written last, and the folder is then renamed into place in one step. A run that
  dies half way therefore leaves only a temporary folder, which is never used, and a second call
  (or a concurrent one) reuses the finished folder instead of extracting again.

  Args:
    archive: path of a .tar.gz, .tgz or .tar file in the layout train/<class>/<image>, test/...
      (optionally inside one top-level folder).
    cache_dir: folder that keeps extracted archives; created if needed ('~' is expanded).

  Returns:
    The extracted folder that contains train/ (and the other split folders).

  Raises:
    DataError: the archive is missing, corrupt, unsafe or not in the image-folder layout.
  """
  archive = os.path.abspath(os.path.expanduser(archive))
  cache_dir = os.path.abspath(os.path.expanduser(cache_dir))
  if not os.path.isfile(archive):
    raise DataError(f'Archive {archive} does not exist. Check --config.data.archive, or point '
                    '--config.data.folder at an already extracted image folder.')
  fingerprint = _fingerprint(archive)
  stem = os.path.basename(archive)
  for suffix in _SUFFIXES:
    stem = stem.removesuffix(suffix)
  target = os.path.join(cache_dir, f'{stem}-{fingerprint[:16]}')
  marker = os.path.join(target, _MARKER)

  if os.path.isdir(target):
    if _read_marker(marker) == fingerprint:
      return _split_root(target, archive)
    logging.warning('Removing %s: it lacks a valid %s marker (foreign or damaged).', target,
                    _MARKER)
    shutil.rmtree(target)

  os.makedirs(cache_dir, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{stem}.partial-', dir=cache_dir)
  try:
    logging.info('Extracting %s into %s', archive, target)
    try:
      with tarfile.open(archive, 'r:*') as tar:
        # filter='data' refuses absolute paths, links out of the folder and device files; Pythons
        # older than 3.10.12 / 3.11.4 lack it.
        safe = {'filter': 'data'} if hasattr(tarfile, 'data_filter') else {}
        tar.extractall(tmp, **safe)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
      raise DataError(f'Could not extract {archive} ({type(e).__name__}: {e}); the file is '
                      'corrupt, truncated or not a tar archive. Copy it again.') from e
    _split_root(tmp, archive)  # Fail before publishing a folder without the expected layout.
    with open(os.path.join(tmp, _MARKER), 'w', encoding='utf-8') as f:
      f.write(fingerprint)
    try:
      os.rename(tmp, target)
    except OSError:
      # Another process published the same archive first; use its copy.
      if _read_marker(marker) != fingerprint:
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return _split_root(target, archive)
