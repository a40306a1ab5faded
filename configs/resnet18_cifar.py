r"""ResNet-18 (CIFAR stem) on CIFAR-10: pretrain, ASGA search, finetune, eval.

  python -m asga_jax.main --config configs/resnet18_cifar.py:folder \
      --config.data.archive=../shared/data/cifar10-jpeg.tar.gz --workdir /tmp/r18_cifar

The searched policy.json applies unchanged to the ImageNet ResNet-18
(configs/resnet18_imagenet.py): the layers share their names.

Variants: (none) CIFAR-10 from TFDS; folder (image folder / archive); demo
(embedded sample, a few CPU minutes per stage); smoke (one epoch, width 4, 32 px).
"""

import ml_collections

from asga_jax.train.config import cifar_config


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  return cifar_config('resnet18', variant, smoke_image_size=32)
