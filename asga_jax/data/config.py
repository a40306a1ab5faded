"""Input-pipeline configuration: documented defaults, per-data-set defaults and validation."""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from typing import Any

import ml_collections
from ml_collections import config_dict

from asga_jax.data import archive as archive_lib
from asga_jax.data.base import DataError

SAMPLE_DIR = pathlib.Path(__file__).resolve().parent / 'samples' / 'cifar10'
"""The embedded CIFAR-10 sample (100 train + 20 test JPEGs per class); name='cifar10_sample'."""

CIFAR_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

# Below this side length images use the CIFAR recipe (pad + crop, decoded images cacheable);
# from it on the ImageNet recipe (random resized crop; resize + center crop for eval).
LARGE_IMAGE_SIZE = 64


@dataclasses.dataclass(frozen=True)
class _Defaults:
  eval_split: str
  image_size: int
  stats: tuple[tuple[float, ...], tuple[float, ...]] | None  # None: chosen by image_size.


# Eval splits are what TFDS calls them for each data set.
_DATASETS = {
    'cifar10': _Defaults('test', 32, CIFAR_STATS),
    'cifar100': _Defaults('test', 32, CIFAR_STATS),
    'oxford_flowers102': _Defaults('test', 224, IMAGENET_STATS),
    'food101': _Defaults('validation', 224, IMAGENET_STATS),
    'imagenet2012': _Defaults('validation', 224, IMAGENET_STATS),
    'imagenette': _Defaults('validation', 224, IMAGENET_STATS),
    'folder': _Defaults('test', 32, None),
    'cifar10_sample': _Defaults('test', 32, CIFAR_STATS),
}
FOLDER_NAMES = ('folder', 'cifar10_sample')
VALID_NAMES = tuple(_DATASETS)


def default_data_config() -> ml_collections.ConfigDict:
  """Returns the data configuration with its defaults (`None` fields are typed placeholders).

  Fields:
    name: 'cifar10', 'cifar100', 'oxford_flowers102', 'food101', 'imagenet2012', 'imagenette'
      (TFDS data sets, read offline from `data_dir`), 'folder' (an image folder, see `folder`) or
      'cifar10_sample' (the small CIFAR-10 sample shipped in the package).
    data_dir: TFDS data folder; None uses TFDS's default (~/tensorflow_datasets).
    folder: root of an image folder: <folder>/<split>/<class>/<image> (jpg, png, gif, bmp, webp);
      labels index the sorted class-folder names of the train split.
    archive: a .tar.gz in that layout, used when `folder` is unset: extracted once into `cache_dir`.
    cache_dir: where archives are extracted.
    image_size: side of the output images; None: 32 for CIFAR and folders, 224 for the others.
      Images of another native size are resized.
    train_split, eval_split: split names (TFDS split or sub-folder); eval_split None: the data set's
      eval split ('test' or 'validation').
    subset: use only this many training examples (fixed selection, the same for every seed):
      class-balanced for folders, the first `subset` of the TFDS split (TFDS stores examples
      shuffled).
    mean, std: per-channel normalization in [0, 1] units; None: CIFAR constants for CIFAR data (and
      folders below 64 px), ImageNet constants otherwise.
    augment: augment training images (pad-4 crop + flip below 64 px, random resized crop + flip
      from 64 px).
    shuffle_buffer: shuffle buffer of streamed TFDS data (ignored when examples are indexed: folders
      and cached data are permuted exactly).
    cache: keep the decoded images of a split in memory (uint8, before augmentation); None: on below
      64 px (CIFAR train is 154 MB), off above (not supported there).
    on_bad_image: 'skip' (skip and count, with a warning) or 'error' (raise) for files in an image
      folder that are not images.
  """
  return ml_collections.ConfigDict({
      'name': 'cifar10',
      'data_dir': config_dict.placeholder(str),
      'folder': config_dict.placeholder(str),
      'archive': config_dict.placeholder(str),
      'cache_dir': '~/.cache/asga_jax',
      'image_size': config_dict.placeholder(int),
      'train_split': 'train',
      'eval_split': config_dict.placeholder(str),
      'subset': config_dict.placeholder(int),
      'mean': config_dict.placeholder(tuple),
      'std': config_dict.placeholder(tuple),
      'augment': True,
      'shuffle_buffer': 10_000,
      'cache': config_dict.placeholder(bool),
      'on_bad_image': 'skip',
  })


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  """Which examples are read, in which natural order (hashable: sources are memoized on it)."""
  name: str
  tfds_name: str | None  # None for image folders.
  data_dir: str | None
  root: str | None  # Image-folder root, for folder data sets.
  train_split: str
  eval_split: str
  image_size: int
  subset: int | None
  cache: bool
  shuffle_buffer: int
  on_bad_image: str


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """A validated data configuration."""
  source: SourceSpec
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  augment: bool


