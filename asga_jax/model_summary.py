r"""Per-layer shapes, MACs, weights and BOPs of a configured model, without training.

  python -m asga_jax.model_summary --config configs/resnet50_imagenet.py
  python -m asga_jax.model_summary --config configs/resnet20_cifar.py:demo \
      --policy /tmp/demo/policy.json
  python -m asga_jax.model_summary --config configs/vgg16_cifar.py --stage search

Builds the model of a stage (default the finetune target) at its data set's
resolution, lists every quantized layer with its BOPs at 8/8 bits and, with a
policy, at the policy's bits, then the totals and the BOPs of uniform-precision
targets ('2MP' .. '6MP', for ``--config.search.target``). When the data set
is not available here (e.g. ImageNet offline), ``--num_classes`` stands in.
"""

import dataclasses
import math

import jax
from absl import app, flags
from ml_collections import config_flags

from asga_jax import data, quant
from asga_jax.train import stages
from asga_jax.train.config import stage_data_config

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file (path[:variant]).', lock_config=True)
flags.DEFINE_string('policy', None, 'A policy.json to cost (default: none; '
                    '--config.finetune.policy if set).')
flags.DEFINE_enum('stage', 'finetune', ['pretrain', 'search', 'finetune'],
                  'Whose data set (resolution, classes) to use.')
flags.DEFINE_integer('num_classes', None, 'Classes, when the data set is not available here.')
flags.mark_flags_as_required(['config'])


def _info(config) -> data.DatasetInfo:
  data_config = stage_data_config(config, FLAGS.stage)
  try:
    info = data.get_info(data_config)
  except (data.DataError, OSError) as e:
    if FLAGS.num_classes is None:
      raise app.UsageError(f'{e}\nThe data set is needed only for its number of classes: '
                           'pass --num_classes.') from None
    return data.DatasetInfo(name=data_config.name, num_classes=FLAGS.num_classes,
                            class_names=(), num_train=0, num_eval=0,
                            image_size=data_config.image_size)
  if FLAGS.num_classes is not None:
    info = dataclasses.replace(info, num_classes=FLAGS.num_classes)
  return info


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = FLAGS.config
  info = _info(config)
  model = stages.build_model(config, info, stages.quant_spec(config, 'supernet'))
  x = jax.ShapeDtypeStruct((1, info.image_size, info.image_size, 3), 'float32')
  costs = quant.collect_layer_costs(model, x)
  policy_path = FLAGS.policy or config.finetune.policy
  policy = None
  if policy_path:
    policy, _ = quant.load_policy(policy_path)
    quant.validate_policy(policy, quant.searchable_layers(costs))
  float_model = stages.build_model(config, info, stages.quant_spec(config, 'float'))
  shapes = jax.eval_shape(lambda x: float_model.init(jax.random.key(0), x), x)
  params = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes['params']))
  print(f'{config.model.name} on {info.name} ({info.image_size} px, {info.num_classes} classes); '
        f'searched bits w {tuple(config.quant.w_bits)} a {tuple(config.quant.a_bits)}, edge '
        f'layers {config.quant.edge_bits}-bit' + (f'; policy {policy_path}' if policy else ''))
  print(quant.format_model_summary(costs, policy))
  print(f'parameters: {params:,} in all ({params / 1e6:.2f}M, BatchNorm and embeddings '
        f'included); MACs {sum(c.macs for c in costs) / 1e9:.4f} G')
  print('uniform-precision targets (GBOPs): ' + ', '.join(
      f'{b}MP {quant.uniform_bops(costs, b) / 1e9:.4g}' for b in range(2, 7)))


if __name__ == '__main__':
  app.run(main)
