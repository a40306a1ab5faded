"""The training system end to end on the embedded real-image sample (tiny model)."""

import importlib.util
import json
import os
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from asga_jax import data, models
from asga_jax.quant import QuantSpec, collect_layer_costs, load_policy, policy_bops
from asga_jax.train import ConfigError, train_and_evaluate, validate_config
from asga_jax.train import loop

ROOT = pathlib.Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def load_config(name: str, variant: str | None = None):
  spec = importlib.util.spec_from_file_location(name, ROOT / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def smoke_config(**overrides):
  config = load_config('resnet20_cifar', 'smoke')
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


@pytest.fixture(scope='module')
def pipeline_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('pipeline')
  results = train_and_evaluate(smoke_config(), str(workdir))
  return workdir, results


def test_all_stages_write_their_outputs(pipeline_run):
  workdir, results = pipeline_run
  assert set(results) == {'pretrain', 'search', 'finetune', 'eval'}
  for name in ('config.json', 'results.json', 'policy.json', 'bits.png', 'search/report.txt'):
    assert (workdir / name).is_file(), name
  for stage in ('pretrain', 'search', 'finetune'):
    assert list((workdir / 'tensorboard' / stage).glob('events.out.tfevents.*')), stage
    assert (workdir / stage / 'checkpoints').is_dir()
  saved = json.loads((workdir / 'results.json').read_text())
  assert saved['eval']['finetune']['examples'] == 200  # the whole sample test split
  for stage in ('pretrain', 'search', 'finetune'):
    assert saved[stage]['lambda_max'] > 0, stage  # measured at the end of every stage
    records = [json.loads(l) for l in (workdir / stage / 'metrics.jsonl').read_text().splitlines()]
    assert {r['kind'] for r in records} == {'train', 'eval'}
    assert records[-1]['step'] == 20
  search_log = [json.loads(line) for line in
                (workdir / 'search' / 'metrics.jsonl').read_text().splitlines()]
  assert all(r['sigma_max'] == r['sigma_max'] for r in search_log if r['kind'] == 'train')
  assert 0.0 <= saved['eval']['finetune']['accuracy'] <= 1.0
  assert (workdir / 'bits.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_searched_policy_respects_candidates_and_edges(pipeline_run):
  workdir, results = pipeline_run
  policy, meta = load_policy(workdir / 'policy.json')
  model = models.resnet8(10, width=4, quant=QuantSpec(mode='supernet'))
  costs = collect_layer_costs(model, jax.ShapeDtypeStruct((1, 16, 16, 3), np.float32))
  searchable = {c.path for c in costs if c.searchable}
  assert set(policy.paths()) == searchable
  assert 'stem_conv' not in policy and 'head' not in policy  # 8-bit first/last layers
  for _, bits in policy.layers:
    assert bits.w in (2, 3, 4, 6) and bits.a in (2, 3, 4, 6)
  # The finetuned model used that policy; its cost includes the 8-bit edges.
  assert results['finetune']['policy'] == str(workdir / 'policy.json')
  fixed = models.resnet8(10, width=4, quant=QuantSpec(mode='fixed', policy=policy))
  fixed_costs = collect_layer_costs(fixed, jax.ShapeDtypeStruct((1, 16, 16, 3), np.float32))
  assert results['finetune']['gbops'] == pytest.approx(policy_bops(policy, fixed_costs) / 1e9)
  assert meta['gbops'] == pytest.approx(results['finetune']['gbops'])
  edge = {c.path: c for c in fixed_costs}
  assert edge['stem_conv'].w_bits == (8,) and edge['head'].a_bits == (8,)


def test_rerun_resumes_completed_stages_without_training(pipeline_run, caplog):
  workdir, results = pipeline_run
  before = (workdir / 'finetune' / 'checkpoints').stat().st_mtime_ns
  again = train_and_evaluate(smoke_config(stages='finetune,eval'), str(workdir))
  assert again['eval']['finetune']['accuracy'] == pytest.approx(
      results['eval']['finetune']['accuracy'])
  assert sorted(os.listdir(workdir / 'finetune' / 'checkpoints')) == ['20']
  assert (workdir / 'finetune' / 'checkpoints').stat().st_mtime_ns == before


def test_saq_et_rate_window_starts_once_both_phases_compiled(pipeline_run, tmp_path, caplog):
  workdir, _ = pipeline_run
  caplog.set_level('INFO')
  config = smoke_config(**{'stages': 'finetune', 'finetune.init': 'scratch',
                           'finetune.policy': str(workdir / 'policy.json'),
                           'finetune.sharpness': 'saq', 'finetune.saq.tau': 2,
                           'diagnostics.lambda_max': False, 'log_every_steps': 5})
  train_and_evaluate(config, str(tmp_path))
  # Step 0 compiles the sharpness phase, step 1 the reuse phase: neither counts in img/s.
  assert 'finetune: first 2 steps compiled and ran in' in caplog.text
  records = [json.loads(l) for l in (tmp_path / 'finetune' / 'metrics.jsonl').read_text()
             .splitlines()]
  train = [r for r in records if r['kind'] == 'train']
  assert [r['step'] for r in train] == [5, 10, 15, 20]
  assert all(r['images_per_sec'] > 0 for r in train)


def _raw_state(workdir, stage, step):
  manager = ocp.CheckpointManager(str(workdir / stage / 'checkpoints'),
                                  item_names=('state', 'meta'))
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                           meta=ocp.args.JsonRestore()))
  manager.close()
  return restored.state, restored.meta


