"""Policy JSON round trip, argmax extraction and clear errors for bad policies."""

import json

import flax
import jax
import jax.numpy as jnp
import pytest

from asga_jax import models
from asga_jax.quant import (LayerBits, Policy, PolicyError, QuantSpec, argmax_policy,
                            collect_layer_costs, load_policy, save_policy, validate_policy)
from asga_jax.quant.complexity import searchable_layers


def test_json_round_trip(tmp_path):
  policy = Policy.from_dict({'stage1/block0/conv1': (4, 3),
                             'stage2/block0/shortcut': {'w': 2, 'a': 6}})
  save_policy(policy, tmp_path / 'policy.json', meta={'gbops': 1.25})
  loaded, meta = load_policy(tmp_path / 'policy.json')
  assert loaded == policy and hash(loaded) == hash(policy)
  assert loaded['stage1/block0/conv1'] == LayerBits(4, 3)
  assert meta == {'gbops': 1.25}
  data = json.loads((tmp_path / 'policy.json').read_text())
  assert data['layers']['stage2/block0/shortcut'] == {'w': 2, 'a': 6}
  assert not list(tmp_path.glob('*.tmp'))


def test_argmax_extraction():
  model = models.resnet20(10, quant=QuantSpec(mode='supernet'))
  x = jnp.zeros((1, 32, 32, 3))
  costs = collect_layer_costs(model, x)
  params = flax.core.unfreeze(jax.jit(model.init)(jax.random.key(0, impl='rbg'), x)['params'])
  params['stage1']['block1']['conv2']['w_logits'] = jnp.array([0.0, 0.0, 5.0, 1.0])
  params['stage1']['block1']['conv2']['a_logits'] = jnp.array([0.0, 0.0, 0.0, 0.1])
  policy = argmax_policy(params, costs)
  assert policy['stage1/block1/conv2'] == LayerBits(4, 6)
  assert policy['stage3/block2/conv1'] == LayerBits(2, 2)
  assert 'stem_conv' not in policy and 'head' not in policy
  validate_policy(policy, searchable_layers(costs))


@pytest.mark.parametrize('content,match', [
    ('{not json', 'not valid JSON'),
    ('[1, 2]', 'not a policy file'),
    ('{"layers": {}}', 'non-empty'),
    ('{"layers": {"a": {"w": 4}}}', r"missing key\(s\) \['a'\]"),
    ('{"layers": {"a": {"w": "4", "a": 4}}}', 'must be an integer'),
    ('{"layers": {"a": {"w": 4, "a": 0}}}', r'1\.\.32'),
    ('{"layers": {"a": [4]}}', 'expected'),
    ('{"format": "other/v9", "layers": {"a": {"w": 4, "a": 4}}}', 'unsupported format'),
])
def test_malformed_files(tmp_path, content, match):
  path = tmp_path / 'bad.json'
  path.write_text(content)
  with pytest.raises(PolicyError, match=match) as err:
    load_policy(path)
  assert 'bad.json' in str(err.value)


def test_missing_file(tmp_path):
  with pytest.raises(PolicyError, match='does not exist'):
    load_policy(tmp_path / 'nope.json')


def test_validate_lists_every_problem():
  searchable = {'l1': ((2, 4), (2, 4)), 'l2': ((2, 4), (2, 4)), 'l3': ((2, 4), (2, 4))}
  policy = Policy.from_dict({'l1': (3, 4), 'l2': (2, 8), 'extra': (4, 4)})
  with pytest.raises(PolicyError) as err:
    validate_policy(policy, searchable)
  msg = str(err.value)
  for part in ("unknown layers (not in the model): ['extra']",
               "missing layers (the model has them): ['l3']",
               'l1: weight bits 3 not in candidates [2, 4]',
               'l2: activation bits 8 not in candidates'):
    assert part in msg
