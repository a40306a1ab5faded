r"""ViT-B/16 (LSQ quantizer): (2, 3, 4, 6)-bit search on CIFAR-10 toward 3MP,
QAT on ImageNet at 224 px.

  python -m asga_jax.main --config configs/vit_b16_imagenet.py:demo \
      --workdir /tmp/vit_b16_demo
  python -m asga_jax.model_summary --config configs/vit_b16_imagenet.py --num_classes=1000

Variants and stages: see asga_jax.train.config.proxy_to_target_config.
"""

import ml_collections

from asga_jax.train.config import proxy_to_target_config


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  config = proxy_to_target_config('vit_b16', variant, bits=(2, 3, 4, 6), quantizer='lsq',
                                  lr_scale=0.1, demo_width=64, smoke_width=16)
  config.fsdp = True  # 86M parameters: shard them and the momenta over the devices
  return config