def test_stop_and_resume_equals_uninterrupted_run(tmp_path, monkeypatch):
  """Search (ASGA, Adam on logits): 10 steps, stop, resume to 20 == 20 straight.

  Compared bitwise: same programs, same data order, same CPU.
  """
  overrides = {'stages': 'search', 'search.init': 'scratch', 'log_every_steps': 5,
               'diagnostics.lambda_max': False}
  straight = tmp_path / 'straight'
  train_and_evaluate(smoke_config(**overrides), str(straight))

  resumed = tmp_path / 'resumed'
  original_train = loop.Reporter.train

  def train_then_stop(self, step, metrics):
    original_train(self, step, metrics)
    if step == 10:
      loop.request_stop()

  monkeypatch.setattr(loop.Reporter, 'train', train_then_stop)
  stopped = train_and_evaluate(smoke_config(**overrides), str(resumed))
  assert stopped['stopped'] == {'stage': 'search', 'step': 10}
  assert sorted(os.listdir(resumed / 'search' / 'checkpoints')) == ['10']
  monkeypatch.setattr(loop.Reporter, 'train', original_train)
  train_and_evaluate(smoke_config(**overrides), str(resumed))
  assert sorted(os.listdir(resumed / 'search' / 'checkpoints')) == ['10', '20']

  a, meta_a = _raw_state(straight, 'search', 20)
  b, meta_b = _raw_state(resumed, 'search', 20)
  assert meta_a == meta_b == {'step': 20, 'epoch': 1, 'batch': 0, 'seed': 0}
  leaves_a, leaves_b = jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b) > 50
  for (path, x), y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
  assert 'rho' in str(jax.tree_util.tree_structure(a))  # the ASGA state is in the checkpoint
  assert (straight / 'policy.json').read_text() == (resumed / 'policy.json').read_text()


def test_cifar_resnet18_policy_finetunes_at_224_with_recomputed_bops(tmp_path):
  search_dir = tmp_path / 'proxy'
  train_and_evaluate(smoke_config(**{'stages': 'search', 'search.init': 'scratch',
                                     'model.name': 'resnet18', 'data.image_size': 32,
                                     'diagnostics.lambda_max': False}), str(search_dir))
  policy, meta = load_policy(search_dir / 'policy.json')
  assert meta['image_size'] == 32 and len(policy) == 19

  target = tmp_path / 'target'
  results = train_and_evaluate(
      smoke_config(**{'stages': 'finetune', 'model.name': 'resnet18', 'data.image_size': 224,
                      'finetune.policy': str(search_dir / 'policy.json'),
                      'finetune.init': 'scratch', 'finetune.epochs': 0.05,
                      'batch_size': 10, 'eval_batch_size': 50, 'diagnostics.lambda_max': False}),
      str(target))
  imagenet = models.resnet18(10, stem='imagenet', width=4,
                             quant=QuantSpec(mode='fixed', policy=policy))
  costs = collect_layer_costs(imagenet, jax.ShapeDtypeStruct((1, 224, 224, 3), np.float32))
  assert results['finetune']['gbops'] == pytest.approx(policy_bops(policy, costs) / 1e9)
  assert results['finetune']['gbops'] > 2.5 * meta['gbops']  # (56/32)^2 more MACs in the blocks


