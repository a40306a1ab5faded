r"""ResNet-20 on CIFAR-10: pretrain, ASGA search, finetune, eval.

  python -m asga_jax.main --config configs/resnet20_cifar.py:demo --workdir /tmp/asga_demo

Variants (after the colon):
  (none)  CIFAR-10 from TFDS, prepared offline (--config.data.data_dir=DIR), the
          papers' schedules: 200 pretrain, 90 search, 90 finetune epochs.
  folder  the same on an image folder or .tar.gz, e.g.
          --config.data.archive=../shared/data/cifar10-jpeg.tar.gz
  demo    the embedded 1,000-image CIFAR-10 sample, all stages in ~4 CPU minutes.
  smoke   every stage for one epoch of the sample (ResNet-8, width 4, 16 px).
"""

import ml_collections

from asga_jax.train.config import cifar_config


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  return cifar_config('resnet20', variant, smoke_model='resnet8')
