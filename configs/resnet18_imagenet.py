r"""ResNet-18 (ImageNet stem) finetuned on ImageNet with a policy searched on CIFAR-10.

  python -m asga_jax.main --config configs/resnet18_imagenet.py --workdir /tmp/r18_in \
      --config.finetune.policy=/tmp/r18_cifar/policy.json \
      --config.finetune.init=/path/to/fp_resnet18_checkpoint_dir \
      --config.data.data_dir=/path/to/tensorflow_datasets

The policy is validated against this model's layers and its BOPs are
recomputed at 224 px. Without `finetune.init`, add 'pretrain' to
`--config.stages` to train the full-precision model first.

Variants:
  (none)      ImageNet (TFDS imagenet2012, 224 px): QAT with SGD Nesterov, lr 0.04,
              cosine, 5 warm-up epochs, 90 epochs.
  imagenette  the same recipe on TFDS imagenette (10 classes).
  demo        proxy-to-target in one run on the embedded sample (width 16): pretrain at
              64 px (ImageNet stem), search at 32 px (CIFAR stem; the 7x7 stem weights do
              not fit the 3x3 stem and are re-initialized), finetune and eval at 64 px.
  smoke       the same flow for one epoch per stage at width 4, from scratch.
"""

import ml_collections

from asga_jax.train.config import default_config, demo_variant, smoke_variant, unknown_variant


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  config = default_config()
  config.model.name = 'resnet18'
  config.stages = 'finetune,eval'
  config.data.name = 'imagenet2012'
  config.data.image_size = 224
  config.batch_size = 256
  config.eval_batch_size = 500
  config.pretrain.epochs = 90.0
  config.pretrain.weight_decay = 1e-4
  config.finetune.weight_decay = 1e-4
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2000
  if not variant:
    return config
  if variant == 'imagenette':
    config.data.name = 'imagenette'
    config.batch_size = 64
    config.finetune.lr = 0.01  # linear scaling of 0.04 at batch 256
    return config
  if variant == 'demo':
    config = demo_variant(config)
    config.stages = 'pretrain,search,finetune,eval'
    config.data.image_size = 64
    config.search.data.image_size = 32  # the proxy: CIFAR stem at 32 px
    config.model.width = 16
    config.eval_batch_size = 200
    config.pretrain.weight_decay = config.finetune.weight_decay = 5e-4
    return config
  if variant == 'smoke':
    config = smoke_variant(config, image_size=64)
    config.stages = 'search,finetune,eval'
    config.search.data.image_size = 32  # the proxy: CIFAR stem at 32 px
    config.search.init = 'scratch'
    config.finetune.init = 'scratch'
    config.finetune.weight_decay = 5e-4
    return config
  raise unknown_variant('resnet18_imagenet', variant, ('demo', 'smoke', 'imagenette'))
