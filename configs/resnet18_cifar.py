r"""ResNet-18 (CIFAR stem) on CIFAR-10: pretrain, ASGA search, finetune, eval.

  python -m asga_jax.main --config configs/resnet18_cifar.py:folder \
      --config.data.archive=../shared/data/cifar10-jpeg.tar.gz --workdir /tmp/r18_cifar

The searched policy.json applies unchanged to the ImageNet ResNet-18
(configs/resnet18_imagenet.py): the layers share their names.

Variants: (none) CIFAR-10 from TFDS; folder (image folder / archive); demo
(embedded sample, a few CPU minutes per stage); smoke (one epoch, width 4, 32 px).
"""

import ml_collections

from asga_jax.train.config import default_config, demo_variant, smoke_variant, unknown_variant


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  config = default_config()
  config.model.name = 'resnet18'
  if not variant:
    return config
  if variant == 'folder':
    config.data.name = 'folder'
    return config
  if variant == 'demo':
    return demo_variant(config)
  if variant == 'smoke':
    return smoke_variant(config, image_size=32)
  raise unknown_variant('resnet18_cifar', variant, ('demo', 'smoke', 'folder'))
