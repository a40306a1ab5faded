r"""ResNet-50: (2, 3, 4, 6)-bit search on CIFAR-10 toward 3MP, QAT on ImageNet at 224 px.

  python -m asga_jax.main --config configs/resnet50_imagenet.py:demo --workdir /tmp/resnet50_demo
  python -m asga_jax.model_summary --config configs/resnet50_imagenet.py --num_classes=1000

Variants and stages: see asga_jax.train.config.proxy_to_target_config.
"""

import ml_collections

from asga_jax.train.config import proxy_to_target_config


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  return proxy_to_target_config('resnet50', variant, bits=(2, 3, 4, 6))
