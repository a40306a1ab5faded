"""Builds the embedded CIFAR-10 sample from the full image-folder archive.

  python -m asga_jax.data.make_sample --archive /work/shared/data/cifar10-jpeg.tar.gz \
      --out asga_jax/data/samples/cifar10 --train_per_class 100 --test_per_class 20

Copies, byte for byte, the first files (sorted by name) of every class of each split. The archive is
extracted into a temporary folder outside the output, which is removed afterwards.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

from asga_jax.data import folder as folder_lib
from asga_jax.data.archive import extract_archive


def make_sample(archive: str, out: str, per_class: dict[str, int]) -> int:
  """Copies the first `per_class[split]` images of every class of each split into `out`.

  Args:
    archive: image-folder archive (see `extract_archive`).
    out: output root; must not exist or be empty.
    per_class: images per class, by split name.

  Returns:
    The number of files copied.
  """
  if os.path.isdir(out) and os.listdir(out):
    raise SystemExit(f'{out} is not empty; remove it first.')
  copied = 0
  with tempfile.TemporaryDirectory() as cache_dir:
    root = extract_archive(archive, cache_dir)
    classes = folder_lib.class_names(root, 'train')
    for split, count in per_class.items():
      listing = folder_lib.list_split(root, split, classes, on_bad_image='error')
      for label, name in enumerate(classes):
        os.makedirs(os.path.join(out, split, name), exist_ok=True)
        for path in listing.paths[listing.labels == label][:count]:
          shutil.copyfile(path, os.path.join(out, split, name, os.path.basename(path)))
          copied += 1
  return copied


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--archive', required=True, help='image-folder .tar.gz')
  parser.add_argument('--out', required=True, help='output root (created)')
  parser.add_argument('--train_per_class', type=int, default=100)
  parser.add_argument('--test_per_class', type=int, default=20)
  args = parser.parse_args(argv)
  copied = make_sample(args.archive, args.out,
                       {'train': args.train_per_class, 'test': args.test_per_class})
  print(f'Copied {copied} files into {args.out}.')


if __name__ == '__main__':
  main()
