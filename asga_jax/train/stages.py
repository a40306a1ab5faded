"""The stages of the pipeline: pretrain -> search -> finetune -> eval.

Each stage is ``run_<stage>(config, workdir) -> summary dict`` and leaves its
outputs under ``workdir``:

* pretrain: ``pretrain/checkpoints`` (full-precision model);
* search: ``search/checkpoints``, ``policy.json``, ``bits.png``, ``search/report.txt``;
* finetune: ``finetune/checkpoints`` (the model quantized with the policy);
* eval: the accuracy and cost of every trained model, in the summary.

Each training stage also writes ``<stage>/metrics.jsonl`` and its diagnostics
(``diagnostics.json``: lambda_max; optional loss landscapes).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from asga_jax import data, models, optim
from asga_jax.analysis.plots import plot_bit_allocation
from asga_jax.files import atomic_write
from asga_jax.quant import (LayerCost, Policy, QuantSpec, argmax_policy, budget,
                            collect_layer_costs,
                            format_report, layer_report, load_policy, policy_bops, save_policy,
                            searchable_layers, validate_policy)
from asga_jax.train import checkpoints, loop, optimizers, sharding, steps
from asga_jax.train.config import stage_data_config
from asga_jax.train.diagnostics import Diagnostics

POLICY_FILE = 'policy.json'
BITS_PLOT = 'bits.png'


def quant_spec(config: ml_collections.ConfigDict, mode: str, policy: Policy | None = None
               ) -> QuantSpec:
  q = config.quant
  return QuantSpec(mode=mode, w_bits=tuple(q.w_bits), a_bits=tuple(q.a_bits), policy=policy,
                   edge_bits=q.edge_bits, quantizer=q.quantizer, w_clip_init=q.w_clip_init,
                   a_clip_init=q.a_clip_init)


def build_model(config: ml_collections.ConfigDict, info: data.DatasetInfo, spec: QuantSpec
                ) -> nn.Module:
  """The configured model for a data set (classes, resolution) and quantization."""
  kwargs: dict[str, Any] = {'num_classes': info.num_classes, 'quant': spec}
  if config.model.width is not None:
    kwargs['width'] = config.model.width
  if config.model.name in models.STEM_MODELS:
    stem = config.model.stem
    kwargs['stem'] = ('cifar' if info.image_size < 64 else 'imagenet') if stem == 'auto' else stem
  return models.create_model(config.model.name, **kwargs)


def _sample_input(info: data.DatasetInfo) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct((1, info.image_size, info.image_size, 3), jnp.float32)


def _init_variables(model: nn.Module, info: data.DatasetInfo, seed: int) -> dict[str, Any]:
  """Fresh params and BatchNorm statistics (the ``perturb`` template is not state)."""
  x = jnp.zeros((1, info.image_size, info.image_size, 3), jnp.float32)
  # An RBG key compiles the initializers about 4x faster than threefry on CPU
  # (2 s instead of 8 s for a ResNet-18); values are deterministic per seed.
  variables = jax.jit(model.init)(jax.random.key(seed, impl='rbg'), x)
  return {k: variables[k] for k in ('params', 'batch_stats') if k in variables}


def _initial_variables(model: nn.Module, info: data.DatasetInfo, config: ml_collections.ConfigDict,
                       workdir: str, init: str, stage: str) -> dict[str, Any]:
  """Fresh variables, overwritten by a checkpoint's where names and shapes match.

  ``init``: 'scratch'; a checkpoint directory; or 'auto', this workdir's
  pretrain checkpoint when there is one.
  """
  variables = _init_variables(model, info, config.seed)
  source = os.path.join(workdir, 'pretrain') if init == 'auto' else init
  if init == 'scratch' or (init == 'auto' and not checkpoints.has_checkpoint(source)):
    if stage == 'finetune' and init == 'auto':
      logging.warning('finetune: no pretrained model (%s); quantization-aware training starts '
                      'from scratch. Run the pretrain stage or set --config.finetune.init.',
                      source)
    else:
      logging.info('%s: initialized from scratch', stage)
    return variables
  merged, report = checkpoints.merge_variables(variables, checkpoints.load_variables(source))
  checkpoints.log_merge_report(source, report)
  return merged


def _stage_spec(config, workdir, stage: str, spec: QuantSpec, **extra) -> loop.StageSpec:
  section = config[stage]
  data_config = stage_data_config(config, stage)
  info = data.get_info(data_config)
  model = build_model(config, info, spec)
  tx, schedule = optimizers.make_optimizer(stage, section,
                                           data.steps_per_epoch(data_config, config.batch_size),
                                           costs=extra.get('costs'))
  logging.info('%s: %s on %s (%d classes, %d px, %d train / %d eval); %s', stage,
               config.model.name, info.name, info.num_classes, info.image_size, info.num_train,
               info.num_eval, optimizers.describe(stage, section))
  variables = _initial_variables(model, info, config, workdir, section.init, stage)
  return loop.StageSpec(name=stage, model=model, tx=tx, schedule=schedule, variables=variables,
                        data_config=data_config, epochs=section.epochs,
                        label_smoothing=section.label_smoothing,
                        quantized_grads=optimizers.needs_quantized_grads(section),
                        m_sharpness=section.m_sharpness,
                        sharpness_period=optimizers.sharpness_period(section), **extra)


def _fit_and_diagnose(spec: loop.StageSpec, config: ml_collections.ConfigDict, workdir: str
                     ) -> tuple[steps.TrainState, dict[str, Any]]:
  """Trains a stage, with lambda_max every K epochs and the end-of-stage diagnostics.

  Returns:
    (final state, {'accuracy', 'loss'} of the final eval plus the diagnostics).
  """
  diagnostics = Diagnostics(config, spec.model, spec.data_config,
                            os.path.join(workdir, spec.name), spec.name)
  every = config.diagnostics.lambda_max_every_epochs
  hook = None
  if every:
    hook = lambda epoch, state: ({'lambda_max': diagnostics.lambda_max(state)}
                                 if epoch % every == 0 else {})
  state, result = loop.fit(spec, config, workdir, epoch_hook=hook)
  final = diagnostics.finish(state)
  final.pop('step')
  return state, {'accuracy': result['accuracy'], 'loss': result['loss'], **final}


def run_pretrain(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Full-precision training: the initialization of search and finetuning."""
  _, summary = _fit_and_diagnose(
      _stage_spec(config, workdir, 'pretrain', quant_spec(config, 'float')), config, workdir)
  return summary


