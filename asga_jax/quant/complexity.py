"""MACs and BOPs of quantized models, collected from traced shapes.

:func:`collect_layer_costs` traces ``model.init`` abstractly (``jax.eval_shape``,
no FLOPs spent) and intercepts every quantized layer call to record its input
and output shapes, so MACs come from the model itself, for any architecture
built from :mod:`asga_jax.quant.layers` (grouped and depthwise convolutions and
Dense layers on any number of tokens included):

  MACs_l = (output elements per example) * (kh * kw * c_in / groups)
  BOPs_l = MACs_l * E[b_w] * E[b_a],   E[b] = sum_j softmax(logits)_j b_j

E[b] is differentiable in the architecture logits, which is what the complexity
loss of differentiable MPQ needs. A full-precision operand counts 32 bits.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from asga_jax.quant.layers import QUANT_LAYERS, layer_path
from asga_jax.quant.policy import Policy
from asga_jax.quant.quantizers import FULL_PRECISION_BITS

REFERENCE_BITS = 8


@dataclasses.dataclass(frozen=True)
class LayerCost:
  """Static cost description of one quantized layer.

  Attributes:
    path: module path, e.g. 'stage1/block0/conv1'.
    kind: 'QuantConv' or 'QuantDense'.
    macs: multiply-accumulates per example.
    num_weights: kernel and bias parameters.
    in_shape: input shape per example.
    out_shape: output shape per example.
    w_bits: weight bit candidates (supernet), the fixed bits as a 1-tuple, or
      None (full precision).
    a_bits: likewise for the input activations.
    searchable: whether the layer carries architecture logits.
  """
  path: str
  kind: str
  macs: int
  num_weights: int
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  w_bits: tuple[int, ...] | None
  a_bits: tuple[int, ...] | None
  searchable: bool


def collect_layer_costs(model: nn.Module, *args: Any, **kwargs: Any) -> tuple[LayerCost, ...]:
  """Records every quantized layer of ``model`` called on ``args``.

  Args:
    model: a Flax module built from quantized layers.
    *args: example inputs (arrays or ``jax.ShapeDtypeStruct``; the leading
      axis is the batch and does not enter the counts).
    **kwargs: keyword arguments of ``model.__call__`` (e.g. ``train=False``).

  Returns:
    One :class:`LayerCost` per quantized layer, in call order.
  """
  records: dict[str, LayerCost] = {}

  def interceptor(next_fun, call_args, call_kwargs, context):
    out = next_fun(*call_args, **call_kwargs)
    mdl = context.module
    if context.method_name == '__call__' and isinstance(mdl, QUANT_LAYERS):
      x = call_args[0]
      path = layer_path(mdl)
      q = mdl.quant.resolve(path, mdl.edge)
      per_example_out = math.prod(out.shape[1:])
      records.setdefault(path, LayerCost(
          path=path, kind=type(mdl).__name__,
          macs=per_example_out * mdl.fan_in(x.shape[-1]),
          num_weights=mdl.num_weights(x.shape[-1]),
          in_shape=tuple(x.shape[1:]), out_shape=tuple(out.shape[1:]),
          w_bits=q.w_bits, a_bits=q.a_bits, searchable=q.searchable))
    return out

  with nn.intercept_methods(interceptor):
    jax.eval_shape(lambda *a: model.init(jax.random.key(0), *a, **kwargs), *args)
  if not records:
    raise ValueError(f'{type(model).__name__} has no quantized layers '
                     '(QuantConv/QuantDense); nothing to count.')
  return tuple(records.values())


def layer_params(params: Mapping[str, Any], path: str) -> Mapping[str, Any]:
  node = params
  for key in path.split('/'):
    node = node[key]
  return node


def expected_bits(params: Mapping[str, Any], cost: LayerCost) -> tuple[jax.Array, jax.Array]:
  """(E[b_w], E[b_a]) of one layer under the softmax of its logits."""

  def one(bits, logits_name):
    if bits is None:
      return jnp.asarray(float(FULL_PRECISION_BITS))
    if len(bits) == 1:
      return jnp.asarray(float(bits[0]))
    logits = layer_params(params, cost.path)[logits_name]
    return jnp.dot(jax.nn.softmax(logits), jnp.asarray(bits, jnp.float32))

  return one(cost.w_bits, 'w_logits'), one(cost.a_bits, 'a_logits')


def argmax_bits(params: Mapping[str, Any], cost: LayerCost) -> tuple[int | None, int | None]:
  """The bits a searched layer would take (argmax of its logits)."""

  def one(bits, logits_name):
    if bits is None:
      return None
    if len(bits) == 1:
      return bits[0]
    logits = layer_params(params, cost.path)[logits_name]
    return bits[int(jnp.argmax(logits))]

  return one(cost.w_bits, 'w_logits'), one(cost.a_bits, 'a_logits')


def total_bops(params: Mapping[str, Any], costs: Sequence[LayerCost]) -> jax.Array:
  """Expected BOPs per example, summed over layers (differentiable)."""
  total = jnp.asarray(0.0)
  for c in costs:
    bw, ba = expected_bits(params, c)
    total = total + c.macs * bw * ba
  return total


def mean_expected_bits(params: Mapping[str, Any], costs: Sequence[LayerCost]
                       ) -> tuple[jax.Array, jax.Array]:
  """(mean E[b_w], mean E[b_a]) over the searchable layers (for progress logs)."""
  searched = [expected_bits(params, c) for c in costs if c.searchable]
  if not searched:
    raise ValueError('no searchable layers: the model is not a supernet.')
  return (sum(w for w, _ in searched) / len(searched),
          sum(a for _, a in searched) / len(searched))


def reference_bops(costs: Sequence[LayerCost], bits: int = REFERENCE_BITS) -> float:
  """BOPs of the same layers, all at ``bits``/``bits`` (the normalizer)."""
  return float(sum(c.macs for c in costs)) * bits * bits


def complexity_loss(params: Mapping[str, Any], costs: Sequence[LayerCost]) -> jax.Array:
  """L_comp = expected BOPs / BOPs at uniform 8/8 bits.

  The normalization makes lambda independent of the model and input size:
  L_comp is 1 for an all-8-bit network, 0.0625 for all-2-bit.
  """
  return total_bops(params, costs) / reference_bops(costs)


def layer_bops(cost: LayerCost, w: int | None, a: int | None) -> float:
  """BOPs per example of one layer at ``w``/``a`` bits (None: full precision)."""
  return float(cost.macs * (w or FULL_PRECISION_BITS) * (a or FULL_PRECISION_BITS))


def own_bits(cost: LayerCost) -> tuple[int | None, int | None]:
  """A layer's bits without a policy: its fixed bits (or largest candidate), None for FP."""
  return (cost.w_bits[-1] if cost.w_bits else None, cost.a_bits[-1] if cost.a_bits else None)


