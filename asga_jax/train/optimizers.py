"""Optimizers of each stage, built from the config with optax."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import optax

from asga_jax import optim
from asga_jax.quant import LayerCost, budget


def learning_rate_schedule(section: ml_collections.ConfigDict, steps_per_epoch: int
                           ) -> optax.Schedule:
  """Linear warm-up from 0 for ``warmup_epochs``, then cosine (to 0) or constant."""
  total = int(round(section.epochs * steps_per_epoch))
  warmup = int(round(section.warmup_epochs * steps_per_epoch))
  if section.schedule == 'cosine':
    if warmup:
      return optax.warmup_cosine_decay_schedule(0.0, section.lr, warmup, total, 0.0)
    return optax.cosine_decay_schedule(section.lr, total)
  if warmup:
    return optax.join_schedules([optax.linear_schedule(0.0, section.lr, warmup),
                                 optax.constant_schedule(section.lr)], [warmup])
  return optax.constant_schedule(section.lr)


def _network_optimizer(section: ml_collections.ConfigDict, schedule: optax.Schedule
                       ) -> optax.GradientTransformation:
  """SGD with momentum; L2 weight decay on conv/dense weights only (not BN, clips)."""
  return optax.chain(
      optax.add_decayed_weights(section.weight_decay, mask=optim.label_mask(optim.WEIGHTS)),
      optax.sgd(schedule, momentum=section.momentum or None, nesterov=section.nesterov))


def _labels(spec: str) -> list[str]:
  return [label.strip() for label in spec.split(',') if label.strip()]


def sharpness_transform(section: ml_collections.ConfigDict
                        ) -> optax.GradientTransformationExtraArgs | None:
  """The stage's sharpness-aware gradient transform (None for plain SGD)."""
  kind = section.sharpness
  if kind == 'none':
    return optim.sharpness_probe(rho=section.probe_rho) if section.probe_rho > 0 else None
  hp = section[kind]
  mask = optim.label_mask(*_labels(hp.perturb))
  if kind == 'sam':
    return optim.sam_gradient(rho=hp.rho, perturb_mask=mask)
  if kind == 'asga':
    return optim.asga_gradient(rho0=hp.rho0, rho_max=hp.rho_max, phi=hp.phi, mu=hp.mu,
                               epsilon=hp.epsilon, perturb_mask=mask, adaptive=hp.adaptive)
  return optim.saq_gradient(rho=hp.rho, case=hp.case, perturb_mask=mask,
                            vanilla_loss=hp.vanilla_loss, tau=hp.tau, beta=hp.beta)


def needs_quantized_grads(section: ml_collections.ConfigDict) -> bool:
  """SAQ cases 1 and 3 perturb the quantized weights: the step must supply dL/dQ(w)."""
  return section.sharpness == 'saq' and section.saq.case in (1, 3)


def sharpness_period(section: ml_collections.ConfigDict) -> int:
  """Steps between sharpness-gradient evaluations (SAQ efficient training's tau)."""
  return section.saq.tau if section.sharpness == 'saq' else 1


def complexity_transform(section: ml_collections.ConfigDict, costs: Sequence[LayerCost]
                         ) -> optax.GradientTransformation:
  """lambda * grad L_comp of the search: fixed, or adapted toward ``section.target``."""
  if not section.target:
    return optim.complexity_penalty(costs, weight=section.comp_weight)
  return optim.complexity_penalty(costs, weight=section.comp_weight,
                                  target_bops=budget.target_bops(section.target, costs),
                                  rate=section.target_rate)


def make_optimizer(stage: str, section: ml_collections.ConfigDict, steps_per_epoch: int,
                   costs: Sequence[LayerCost] | None = None
                   ) -> tuple[optax.GradientTransformationExtraArgs, optax.Schedule]:
  """The optimizer of ``stage`` and its weight learning-rate schedule.

  SGD on the network (weight decay on conv/dense weights only); in the search,
  ``arch_optimizer`` on the architecture logits (``optax.multi_transform``);
  the stage's sharpness-aware transform, if any, in front; in front of all, in
  the search, the complexity term (needs the supernet's ``costs``).
  """
  schedule = learning_rate_schedule(section, steps_per_epoch)
  tx = _network_optimizer(section, schedule)
  if stage == 'search':
    if section.arch_optimizer == 'adam':
      arch = optax.adam(section.arch_lr, b1=0.5, b2=0.999)  # DARTS' betas for logits
    else:
      arch = optax.sgd(section.arch_lr, momentum=0.9)
    group = lambda params: jax.tree.map(lambda l: 'arch' if l == optim.ARCH else 'net',
                                        optim.param_labels(params))
    tx = optax.multi_transform({'net': tx, 'arch': arch}, group)
  sharp = sharpness_transform(section)
  if sharp is not None:
    tx = optax.chain(sharp, tx)
  if stage == 'search':
    if costs is None:
      raise ValueError('the search optimizer needs the supernet layer costs.')
    tx = optax.chain(complexity_transform(section, costs), tx)
  return optax.with_extra_args_support(tx), schedule


def describe(stage: str, section: ml_collections.ConfigDict) -> dict[str, Any]:
  """The optimizer settings of a stage, for the log."""
  info = {k: section[k] for k in ('epochs', 'lr', 'momentum', 'nesterov', 'weight_decay',
                                  'schedule', 'warmup_epochs', 'sharpness')}
  if stage == 'search':
    info.update(arch_optimizer=section.arch_optimizer, arch_lr=section.arch_lr,
                comp_weight=section.comp_weight)
    if section.target:
      info.update(target=section.target, target_rate=section.target_rate,
                  target_tolerance=section.target_tolerance)
  if section.sharpness != 'none':
    info.update({f'{section.sharpness}.{k}': v for k, v in section[section.sharpness].items()})
  if section.m_sharpness:
    info['m_sharpness'] = section.m_sharpness
  if section.sharpness == 'none' and section.probe_rho:
    info['probe_rho'] = section.probe_rho
  return info
