"""The run configuration: documented defaults and validation before any compute.

Config files in ``configs/`` start from :func:`default_config` and change what
their experiment needs. Every field can be overridden on the command line,
e.g. ``--config.search.epochs=2``. ``validate_config`` checks a whole config
at start-up and reports every problem with the field name and a fix.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import ml_collections
from ml_collections import config_dict

from asga_jax import models
from asga_jax.data import default_data_config
from asga_jax.optim.partition import LABELS
from asga_jax.quant import budget
from asga_jax.quant.spec import QUANTIZERS
from asga_jax.train.checkpoints import has_checkpoint

STAGES = ('pretrain', 'search', 'finetune', 'eval')
SHARPNESS = ('none', 'sam', 'asga', 'saq')
SCHEDULES = ('cosine', 'constant')
ARCH_OPTIMIZERS = ('adam', 'sgd')


class ConfigError(ValueError):
  """A configuration value is invalid; the message names the field and the fix."""


def _sharpness_sections() -> dict[str, ml_collections.ConfigDict]:
  """Hyper-parameters of each sharpness-aware method; `perturb` lists parameter labels."""
  return {
      'sam': ml_collections.ConfigDict({'rho': 0.05, 'perturb': 'weights'}),
      'asga': ml_collections.ConfigDict({
          'rho0': 0.1, 'rho_max': 0.5, 'phi': config_dict.placeholder(float), 'mu': 0.01,
          'epsilon': 0.1, 'adaptive': True, 'perturb': 'weights'}),
      'saq': ml_collections.ConfigDict({
          'rho': 0.5, 'case': 3, 'perturb': 'weights,norm', 'vanilla_loss': True, 'tau': 1,
          'beta': 0.7}),
  }


def _train_section(*, epochs: int, lr: float, warmup_epochs: float, nesterov: bool,
                   weight_decay: float, sharpness: str = 'none') -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      'epochs': float(epochs),         # fractional epochs are allowed
      'lr': lr,                        # peak learning rate of the weights
      'momentum': 0.9,
      'nesterov': nesterov,
      'weight_decay': weight_decay,    # L2 on conv/dense kernels and biases only
      'schedule': 'cosine',            # 'cosine' (to 0) or 'constant', after warm-up
      'warmup_epochs': float(warmup_epochs),  # linear warm-up from 0
      'label_smoothing': 0.0,
      'init': 'auto',                  # see each stage
      'sharpness': sharpness,          # 'none', 'sam', 'asga' or 'saq'
      'm_sharpness': 0,                # > 0: perturb per sub-batch of this size
      'probe_rho': 0.0,                # > 0 with sharpness 'none': measure h, sigma_max
      **_sharpness_sections(),
  })


def default_config() -> ml_collections.ConfigDict:
  """The full configuration with the papers' defaults.

  Top-level fields:
    seed: seeds initialization and the data order (augmentation included).
    stages: which stages run, in order: comma-separated names out of
      'pretrain', 'search', 'finetune', 'eval' (e.g. --config.stages=finetune,eval).
    batch_size, eval_batch_size: global batch sizes (split over the devices).
    fsdp: shard large parameters and optimizer state over the devices instead
      of replicating them (FSDP-style; for the large ViT configs).
    data: input pipeline (see ``asga_jax.data.default_data_config``).
    model: name (see ``asga_jax.models.MODELS``), width (None: the model's
      default), stem ('auto' picks 'cifar' below 64 px, else 'imagenet').
    quant: bit candidates for weights/activations, first/last-layer bits,
      quantizer ('clip' or 'lsq') and clipping initializations.
    pretrain: full-precision training (the initialization of finetuning).
    Every training stage (pretrain, search, finetune) has ``sharpness``:
      'none', 'sam', 'asga' or 'saq', with the sections ``sam`` (rho),
      ``asga`` (rho0, rho_max, phi, mu, epsilon,
      adaptive: False keeps rho at rho0), ``saq`` (rho, case, tau,
      beta, vanilla_loss); each has ``perturb``, the parameter labels that
      move ('weights', 'norm', 'quant', 'arch'); ``m_sharpness`` (> 0:
      perturb per sub-batch of that size); ``probe_rho`` (> 0 with sharpness
      'none': measure h and sigma_max at that radius, like the ASGA paper's
      baselines in Table 3, at the cost of a second pass).
    search: supernet search: weights by SGD (lr 0.01), architecture logits by
      ``arch_optimizer``; lambda = ``comp_weight``, or with ``target`` (e.g.
      '3MP' = uniform 3-bit BOPs, '0.6G' GBOPs) adapted toward the target by
      dual ascent (``target_rate``), the final policy fitted to within
      ``target_tolerance``; ``sharpness`` 'asga' (default) or 'none' (plain
      EdMIPS);
      ``data`` overrides fields of ``data`` for the proxy data set (None
      inherits); ``init`` 'auto' (the pretrain checkpoint of this workdir if
      there is one, else scratch), 'scratch' or a checkpoint directory.
    finetune: fixed-policy QAT (SGD Nesterov lr 0.04, cosine, 5 warm-up
      epochs); ``policy`` a policy.json ('' = this workdir's search result);
      ``init`` 'auto' (this workdir's pretrain checkpoint), 'scratch' or a
      checkpoint directory.
    diagnostics: lambda_max (power iteration on Hessian-vector products of the
      loss on fixed train batches, BatchNorm in eval mode, w.r.t. the network
      weights) at the end of each training stage and optionally every K
      epochs; 1-D/2-D loss landscapes along random filter-normalized
      directions (PNG + .npz in <workdir>/<stage>/).
    log_every_steps, checkpoint_every_steps (0: at the end of each epoch),
    keep_checkpoints, eval_every_epochs.
    nonfinite_patience: a step with a non-finite loss or gradient is skipped
      (never applied, never saved); more than this many in a row stop the run
      with an error naming the last good checkpoint (0: stop at the first).
  """
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.stages = ','.join(STAGES)
  config.batch_size = 128
  config.eval_batch_size = 256
  config.fsdp = False  # shard params and optimizer state over the devices (large models)
  config.data = default_data_config()
  config.model = ml_collections.ConfigDict({
      'name': 'resnet20',
      'width': config_dict.placeholder(int),
      'stem': 'auto',
  })
  config.quant = ml_collections.ConfigDict({
      'w_bits': (2, 3, 4, 6),
      'a_bits': (2, 3, 4, 6),
      'edge_bits': 8,
      'quantizer': 'clip',
      'w_clip_init': 3.0,
      'a_clip_init': 4.0,
  })
  config.pretrain = _train_section(epochs=200, lr=0.1, warmup_epochs=0, nesterov=True,
                                   weight_decay=5e-4)
  config.search = _train_section(epochs=90, lr=0.01, warmup_epochs=0, nesterov=False,
                                 weight_decay=5e-4, sharpness='asga')
  config.search.arch_optimizer = 'adam'
  config.search.arch_lr = 5e-3
  config.search.comp_weight = 1.0       # lambda; with a target, its initial value
  config.search.target = ''             # BOPs target: '' (fixed lambda), '3MP', '0.6G', '600M'
  config.search.target_rate = 0.05      # lambda's log-space dual-ascent step per step
  config.search.target_tolerance = 0.05  # the final policy lands within this of the target
  data = default_data_config()
  config.search.data = ml_collections.ConfigDict(
      {k: config_dict.placeholder(data.get_ref(k).get_type()) for k in data})
  config.finetune = _train_section(epochs=90, lr=0.04, warmup_epochs=5, nesterov=True,
                                   weight_decay=5e-4)
  config.finetune.policy = ''
  config.diagnostics = ml_collections.ConfigDict({
      'lambda_max': True,             # top Hessian eigenvalue at the end of each stage
      'lambda_max_every_epochs': 0,   # > 0: also every this many epochs
      'lambda_max_iters': 20,         # power-iteration cap
      'lambda_max_tol': 1e-3,         # relative change that stops the iteration
      'num_batches': 2,               # fixed, unaugmented train batches (eval_batch_size each)
      'landscape': '',                # '1d', '2d' or '1d,2d': plots at the end of each stage
      'landscape_points': 21,         # 1-D resolution
      'landscape_grid': 11,           # 2-D resolution (grid x grid evaluations)
      'landscape_span': 1.0,          # coefficients in [-span, span] of the filter-normalized
                                      # directions
  })
  config.log_every_steps = 50
  config.checkpoint_every_steps = 0
  config.keep_checkpoints = 2
  config.eval_every_epochs = 1
  config.nonfinite_patience = 5
  return config


def demo_variant(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """All stages on the embedded 1,000-image CIFAR-10 sample in a few CPU minutes."""
  config.data.name = 'cifar10_sample'
  config.batch_size = 64
  config.pretrain.epochs = 15.0
  config.search.epochs = 8.0
  config.search.arch_lr = 0.05  # few steps: the logits must move far enough to mean something
  config.finetune.epochs = 8.0
  config.finetune.warmup_epochs = 1.0
  config.diagnostics.num_batches = 1
  config.diagnostics.lambda_max_iters = 10
  config.diagnostics.lambda_max_tol = 1e-2
  config.diagnostics.landscape = '1d'
  config.log_every_steps = 15
  return config


def smoke_variant(config: ml_collections.ConfigDict, *, width: int = 4,
                  image_size: int = 16) -> ml_collections.ConfigDict:
  """Every stage for one epoch of the embedded sample on a tiny model (tests, CI)."""
  config.data.name = 'cifar10_sample'
  config.data.image_size = image_size
  config.model.width = width
  config.batch_size = 50
  config.eval_batch_size = 100
  for stage in ('pretrain', 'search', 'finetune'):
    config[stage].epochs = 1.0
    config[stage].warmup_epochs = 0.0
  config.search.arch_lr = 0.05
  config.diagnostics.num_batches = 1
  config.diagnostics.lambda_max_iters = 5
  config.log_every_steps = 5
  return config


def cifar_config(model: str, variant: str | None, *,
                 smoke_model: str | None = None, smoke_image_size: int = 16
                 ) -> ml_collections.ConfigDict:
  """A model on CIFAR-10, every stage.

  Variants: None (CIFAR-10 from TFDS), 'folder' (an image folder or archive),
  'demo' (the embedded sample), 'smoke' (one epoch, tiny: ``smoke_model`` if
  given, at ``smoke_image_size`` px).
  """
  config = default_config()
  config.model.name = model
  if not variant:
    return config
  if variant == 'folder':
    config.data.name = 'folder'
    return config
  if variant == 'demo':
    return demo_variant(config)
  if variant == 'smoke':
    config.model.name = smoke_model or model
    return smoke_variant(config, image_size=smoke_image_size)
  raise unknown_variant(f'{model}_cifar', variant, ('demo', 'smoke', 'folder'))


def proxy_to_target_config(model: str, variant: str | None, *, bits: Sequence[int],
                           quantizer: str = 'clip', lr_scale: float = 1.0,
                           demo_width: int = 16, smoke_width: int = 4
                           ) -> ml_collections.ConfigDict:
  """A zoo model searched on CIFAR-10 (the proxy, 32 px) and trained on ImageNet (224 px).

  Stages pretrain (full precision) -> search (on the proxy, CIFAR stem) ->
  finetune -> eval (on the target, ImageNet stem); the searched policy is
  recosted at the target resolution. Variants: None (ImageNet from TFDS,
  ``--config.data.data_dir``), 'imagenette' (TFDS imagenette as the
  target), 'demo' (the embedded sample: target at 64 px, proxy at 32 px,
  ``demo_width``), 'smoke' (one epoch per stage at ``smoke_width``).

  Args:
    model: a name in ``asga_jax.models.MODELS``.
    variant: see above.
    bits: searched bit candidates (weights and activations).
    quantizer: 'clip' or 'lsq' (ViTs).
    lr_scale: multiplies the SGD learning rates of every stage.
    demo_width, smoke_width: ``model.width`` of those variants.
  """
  config = default_config()
  config.model.name = model
  config.quant.w_bits = config.quant.a_bits = tuple(bits)
  config.quant.quantizer = quantizer
  config.data.name = 'imagenet2012'
  config.data.image_size = 224
  config.search.data.name = 'cifar10'
  config.search.data.image_size = 32
  config.search.target = '3MP'
  config.batch_size = 256
  config.eval_batch_size = 500
  config.pretrain.epochs = 90.0
  config.search.epochs = 90.0
  config.finetune.epochs = 90.0
  for stage in ('pretrain', 'search', 'finetune'):
    config[stage].lr *= lr_scale
    config[stage].weight_decay = 1e-4
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2000
  if not variant:
    return config
  if variant == 'imagenette':
    config.data.name = 'imagenette'
    config.batch_size = 64
    for stage in ('pretrain', 'finetune'):
      config[stage].lr /= 4  # linear scaling from batch 256
    return config
  if variant == 'demo':
    config = demo_variant(config)
    config.data.image_size = 64
    config.search.data.name = 'cifar10_sample'
    config.model.width = demo_width
    config.eval_batch_size = 200
    return config
  if variant == 'smoke':
    config = smoke_variant(config, width=smoke_width, image_size=32)
    config.search.data.name = 'cifar10_sample'
    config.search.data.image_size = 32
    return config
  raise unknown_variant(f'{model}_imagenet', variant, ('demo', 'smoke', 'imagenette'))


def unknown_variant(name: str, variant: str, choices: Sequence[str]) -> ConfigError:
  return ConfigError(f'unknown variant {variant!r} of {name}; choose one of {list(choices)} '
                     f'(e.g. --config configs/{name}.py:{choices[0]}).')


def stage_list(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  return tuple(s.strip() for s in config.stages.split(',') if s.strip())


def stage_data_config(config: ml_collections.ConfigDict, stage: str) -> ml_collections.ConfigDict:
  """``config.data`` with the stage's non-None ``data`` overrides applied."""
  data = config.data.copy_and_resolve_references()
  overrides = config[stage].get('data') if stage in ('search',) else None
  if overrides is not None:
    with data.unlocked():
      for key, value in overrides.items():
        if value is not None:
          data[key] = value
  return data


def _positive(problems: list[str], name: str, value, *, allow_zero: bool = False) -> None:
  number = isinstance(value, (int, float)) and not isinstance(value, bool)
  if not number or not (value >= 0 if allow_zero else value > 0):
    bound = '>= 0' if allow_zero else '> 0'
    problems.append(f'{name} must be a number {bound}, got {value!r}')


def _check_bits(problems: list[str], name: str, bits: Sequence[int]) -> None:
  bits = tuple(bits)
  if not bits or any(isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= 8
                     for b in bits):
    problems.append(f'{name} must be bit widths in 1..8, got {bits}')
  elif list(bits) != sorted(set(bits)):
    problems.append(f'{name} must be sorted and distinct, got {bits} '
                    f'(e.g. --config.{name}="{tuple(sorted(set(bits)))}")')


def _labels(problems: list[str], name: str, value: str) -> None:
  labels = [l.strip() for l in value.split(',') if l.strip()]
  if not labels or set(labels) - set(LABELS):
    problems.append(f'{name} must be comma-separated labels out of {LABELS}, got {value!r}')


def _check_sharpness(problems: list[str], stage: str, section: ml_collections.ConfigDict
                     ) -> None:
  kind = section.sharpness
  if kind not in SHARPNESS:
    problems.append(f'{stage}.sharpness must be one of {SHARPNESS}, got {kind!r}')
    return
  if not isinstance(section.m_sharpness, int) or section.m_sharpness < 0:
    problems.append(f'{stage}.m_sharpness must be an integer >= 0, got {section.m_sharpness!r}')
  _positive(problems, f'{stage}.probe_rho', section.probe_rho, allow_zero=True)
  if kind == 'none':
    return
  hp, name = section[kind], f'{stage}.{kind}'
  _labels(problems, f'{name}.perturb', hp.perturb)
  if kind == 'sam':
    _positive(problems, f'{name}.rho', hp.rho)
  elif kind == 'asga':
    for field in ('rho0', 'rho_max'):
      _positive(problems, f'{name}.{field}', hp[field])
    for field in ('mu', 'epsilon'):
      _positive(problems, f'{name}.{field}', hp[field], allow_zero=True)
    if hp.phi is not None:
      _positive(problems, f'{name}.phi', hp.phi)
    if all(isinstance(hp[f], (int, float)) for f in ('rho0', 'rho_max')) and hp.rho_max < hp.rho0:
      problems.append(f'{name}.rho_max ({hp.rho_max}) must be >= {name}.rho0 ({hp.rho0})')
  else:
    _positive(problems, f'{name}.rho', hp.rho)
    _positive(problems, f'{name}.beta', hp.beta, allow_zero=True)
    if hp.case not in (1, 2, 3):
      problems.append(f'{name}.case must be 1, 2 or 3, got {hp.case!r}')
    if not isinstance(hp.tau, int) or hp.tau < 1:
      problems.append(f'{name}.tau must be an integer >= 1, got {hp.tau!r}')


def landscape_kinds(diagnostics: ml_collections.ConfigDict) -> tuple[str, ...]:
  return tuple(k.strip() for k in diagnostics.landscape.split(',') if k.strip())


def _check_diagnostics(problems: list[str], d: ml_collections.ConfigDict) -> None:
  for name in ('lambda_max_iters', 'num_batches', 'landscape_points', 'landscape_grid'):
    if not isinstance(d[name], int) or d[name] < 1:
      problems.append(f'diagnostics.{name} must be a positive integer, got {d[name]!r}')
  if not isinstance(d.lambda_max_every_epochs, int) or d.lambda_max_every_epochs < 0:
    problems.append('diagnostics.lambda_max_every_epochs must be an integer >= 0, got '
                    f'{d.lambda_max_every_epochs!r}')
  _positive(problems, 'diagnostics.lambda_max_tol', d.lambda_max_tol)
  _positive(problems, 'diagnostics.landscape_span', d.landscape_span)
  unknown = set(landscape_kinds(d)) - {'1d', '2d'}
  if unknown:
    problems.append(f"diagnostics.landscape must list '1d' and/or '2d', got {d.landscape!r}")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks every field a run depends on; raises one ConfigError listing all problems."""
  problems: list[str] = []
  stages = stage_list(config)
  unknown = [s for s in stages if s not in STAGES]
  if unknown or not stages:
    problems.append(f'stages must be a non-empty subset of {STAGES}, got {stages}')
  if config.model.name not in models.MODELS:
    problems.append(f'model.name {config.model.name!r} is unknown; available: '
                    f'{sorted(models.MODELS)}')
  if config.model.stem not in ('auto', 'cifar', 'imagenet'):
    problems.append(f"model.stem must be 'auto', 'cifar' or 'imagenet', got {config.model.stem!r}")
  _check_bits(problems, 'quant.w_bits', config.quant.w_bits)
  _check_bits(problems, 'quant.a_bits', config.quant.a_bits)
  edge = config.quant.edge_bits
  if edge is not None and (isinstance(edge, bool) or not isinstance(edge, int)
                           or not (1 <= edge <= 8 or edge == 32)):
    problems.append(f'quant.edge_bits (first/last layer) must be in 1..8, 32 or None, got {edge!r}')
  if config.quant.quantizer not in QUANTIZERS:
    problems.append(f'quant.quantizer must be one of {QUANTIZERS}, got {config.quant.quantizer!r}')
  devices = jax.device_count()
  for name in ('batch_size', 'eval_batch_size'):
    if isinstance(config[name], int) and config[name] > 0 and config[name] % devices:
      problems.append(f'{name} ({config[name]}) must be a multiple of the device count '
                      f'({devices}): the global batch is split evenly over the devices')
  for name in ('batch_size', 'eval_batch_size', 'log_every_steps', 'keep_checkpoints',
               'eval_every_epochs'):
    if not isinstance(config[name], int) or config[name] <= 0:
      problems.append(f'{name} must be a positive integer, got {config[name]!r}')
  if not isinstance(config.checkpoint_every_steps, int) or config.checkpoint_every_steps < 0:
    problems.append('checkpoint_every_steps must be an integer >= 0 (0: every epoch), got '
                    f'{config.checkpoint_every_steps!r}')
  if not isinstance(config.nonfinite_patience, int) or config.nonfinite_patience < 0:
    problems.append('nonfinite_patience must be an integer >= 0 (0: stop at the first '
                    f'non-finite step), got {config.nonfinite_patience!r}')
  for stage in ('pretrain', 'search', 'finetune'):
    section = config[stage]
    if stage not in stages:
      continue
    _positive(problems, f'{stage}.epochs', section.epochs)
    _positive(problems, f'{stage}.lr', section.lr)
    _positive(problems, f'{stage}.weight_decay', section.weight_decay, allow_zero=True)
    _positive(problems, f'{stage}.warmup_epochs', section.warmup_epochs, allow_zero=True)
    if section.schedule not in SCHEDULES:
      problems.append(f'{stage}.schedule must be one of {SCHEDULES}, got {section.schedule!r}')
    if isinstance(section.epochs, (int, float)) and section.warmup_epochs >= section.epochs > 0:
      problems.append(f'{stage}.warmup_epochs ({section.warmup_epochs}) must be smaller than '
                      f'{stage}.epochs ({section.epochs})')
    if section.init not in ('auto', 'scratch') and not has_checkpoint(section.init):
      problems.append(f"{stage}.init must be 'auto', 'scratch' or a directory with "
                      f'checkpoints (a stage directory such as WORKDIR/pretrain, or its '
                      f'checkpoints/), got {section.init!r}')
  if 'search' in stages:
    s = config.search
    if s.arch_optimizer not in ARCH_OPTIMIZERS:
      problems.append(f'search.arch_optimizer must be one of {ARCH_OPTIMIZERS}, got '
                      f'{s.arch_optimizer!r}')
    _positive(problems, 'search.arch_lr', s.arch_lr)
    _positive(problems, 'search.comp_weight', s.comp_weight, allow_zero=not s.target)
    if s.target:
      try:
        budget.parse_target(s.target)
      except ValueError as e:
        problems.append(f'search.target: {e}')
      _positive(problems, 'search.target_rate', s.target_rate)
      if not 0 < s.target_tolerance < 1:
        problems.append(f'search.target_tolerance must be in (0, 1), got {s.target_tolerance}')
  for stage in ('pretrain', 'search', 'finetune'):
    if stage in stages:
      _check_sharpness(problems, stage, config[stage])
  if 'finetune' in stages and config.finetune.policy and \
      not os.path.isfile(config.finetune.policy):
    problems.append(f'finetune.policy {config.finetune.policy!r} does not exist; pass a '
                    'policy.json written by a search, or leave it empty to use this '
                    "workdir's search result")
  _check_diagnostics(problems, config.diagnostics)
  if problems:
    raise ConfigError('invalid configuration:\n  - ' + '\n  - '.join(problems))
