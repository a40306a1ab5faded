"""Parameter groups of quantized models, for optax.multi_transform and masks.

Every parameter leaf gets one label:

* ``'arch'``: architecture logits (``w_logits``, ``a_logits``) of supernet layers;
* ``'quant'``: quantizer parameters (clipping levels, LSQ step sizes);
* ``'norm'``: normalization affine parameters (``scale`` and its ``bias``);
* ``'weights'``: everything else (kernels and biases of conv/dense layers).

Example::

  tx = optax.multi_transform(
      {'weights': optax.sgd(0.01, momentum=0.9), 'norm': optax.sgd(0.01, momentum=0.9),
       'quant': optax.sgd(0.01, momentum=0.9), 'arch': optax.adam(1e-3)},
      param_labels)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

ARCH = 'arch'
QUANT = 'quant'
NORM = 'norm'
WEIGHTS = 'weights'
LABELS = (WEIGHTS, NORM, QUANT, ARCH)

_ARCH_NAMES = frozenset({'w_logits', 'a_logits'})
_QUANT_NAMES = frozenset({'w_clip', 'a_clip', 'w_step', 'a_step'})


def _label_tree(node: Any, name: str | None, siblings: Mapping[str, Any] | None) -> Any:
  if isinstance(node, Mapping):
    return {k: _label_tree(v, k, node) for k, v in node.items()}
  if name in _ARCH_NAMES:
    return ARCH
  if name in _QUANT_NAMES:
    return QUANT
  # A normalization layer has `scale` (and `bias`) but no `kernel`.
  if siblings is not None and 'scale' in siblings and 'kernel' not in siblings:
    return NORM
  return WEIGHTS


def param_labels(params: Any) -> Any:
  """A pytree like ``params`` (nested dicts) with one label string per leaf."""
  if not isinstance(params, Mapping):
    raise TypeError('param_labels expects the nested-dict `params` of a Flax model.')
  return _label_tree(params, None, None)


def label_mask(*labels: str) -> Callable[[Any], Any]:
  """A mask function: True on leaves whose label is in ``labels``.

  Usable wherever optax takes a mask, e.g. ``optax.masked`` or
  ``optax.add_decayed_weights(5e-4, mask=label_mask('weights'))``.
  """
  unknown = set(labels) - set(LABELS)
  if unknown:
    raise ValueError(f'unknown parameter labels {sorted(unknown)}; choose from {LABELS}.')
  return lambda params: jax.tree.map(lambda l: l in labels, param_labels(params))


def count_params(params: Any, labels: Sequence[str] = (WEIGHTS, NORM)) -> int:
  """Number of scalars in the leaves with the given labels.

  The default counts the network's own parameters (what papers report), not
  clipping levels or architecture logits.
  """
  sizes = jax.tree.map(lambda p, l: p.size if l in labels else 0, params, param_labels(params))
  return int(sum(jax.tree.leaves(sizes)))