def test_search_with_a_bops_target_lands_in_its_band(tmp_path):
  results = train_and_evaluate(smoke_config(**{
      'stages': 'search', 'search.init': 'scratch', 'search.target': '3MP',
      'search.sharpness': 'none', 'diagnostics.lambda_max': False}), str(tmp_path))
  policy, meta = load_policy(tmp_path / 'policy.json')
  assert meta['target'] == '3MP' and meta['final_comp_weight'] != 1.0  # lambda was adapted
  assert abs(meta['gbops'] / meta['target_gbops'] - 1) <= 0.05
  assert results['search']['gbops'] == pytest.approx(meta['gbops'])
  with open(tmp_path / 'search' / 'metrics.jsonl') as f:
    rows = [json.loads(line) for line in f]
  assert any('comp_weight' in row and 'argmax_gbops' in row for row in rows)


def test_missing_tfds_data_fails_before_compute(tmp_path):
  config = smoke_config(**{'data.name': 'cifar10', 'data.data_dir': str(tmp_path / 'tfds'),
                           'data.image_size': 32})
  with pytest.raises(data.DataError) as err:
    train_and_evaluate(config, str(tmp_path / 'run'))
  assert str(tmp_path / 'tfds') in str(err.value) and 'folder' in str(err.value)
  assert not (tmp_path / 'run').exists()


def test_invalid_config_lists_every_problem(tmp_path):
  config = smoke_config(**{'search.lr': -1.0, 'quant.w_bits': (4, 2), 'stages': 'search,train',
                           'model.name': 'resnet999', 'finetune.policy': '/nope/policy.json',
                           'search.asga.rho0': 0.0, 'search.asga.perturb': 'weights,bn',
                           'pretrain.sharpness': 'lookahead', 'diagnostics.landscape': '3d'})
  with pytest.raises(ConfigError) as err:
    validate_config(config)
  msg = str(err.value)
  for part in ('search.lr', 'quant.w_bits', "'train'", 'resnet999', 'search.asga.rho0',
               'search.asga.perturb', 'diagnostics.landscape'):
    assert part in msg, part
  config.stages = 'finetune'
  with pytest.raises(ConfigError, match='/nope/policy.json'):
    validate_config(config)
  config = smoke_config(**{'stages': 'pretrain', 'pretrain.sharpness': 'saq',
                           'pretrain.saq.case': 5, 'pretrain.saq.tau': 0})
  with pytest.raises(ConfigError) as err:
    validate_config(config)
  assert 'pretrain.saq.case' in str(err.value) and 'pretrain.saq.tau' in str(err.value)
  config = smoke_config(**{'search.target': '3 bits'})
  with pytest.raises(ConfigError, match='search.target'):
    validate_config(config)


def test_finetune_without_policy_explains_what_to_do(tmp_path):
  with pytest.raises(FileNotFoundError, match='Run the search stage first'):
    train_and_evaluate(smoke_config(stages='finetune'), str(tmp_path))


def test_table3_summary_of_asga_and_probed_edmips_runs(pipeline_run, tmp_path, capsys):
  """A plain EdMIPS search measured with the probe, against the pipeline's ASGA search."""
  from asga_jax import compare
  from asga_jax.train.summary import format_table, summarize_run
  workdir, _ = pipeline_run
  edmips = tmp_path / 'edmips'
  train_and_evaluate(smoke_config(**{'stages': 'search', 'search.init': 'scratch',
                                     'search.sharpness': 'none', 'search.probe_rho': 0.1,
                                     'diagnostics.lambda_max': False}), str(edmips))
  runs = [summarize_run(str(edmips), 'EdMIPS'), summarize_run(str(workdir), 'ASGA')]
  assert runs[0].sharpness == 'none' and runs[1].sharpness == 'asga'
  assert runs[0].sigma_max_avg == runs[0].sigma_max_avg  # measured by the probe
  assert runs[1].lambda_max > 0 and runs[0].lambda_max != runs[0].lambda_max  # not measured
  assert runs[1].mean_w_bits == json.loads((workdir / 'results.json').read_text())['search'][
      'mean_w_bits'] and 2 <= runs[1].mean_a_bits <= 6
  table = format_table(runs)
  assert table.splitlines()[2].startswith('| EdMIPS | none |')
  assert table.splitlines()[4].startswith('| ASGA - EdMIPS |')
  compare.FLAGS(['compare', '--labels=EdMIPS,ASGA'])
  compare.main(['compare', str(edmips), str(workdir)])
  assert '| ASGA | asga |' in capsys.readouterr().out
  with pytest.raises(FileNotFoundError, match='no results.json'):
    summarize_run(str(tmp_path))
