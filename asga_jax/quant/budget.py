"""BOPs budgets: targets, the BOPs of an argmax policy, and fitting a policy to a budget.

A search can be given a BOPs target instead of a complexity weight. The
target is absolute (``'0.62G'`` or ``0.62e9`` BOPs per example) or a
uniform-precision equivalent (``'3MP'``: the BOPs of the same model with every
searched layer at 3/3 bits and the edge layers at their own bits).
:func:`asga_jax.optim.complexity_penalty` adapts lambda during the search so
that the argmax policy approaches the target; :func:`fit_policy_to_budget`
then moves the few layers needed to land within a tolerance of it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from asga_jax.quant.complexity import LayerCost, layer_bops, layer_params, own_bits, policy_bops
from asga_jax.quant.policy import LayerBits, Policy

_TARGET = re.compile(r'^\s*(?P<value>\d+(\.\d*)?|\.\d+)\s*(?P<unit>MP|G|M)?\s*$', re.IGNORECASE)


def _fixed_bops(costs: Sequence[LayerCost]) -> float:
  """BOPs of the layers that are not searched (edge or fixed layers, at their own bits)."""
  return sum(layer_bops(c, *own_bits(c)) for c in costs if not c.searchable)


def uniform_bops(costs: Sequence[LayerCost], bits: float) -> float:
  """BOPs with every searched layer at ``bits``/``bits``, the others at their own bits."""
  return _fixed_bops(costs) + float(sum(c.macs * bits * bits for c in costs if c.searchable))


def parse_target(target: str) -> tuple[float, str]:
  """(number, unit) of a target string; unit is 'MP', 'G', 'M' or '' (BOPs).

  Raises:
    ValueError: the string is not a target.
  """
  match = _TARGET.match(str(target))
  if not match:
    raise ValueError(f'BOPs target {target!r} is not understood; write e.g. "3MP" (the BOPs '
                     'of uniform 3-bit), "0.62G" (GBOPs) or "620M" (MBOPs).')
  return float(match['value']), (match['unit'] or '').upper()


def target_bops(target: str | float, costs: Sequence[LayerCost]) -> float:
  """BOPs per example of a target: a number of BOPs, ``'<x>G'``, ``'<x>M'`` or ``'<b>MP'``.

  Raises:
    ValueError: unparsable, or outside what the candidate bits can reach.
  """
  if isinstance(target, (int, float)):
    value = float(target)
  else:
    number, unit = parse_target(target)
    value = (uniform_bops(costs, number) if unit == 'MP'
             else number * {'G': 1e9, 'M': 1e6, '': 1.0}[unit])
  low, high = bops_range(costs)
  if not low <= value <= high:
    raise ValueError(f'BOPs target {target!r} = {value / 1e9:.4g} GBOPs is outside what the '
                     f'candidate bits can reach: {low / 1e9:.4g} to {high / 1e9:.4g} GBOPs.')
  return value


def bops_range(costs: Sequence[LayerCost]) -> tuple[float, float]:
  """(smallest, largest) BOPs over all policies of the searched layers."""
  searched = [c for c in costs if c.searchable]
  fixed = _fixed_bops(costs)
  return (fixed + float(sum(c.macs * c.w_bits[0] * c.a_bits[0] for c in searched)),
          fixed + float(sum(c.macs * c.w_bits[-1] * c.a_bits[-1] for c in searched)))


def argmax_bops(params: Mapping[str, Any], costs: Sequence[LayerCost]) -> jax.Array:
  """BOPs per example of the argmax policy (traceable; not differentiable)."""
  total = jnp.asarray(_fixed_bops(costs), jnp.float32)
  for c in costs:
    if c.searchable:
      node = layer_params(params, c.path)
      bw = jnp.asarray(c.w_bits, jnp.float32)[jnp.argmax(node['w_logits'])]
      ba = jnp.asarray(c.a_bits, jnp.float32)[jnp.argmax(node['a_logits'])]
      total = total + c.macs * bw * ba
  return total


@dataclasses.dataclass(frozen=True)
class BudgetFit:
  """Result of :func:`fit_policy_to_budget`.

  Attributes:
    policy: the policy within the tolerance (or as close as the moves got).
    bops: its BOPs per example.
    argmax_bops: BOPs of the plain argmax policy.
    moves: (layer, 'w' or 'a', old bits, new bits) in the order applied.
  """
  policy: Policy
  bops: float
  argmax_bops: float
  moves: tuple[tuple[str, str, int, int], ...]


def fit_policy_to_budget(params: Mapping[str, Any], costs: Sequence[LayerCost], target: float,
                         tolerance: float = 0.05, max_moves: int = 1000) -> BudgetFit:
  """The argmax policy, moved one candidate at a time until within ``tolerance`` of ``target``.

  Each move takes one operand (weights or activations) of one searched layer
  one candidate down (above the band) or up (below it). Among the moves, one
  that lands in the band is preferred, then the one that gives up the least
  logit per BOP moved (the layer the search was least sure of), never one
  that jumps past the far side of the band while another move does not.

  Args:
    params: supernet parameters (architecture logits).
    costs: the supernet's layer costs.
    target: BOPs per example.
    tolerance: relative half-width of the band around ``target``.
    max_moves: stop after this many moves.

  Returns:
    A :class:`BudgetFit`.
  """
  lo, hi = target * (1 - tolerance), target * (1 + tolerance)
  searched = [c for c in costs if c.searchable]
  logits = {c.path: {k: np.asarray(layer_params(params, c.path)[f'{k}_logits'], np.float64)
                     for k in ('w', 'a')} for c in searched}
  choice = {c.path: {k: int(np.argmax(logits[c.path][k])) for k in ('w', 'a')}
            for c in searched}
  bits = lambda c, k, i: (c.w_bits if k == 'w' else c.a_bits)[i]
  chosen_bops = lambda c, ch: layer_bops(c, bits(c, 'w', ch['w']), bits(c, 'a', ch['a']))
  fixed = _fixed_bops(costs)
  total = lambda: fixed + sum(chosen_bops(c, choice[c.path]) for c in searched)
  start, moves = total(), []
  for _ in range(max_moves):
    current = total()
    if lo <= current <= hi:
      break
    step = -1 if current > hi else 1
    options = []
    for c in searched:
      for k in ('w', 'a'):
        i = choice[c.path][k] + step
        if not 0 <= i < len(c.w_bits if k == 'w' else c.a_bits):
          continue
        moved = dict(choice[c.path], **{k: i})
        delta = chosen_bops(c, moved) - chosen_bops(c, choice[c.path])
        after = current + delta
        regret = (logits[c.path][k][choice[c.path][k]] - logits[c.path][k][i]) / abs(delta)
        overshoot = after < lo if step < 0 else after > hi
        options.append((not lo <= after <= hi, overshoot, regret, c.path, k, i, c))
    if not options:
      break
    _, _, _, path, k, i, c = min(options, key=lambda o: o[:5])
    moves.append((path, k, bits(c, k, choice[path][k]), bits(c, k, i)))
    choice[path][k] = i
  policy = Policy.from_dict({c.path: LayerBits(bits(c, 'w', choice[c.path]['w']),
                                               bits(c, 'a', choice[c.path]['a']))
                             for c in searched})
  return BudgetFit(policy, policy_bops(policy, costs), float(start), tuple(moves))
