"""Throughput of the training input pipeline: read, decode, augment, normalize, batch.

Times ``asga_jax.data.train_batches`` (the trainer's own pipeline) from an image
folder or archive, two ways: ``decode`` decodes every JPEG as it goes (the cost
of a pass over images that are not cached: epoch 0, or large images), and
``cached`` reads the decoded uint8 images from memory (CIFAR-size epochs after
the first) and only augments. Start-up (listing files, filling the cache) is
reported apart from the steady rate.
"""

from __future__ import annotations

import copy
import os
import time
from typing import Any

from asga_jax import data
from asga_jax.data.config import LARGE_IMAGE_SIZE


def data_config(archive: str | None, image_size: int) -> Any:
  """The trainer's data config for an image-folder ``archive``, or the embedded sample (None)."""
  cfg = data.default_data_config()
  if archive is None:
    cfg.name = 'cifar10_sample'
  else:
    cfg.name, cfg.archive = 'folder', os.path.abspath(archive)
  cfg.image_size = image_size
  return cfg


def _rate(cfg: Any, batch: int, num_batches: int) -> dict[str, float]:
  t0 = time.perf_counter()
  batches = data.train_batches(cfg, global_batch_size=batch, seed=0, epoch=0)
  next(batches)
  startup = time.perf_counter() - t0
  t0 = time.perf_counter()
  count = 0
  for count, _ in enumerate(batches, 1):
    if count == num_batches:
      break
  seconds = time.perf_counter() - t0
  if count == 0:
    raise ValueError(f'the data set has fewer than 2 batches of {batch}; lower --batch.')
  return {'images_per_s': count * batch / seconds, 'batches': count, 'startup_s': startup}


def measure(cfg: Any, batch: int, num_batches: int) -> dict[str, dict[str, float]]:
  """Images per second of the training pipeline, decoding and from the cache.

  Args:
    cfg: data config (``asga_jax.data.default_data_config`` fields).
    batch: global batch size.
    num_batches: batches timed after the first (fewer if an epoch is shorter).

  Returns:
    {'decode': {...}, 'cached': {...}}, each with images_per_s, batches and
    startup_s; no 'cached' from ``LARGE_IMAGE_SIZE`` px on (not cached there).
  """
  results = {}
  modes = (('decode', False), ('cached', True))
  if (cfg.image_size or 32) >= LARGE_IMAGE_SIZE:  # large images are never cached
    modes = modes[:1]
  for mode, cache in modes:
    mode_cfg = copy.deepcopy(cfg)  # the caller's config stays as it was
    mode_cfg.cache = cache
    results[mode] = _rate(mode_cfg, batch, num_batches)
  return results