def _supernet_costs(config, info: data.DatasetInfo) -> tuple[nn.Module, tuple[LayerCost, ...]]:
  model = build_model(config, info, quant_spec(config, 'supernet'))
  return model, collect_layer_costs(model, _sample_input(info))


def run_search(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Supernet search; writes policy.json, the bit-allocation plot and report."""
  info = data.get_info(stage_data_config(config, 'search'))
  _, costs = _supernet_costs(config, info)
  spec = _stage_spec(config, workdir, 'search', quant_spec(config, 'supernet'), costs=costs)
  state, result = _fit_and_diagnose(spec, config, workdir)
  params = jax.device_get(state.params)
  policy, budget_meta = _searched_policy(config.search, params, costs, state.opt_state)
  rows = layer_report(params, costs, policy)
  table = format_report(rows)
  logging.info('search: per-layer bits and BOPs at %d px (E = expected under the softmax, '
               'then the searched policy):\n%s', info.image_size, table)
  searched = [r for r in rows if r.path in policy]
  summary = {
      **result,
      'gbops': sum(r.bops_argmax for r in rows) / 1e9,
      'gbops_expected': sum(r.bops_expected for r in rows) / 1e9,
      'gbops_8bit': sum(r.macs for r in rows) * 64 / 1e9,
      'mean_w_bits': float(np.mean([r.w for r in searched])),
      'mean_a_bits': float(np.mean([r.a for r in searched])),
  }
  meta = {'model': config.model.name, 'data': info.name, 'image_size': info.image_size,
          'sharpness': config.search.sharpness, 'comp_weight': config.search.comp_weight,
          'w_candidates': list(config.quant.w_bits), 'a_candidates': list(config.quant.a_bits),
          **budget_meta, **summary}
  if jax.process_index() == 0:
    save_policy(policy, os.path.join(workdir, POLICY_FILE), meta=meta)
    with atomic_write(os.path.join(workdir, 'search', 'report.txt')) as f:
      f.write(table + '\n')
    plot_bit_allocation(rows, os.path.join(workdir, BITS_PLOT), title=(
        f'{config.model.name} on {info.name}, {config.search.sharpness} search'))
  sharding.sync_processes('policy written')  # finetune reads it on every process
  logging.info('search: policy -> %s, plot -> %s', os.path.join(workdir, POLICY_FILE),
               os.path.join(workdir, BITS_PLOT))
  return summary


def _searched_policy(section: ml_collections.ConfigDict, params: Any,
                     costs: Sequence[LayerCost], opt_state: Any) -> tuple[Policy, dict[str, Any]]:
  """The argmax policy; with a BOPs target, fitted to within its tolerance (logged)."""
  final_weight = float(optim.complexity_stats(opt_state).get('comp_weight', section.comp_weight))
  if not section.target:
    return argmax_policy(params, costs), {'final_comp_weight': final_weight}
  target = budget.target_bops(section.target, costs)
  fit = budget.fit_policy_to_budget(params, costs, target, section.target_tolerance)
  logging.info('search: target %s = %.4f GBOPs; argmax policy %.4f GBOPs (%+.1f%%), final '
               'lambda %.4g; %d move(s) to the band of +-%.0f%%%s -> %.4f GBOPs (%+.1f%%)',
               section.target, target / 1e9, fit.argmax_bops / 1e9,
               100 * (fit.argmax_bops / target - 1), final_weight, len(fit.moves),
               100 * section.target_tolerance,
               ''.join(f'; {p} {k} {a}->{b}' for p, k, a, b in fit.moves[:8])
               + ('; ...' if len(fit.moves) > 8 else ''),
               fit.bops / 1e9, 100 * (fit.bops / target - 1))
  return fit.policy, {'target': section.target, 'target_gbops': target / 1e9,
                      'argmax_gbops': fit.argmax_bops / 1e9, 'budget_moves': len(fit.moves),
                      'final_comp_weight': final_weight}


def load_finetune_policy(config: ml_collections.ConfigDict, workdir: str,
                         info: data.DatasetInfo) -> tuple[Policy, dict[str, Any]]:
  """The finetune stage's policy (config or this workdir's search), checked against the model.

  Raises:
    FileNotFoundError: no policy file (with what to run or pass).
    PolicyError: malformed JSON, missing or unknown layers, bits outside the candidates.
  """
  path = config.finetune.policy or os.path.join(workdir, POLICY_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'finetune needs a policy: {path} does not exist. Run the search '
                            'stage first, or pass --config.finetune.policy=PATH/policy.json.')
  policy, meta = load_policy(path)
  _, costs = _supernet_costs(config, info)
  validate_policy(policy, searchable_layers(costs))
  return policy, {'path': path, **meta}


def run_finetune(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Quantization-aware training with a fixed policy (from any data set/resolution)."""
  info = data.get_info(stage_data_config(config, 'finetune'))
  policy, meta = load_finetune_policy(config, workdir, info)
  spec = quant_spec(config, 'fixed', policy)
  stage = _stage_spec(config, workdir, 'finetune', spec)
  costs = collect_layer_costs(stage.model, _sample_input(info))
  gbops = policy_bops(policy, costs) / 1e9
  logging.info('finetune: policy %s (searched on %s at %s px, %.4f GBOPs there) costs %.4f GBOPs '
               'at %d px', meta['path'], meta.get('data', '?'), meta.get('image_size', '?'),
               meta.get('gbops', float('nan')), gbops, info.image_size)
  _, result = _fit_and_diagnose(stage, config, workdir)
  return {**result, 'gbops': gbops, 'policy': meta['path']}


