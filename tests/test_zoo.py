"""The model zoo: published MACs and parameter counts, proxy-to-target policies, and steps."""

import importlib.util
import math
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from asga_jax import models, optim, quant
from asga_jax.quant import LayerBits, QuantSpec
from asga_jax.train import steps, validate_config
from asga_jax.train.stages import build_model, quant_spec

ROOT = pathlib.Path(__file__).resolve().parent.parent
ZOO_CONFIGS = ('resnet34_imagenet', 'resnet50_imagenet', 'mobilenetv2_imagenet',
               'vgg16_imagenet', 'vit_s16_imagenet', 'vit_b16_imagenet')

# (GMACs, M parameters) at 224x224, 1000 classes: torchvision's model docs
# (ResNets, MobileNetV2, VGG16-BN) and timm/the ViT paper (ViT-B/16, 17.6 GMACs
# with the attention products).
PUBLISHED = {
    'resnet18': (1.82, 11.7),
    'resnet34': (3.67, 21.8),
    'resnet50': (4.1, 25.6),
    'mobilenetv2': (0.30, 3.5),
    'vgg16': (15.5, 138.0),
    'vit_b16': (17.6, 86.6),
}
IMAGENET = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)


@pytest.mark.parametrize('name', sorted(PUBLISHED))
def test_macs_and_params_match_published_figures(name):
  model = models.create_model(name, num_classes=1000, stem='imagenet')
  costs = quant.collect_layer_costs(model, IMAGENET)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), IMAGENET)
  params = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes['params']))
  gmacs, mparams = PUBLISHED[name]
  assert sum(c.macs for c in costs) / 1e9 == pytest.approx(gmacs, rel=0.02)
  assert params / 1e6 == pytest.approx(mparams, rel=0.02)


def test_vit_counts_every_matmul_and_keeps_edges_8bit():
  model = models.vit_b16(1000, quant=QuantSpec(mode='supernet', quantizer='lsq'))
  costs = {c.path: c for c in quant.collect_layer_costs(model, IMAGENET)}
  # Q K^T of one block: 12 heads x 197 x 197 outputs, each a 64-long dot product.
  assert costs['block0/attn/qk'].macs == 12 * 197 * 197 * 64
  assert costs['block0/attn/av'].macs == 12 * 197 * 64 * 197
  assert costs['block0/attn/qk'].num_weights == 0 and costs['block0/attn/qk'].searchable
  assert costs['block0/fc1'].macs == 197 * 768 * 3072
  for edge in ('patch_embed', 'head'):
    assert costs[edge].w_bits == costs[edge].a_bits == (8,) and not costs[edge].searchable
  assert len(costs) == 2 + 12 * 8


def test_default_bit_candidates_follow_the_paper():
  assert models.DEFAULT_BITS['resnet50'] == (2, 3, 4, 6)
  assert models.DEFAULT_BITS['mobilenetv2'] == models.DEFAULT_BITS['vgg16'] == (2, 3, 4, 5, 6)


# Tiny versions: widths 4-16 (ViTs at two blocks, to keep compile times short).
TINY = {
    'resnet34': dict(width=4),
    'resnet50': dict(width=4),
    'mobilenetv2': dict(width=4),
    'vgg16': dict(width=4),
    'vit_s16': dict(width=16, depth=2),
    'vit_b16': dict(width=16, depth=2),
}


def _spec(name: str, **kwargs) -> QuantSpec:
  return QuantSpec(quantizer='lsq' if name.startswith('vit') else 'clip',
                   w_bits=models.DEFAULT_BITS[name], a_bits=models.DEFAULT_BITS[name], **kwargs)


@pytest.mark.parametrize('name', sorted(TINY))
def test_cifar_policy_applies_to_the_imagenet_variant(name):
  cifar = models.create_model(name, num_classes=10, stem='cifar',
                              quant=_spec(name, mode='supernet'), **TINY[name])
  x32 = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  costs32 = quant.collect_layer_costs(cifar, x32)
  # A policy with different bits per layer, as a search would give.
  cands = models.DEFAULT_BITS[name]
  policy = quant.Policy.from_dict({c.path: LayerBits(cands[i % len(cands)],
                                                     cands[(i + 1) % len(cands)])
                                   for i, c in enumerate(c for c in costs32 if c.searchable)})
  imagenet = models.create_model(name, num_classes=1000, stem='imagenet',
                                 quant=_spec(name).with_policy(policy), **TINY[name])
  x224 = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  costs224 = quant.collect_layer_costs(imagenet, x224)
  supernet224 = models.create_model(name, num_classes=1000, stem='imagenet',
                                    quant=_spec(name, mode='supernet'), **TINY[name])
  quant.validate_policy(policy, quant.searchable_layers(
      quant.collect_layer_costs(supernet224, x224)))
  used = {c.path: (c.w_bits[0], c.a_bits[0]) for c in costs224 if c.path in policy}
  assert used == {p: (b.w, b.a) for p, b in policy.as_dict().items()}
  assert quant.policy_bops(policy, costs224) > quant.policy_bops(policy, costs32)