def policy_layer_bits(policy: Policy, cost: LayerCost) -> tuple[int | None, int | None]:
  """A layer's bits under ``policy``; a layer not in it (edge, fixed) keeps its own."""
  if cost.path in policy:
    return policy[cost.path].w, policy[cost.path].a
  if cost.searchable:
    raise ValueError(f'searchable layer {cost.path!r} is not in the policy.')
  return own_bits(cost)


def policy_bops(policy: Policy, costs: Sequence[LayerCost]) -> float:
  """BOPs per example of ``costs``' model quantized with ``policy``.

  Layers not in the policy (the 8-bit first/last layer, or a fixed layer) keep
  their own bits; this is how a policy searched at one resolution is costed
  at another.
  """
  return sum(layer_bops(c, *policy_layer_bits(policy, c)) for c in costs)


def searchable_layers(costs: Sequence[LayerCost]
                      ) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
  """{path: (weight candidates, activation candidates)} of searched layers."""
  return {c.path: (c.w_bits, c.a_bits) for c in costs if c.searchable}


@dataclasses.dataclass(frozen=True)
class LayerReport:
  path: str
  macs: int
  num_weights: int
  expected_w: float
  expected_a: float
  w: int | None
  a: int | None
  bops_expected: float
  bops_argmax: float


def layer_report(params: Mapping[str, Any] | None, costs: Sequence[LayerCost],
                 policy: Policy | None = None) -> list[LayerReport]:
  """Per-layer MACs, weights, expected bits, chosen bits and BOPs.

  Args:
    params: model parameters; needed when the model has supernet layers.
    costs: from :func:`collect_layer_costs`.
    policy: the chosen bits of the searched layers (``w``, ``a`` and
      ``bops_argmax`` then describe it); default the argmax of the logits.
  """
  if params is None and any(c.searchable for c in costs):
    raise ValueError('a supernet report needs the parameters (architecture logits).')
  params = params or {}
  rows = []
  for c in costs:
    ew, ea = (float(v) for v in expected_bits(params, c))
    if policy is not None and c.path in policy:
      w, a = policy[c.path].w, policy[c.path].a
    else:
      w, a = argmax_bits(params, c)
    rows.append(LayerReport(c.path, c.macs, c.num_weights, ew, ea, w, a,
                            c.macs * ew * ea, layer_bops(c, w, a)))
  return rows