def run_eval(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Evaluates the trained models of this workdir: full precision and quantized."""
  data_config = stage_data_config(config, 'finetune')
  info = data.get_info(data_config)
  models_to_eval: dict[str, Callable[[], QuantSpec]] = {}
  if checkpoints.has_checkpoint(os.path.join(workdir, 'pretrain')):
    models_to_eval['pretrain'] = lambda: quant_spec(config, 'float')
  if checkpoints.has_checkpoint(os.path.join(workdir, 'finetune')):
    models_to_eval['finetune'] = lambda: quant_spec(
        config, 'fixed', load_finetune_policy(config, workdir, info)[0])
  if not models_to_eval:
    raise FileNotFoundError(f'eval: no trained model in {workdir}; run the pretrain or '
                            'finetune stage first.')
  summary = {}
  for stage, make_spec in models_to_eval.items():
    spec = make_spec()
    model = build_model(config, info, spec)
    variables = checkpoints.load_variables(os.path.join(workdir, stage))
    state = steps.TrainState(step=jnp.zeros([], jnp.int32), params=variables['params'],
                             batch_stats=variables['batch_stats'], opt_state=None)
    mesh = sharding.make_mesh()
    result = loop.evaluate(jax.jit(steps.make_eval_step(model)),
                           sharding.put_replicated(state, mesh), data_config,
                           config.eval_batch_size, mesh)
    costs = collect_layer_costs(model, _sample_input(info))
    gbops = sum(r.bops_argmax for r in layer_report(None, costs)) / 1e9
    summary[stage] = {'accuracy': result['accuracy'], 'loss': result['loss'], 'gbops': gbops,
                      'examples': int(result['examples'])}
    logging.info('eval: %-8s top-1 %.2f%%  loss %.4f  %.4f GBOPs  (%d %s images)', stage,
                 100 * result['accuracy'], result['loss'], gbops, result['examples'], info.name)
  return summary


STAGE_FNS: dict[str, Callable[[ml_collections.ConfigDict, str], dict[str, Any]]] = {
    'pretrain': run_pretrain,
    'search': run_search,
    'finetune': run_finetune,
    'eval': run_eval,
}