@pytest.mark.parametrize('name', sorted(TINY))
def test_every_model_runs_a_search_and_a_finetune_step(name):
  size = 32 if name == 'vgg16' else 16
  rng = np.random.default_rng(0)
  batch = {'image': jnp.asarray(rng.normal(size=(2, size, size, 3)), jnp.float32),
           'label': jnp.asarray([1, 7])}
  supernet = models.create_model(name, num_classes=10, stem='cifar',
                                 quant=_spec(name, mode='supernet'), **TINY[name])
  variables = jax.jit(supernet.init)(jax.random.key(0, impl='rbg'), batch['image'][:1])
  costs = quant.collect_layer_costs(supernet, batch['image'][:1])
  tx = optax.chain(optim.complexity_penalty(costs, weight=0.1), optax.sgd(0.1))
  state, metrics = jax.jit(steps.make_train_step(supernet, tx, costs=costs))(
      steps.create_train_state(variables, tx), batch)
  assert np.isfinite(float(metrics['loss'])) and float(metrics['gbops']) > 0
  arch = lambda params: [x for x, label in zip(jax.tree.leaves(params),
                                               jax.tree.leaves(optim.param_labels(params)))
                         if label == optim.ARCH]
  assert arch(variables['params'])
  assert not any(np.allclose(a, b) for a, b in zip(arch(variables['params']),
                                                   arch(state.params)))  # logits are trained

  policy = quant.argmax_policy(jax.device_get(state.params), costs)
  fixed = models.create_model(name, num_classes=10, stem='cifar',
                              quant=_spec(name).with_policy(policy), **TINY[name])
  variables = jax.jit(fixed.init)(jax.random.key(1, impl='rbg'), batch['image'][:1])
  tx = optax.sgd(0.1, momentum=0.9, nesterov=True)
  _, metrics = jax.jit(steps.make_train_step(fixed, tx))(
      steps.create_train_state(variables, tx), batch)
  assert np.isfinite(float(metrics['loss']))


def _load_config(name, variant=None):
  spec = importlib.util.spec_from_file_location(name, ROOT / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


@pytest.mark.parametrize('name', ZOO_CONFIGS)
def test_zoo_configs_search_on_cifar_and_finetune_on_imagenet(name):
  config = _load_config(name)
  assert config.search.data.name == 'cifar10' and config.search.data.image_size == 32
  assert config.data.name == 'imagenet2012' and config.data.image_size == 224
  assert tuple(config.quant.w_bits) == models.DEFAULT_BITS[config.model.name]
  assert config.search.target == '3MP'
  for variant in ('smoke', 'demo', 'imagenette'):
    validate_config(_load_config(name, variant))
  # The smoke variant's model builds at its resolution (no data needed to trace it).
  smoke = _load_config(name, 'smoke')
  info = type('Info', (), {'num_classes': 10, 'image_size': smoke.data.image_size})
  model = build_model(smoke, info, quant_spec(smoke, 'supernet'))
  assert quant.collect_layer_costs(model, jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))


def test_model_summary_command_prints_layers_totals_and_policy_bops(tmp_path):
  costs = quant.collect_layer_costs(models.resnet50(1000, stem='imagenet',
                                                    quant=QuantSpec(mode='supernet')), IMAGENET)
  policy = quant.uniform_policy(quant.searchable_layers(costs), 4, 4)
  quant.save_policy(policy, tmp_path / 'policy.json')
  out = subprocess.run(
      [sys.executable, '-m', 'asga_jax.model_summary',
       '--config', str(ROOT / 'configs' / 'resnet50_imagenet.py'), '--num_classes=1000',
       f'--policy={tmp_path / "policy.json"}'],
      capture_output=True, text=True, cwd=ROOT, check=True).stdout
  assert 'stage4/block2/conv3' in out and '7x7x512' in out
  assert '25,557,032' in out and 'MACs 4.0892 G' in out
  total = [line for line in out.splitlines() if line.startswith('total')][0]
  assert f'{quant.policy_bops(policy, costs) / 1e9:.3f}G' in total
  assert f'{sum(c.macs for c in costs) * 64 / 1e9:.3f}G' in total
  assert f'4MP {quant.uniform_bops(costs, 4) / 1e9:.4g}' in out