def argmax_policy(params: Mapping[str, Any], costs: Sequence[LayerCost]) -> Policy:
  """The searched policy: the argmax bits of every searchable layer."""
  searched = [c for c in costs if c.searchable]
  if not searched:
    raise ValueError('the model has no searchable layers; build it with '
                     "QuantSpec(mode='supernet').")
  return Policy.from_dict({c.path: argmax_bits(params, c) for c in searched})


def format_report(rows: Sequence[LayerReport]) -> str:
  """A fixed-width table of :func:`layer_report` rows with totals (GBOPs)."""
  fmt_bits = lambda b: 'fp' if b is None else str(b)
  width = max(len('layer'), *(len(r.path) for r in rows))
  lines = [f'{"layer":<{width}} {"MMACs":>9} {"weights":>10} {"E[bw]":>6} {"E[ba]":>6} '
           f'{"w":>3} {"a":>3} {"MBOPs(E)":>10} {"MBOPs":>10}']
  for r in rows:
    lines.append(f'{r.path:<{width}} {r.macs / 1e6:9.3f} {r.num_weights:10d} {r.expected_w:6.2f} '
                 f'{r.expected_a:6.2f} {fmt_bits(r.w):>3} {fmt_bits(r.a):>3} '
                 f'{r.bops_expected / 1e6:10.2f} {r.bops_argmax / 1e6:10.2f}')
  macs = sum(r.macs for r in rows)
  lines.append(f'{"total":<{width}} {macs / 1e6:9.3f} {sum(r.num_weights for r in rows):10d} '
               f'{"":>6} {"":>6} {"":>3} {"":>3} '
               f'{sum(r.bops_expected for r in rows) / 1e9:9.3f}G '
               f'{sum(r.bops_argmax for r in rows) / 1e9:9.3f}G')
  return '\n'.join(lines)


def format_model_summary(costs: Sequence[LayerCost], policy: Policy | None = None) -> str:
  """A fixed-width table of every quantized layer: shapes, MACs, weights, BOPs.

  BOPs are given at 8/8 bits and, with a ``policy``, at its bits (edge and
  fixed layers keep their own bits); totals close the table.
  """
  bits = lambda b: 'fp' if b is None else str(b)
  width = max(len('layer'), *(len(c.path) for c in costs))
  shape = lambda s: 'x'.join(map(str, s))
  lines = [f'{"layer":<{width}} {"kind":<11} {"input":>14} {"output":>14} {"MMACs":>9} '
           f'{"weights":>10} {"MBOPs@8/8":>10}' + (f' {"w":>3} {"a":>3} {"MBOPs":>10}'
                                                    if policy is not None else '')]
  total_policy = 0.0
  for c in costs:
    line = (f'{c.path:<{width}} {c.kind:<11} {shape(c.in_shape):>14} {shape(c.out_shape):>14} '
            f'{c.macs / 1e6:9.3f} {c.num_weights:10d} {c.macs * 64 / 1e6:10.2f}')
    if policy is not None:
      w, a = policy_layer_bits(policy, c)
      b = layer_bops(c, w, a)
      total_policy += b
      line += f' {bits(w):>3} {bits(a):>3} {b / 1e6:10.2f}'
    lines.append(line)
  macs = sum(c.macs for c in costs)
  total = (f'{"total":<{width}} {"":<11} {"":>14} {"":>14} {macs / 1e6:9.3f} '
           f'{sum(c.num_weights for c in costs):10d} {macs * 64 / 1e9:9.3f}G')
  if policy is not None:
    total += f' {"":>3} {"":>3} {total_policy / 1e9:9.3f}G'
  lines.append(total)
  return '\n'.join(lines)