def _check(ok: bool, field: str, value: Any, expected: str) -> None:
  if not ok:
    raise DataError(f'data config: {field}={value!r} is invalid; expected {expected} '
                    f'(set --config.data.{field}=...).')


def _is_int(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _channels(field: str, value: Any, positive: bool) -> tuple[float, float, float]:
  ok = (isinstance(value, (tuple, list)) and len(value) == 3 and
        all(isinstance(v, (int, float)) and math.isfinite(v) and (v > 0 or not positive)
            for v in value))
  _check(ok, field, value, 'three finite numbers' + (' > 0' if positive else ''))
  return tuple(float(v) for v in value)


def _folder_root(name: str, folder: str | None, archive: str | None, cache_dir: str) -> str:
  if name == 'cifar10_sample':
    return str(SAMPLE_DIR)
  if folder:
    return os.path.abspath(os.path.expanduser(folder))
  if archive:
    return archive_lib.extract_archive(archive, cache_dir)
  raise DataError("name='folder' needs an image folder: set --config.data.folder=PATH (laid out as "
                  'PATH/train/<class>/<image>, PATH/test/<class>/<image>) or '
                  '--config.data.archive=PATH.tar.gz (extracted once into cache_dir).')


def resolve(cfg: Any) -> DataSpec:
  """Validates a data config and fills in the per-data-set defaults.

  Args:
    cfg: a ConfigDict (or dict) with fields of `default_data_config`; missing fields take defaults.

  Returns:
    The resolved DataSpec. An archive configured for a folder data set is extracted here (once).

  Raises:
    DataError: unknown field or name, or an invalid value.
  """
  defaults = default_data_config()
  unknown = sorted(set(cfg.keys()) - set(defaults.keys()))
  if unknown:
    raise DataError(f'Unknown data config field(s) {unknown}; valid fields: {sorted(defaults)}.')
  c = {k: cfg[k] if k in cfg else v for k, v in defaults.items()}

  name = c['name']
  if not isinstance(name, str) or name not in _DATASETS:
    raise DataError(f'Unknown data set name {name!r}; valid names: {", ".join(VALID_NAMES)} '
                    "('folder' reads --config.data.folder or --config.data.archive).")
  table = _DATASETS[name]
  image_size = table.image_size if c['image_size'] is None else c['image_size']
  _check(_is_int(image_size) and image_size > 0, 'image_size', image_size, 'a positive integer')
  large = image_size >= LARGE_IMAGE_SIZE
  subset = c['subset']
  _check(subset is None or (_is_int(subset) and subset > 0), 'subset', subset,
         'None or a positive integer')
  _check(_is_int(c['shuffle_buffer']) and c['shuffle_buffer'] > 0, 'shuffle_buffer',
         c['shuffle_buffer'], 'a positive integer')
  _check(c['on_bad_image'] in ('skip', 'error'), 'on_bad_image', c['on_bad_image'],
         "'skip' or 'error'")
  _check(isinstance(c['augment'], bool), 'augment', c['augment'], 'True or False')
  _check(isinstance(c['train_split'], str) and c['train_split'], 'train_split', c['train_split'],
         'a split name')
  _check(c['eval_split'] is None or (isinstance(c['eval_split'], str) and c['eval_split']),
         'eval_split', c['eval_split'], 'None or a split name')
  cache = not large if c['cache'] is None else c['cache']
  _check(isinstance(cache, bool), 'cache', cache, 'None, True or False')
  if cache and large:
    raise DataError(f'data config: cache=True needs image_size < {LARGE_IMAGE_SIZE} (decoded '
                    f'images are kept at their native size above); got image_size={image_size}. '
                    'Set --config.data.cache=False.')
  stats = table.stats or (IMAGENET_STATS if large else CIFAR_STATS)
  mean = stats[0] if c['mean'] is None else _channels('mean', c['mean'], positive=False)
  std = stats[1] if c['std'] is None else _channels('std', c['std'], positive=True)

  is_folder = name in FOLDER_NAMES
  data_dir = c['data_dir']
  source = SourceSpec(
      name=name,
      tfds_name=None if is_folder else name,
      data_dir=None if is_folder or data_dir is None else os.path.expanduser(data_dir),
      root=_folder_root(name, c['folder'], c['archive'], c['cache_dir']) if is_folder else None,
      train_split=c['train_split'],
      eval_split=c['eval_split'] or table.eval_split,
      image_size=image_size,
      subset=subset,
      cache=cache,
      shuffle_buffer=c['shuffle_buffer'],
      on_bad_image=c['on_bad_image'],
  )
  return DataSpec(source=source, mean=mean, std=std, augment=c['augment'])
