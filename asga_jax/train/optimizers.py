"""Optimizers of each stage, built from the config with optax."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

from asga_jax import optim


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


def make_optimizer(stage: str, section: ml_collections.ConfigDict, steps_per_epoch: int
                   ) -> tuple[optax.GradientTransformationExtraArgs, optax.Schedule]:
  """The optimizer of ``stage`` and its weight learning-rate schedule.

  pretrain and finetune: SGD on every parameter. search: SGD on the network,
  ``arch_optimizer`` on the architecture logits (``optax.multi_transform``),
  wrapped in ASGA when ``sharpness == 'asga'``.
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
    if section.sharpness == 'asga':
      a = section.asga
      tx = optim.asga(tx, rho0=a.rho0, rho_max=a.rho_max, phi=a.phi, mu=a.mu,
                      epsilon=a.epsilon)
  return optax.with_extra_args_support(tx), schedule


def describe(tx_stage: str, section: ml_collections.ConfigDict) -> dict[str, Any]:
  """The optimizer settings of a stage, for the log."""
  info = {k: section[k] for k in ('epochs', 'lr', 'momentum', 'nesterov', 'weight_decay',
                                  'schedule', 'warmup_epochs')}
  if tx_stage == 'search':
    info.update(arch_optimizer=section.arch_optimizer, arch_lr=section.arch_lr,
                comp_weight=section.comp_weight, sharpness=section.sharpness)
    if section.sharpness == 'asga':
      info.update({f'asga.{k}': v for k, v in section.asga.items()})
  return info
