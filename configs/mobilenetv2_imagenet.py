r"""MobileNetV2 (1.0): (2, 3, 4, 5, 6)-bit search on CIFAR-10 toward 3MP,
QAT on ImageNet at 224 px.

  python -m asga_jax.main --config configs/mobilenetv2_imagenet.py:demo \
      --workdir /tmp/mobilenetv2_demo
  python -m asga_jax.model_summary --config configs/mobilenetv2_imagenet.py --num_classes=1000

Variants and stages: see asga_jax.train.config.proxy_to_target_config.
"""

import ml_collections

from asga_jax.train.config import proxy_to_target_config


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  return proxy_to_target_config('mobilenetv2', variant, bits=(2, 3, 4, 5, 6), smoke_width=8)
