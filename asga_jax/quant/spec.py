"""How a model is quantized: a hashable spec every quantized layer consults.

One :class:`QuantSpec` is passed down a model; each quantized layer resolves
its own bits from it with its module path (:meth:`QuantSpec.resolve`), so the
same model code builds the full-precision network, the mixed-precision
supernet and any fixed-policy network, with identical parameter names.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from asga_jax.quant.policy import LayerBits, Policy, PolicyError

Mode = Literal['float', 'supernet', 'fixed']
Quantizer = Literal['clip', 'lsq']
MODES = ('float', 'supernet', 'fixed')
QUANTIZERS = ('clip', 'lsq')


def _check_candidates(name: str, bits: tuple[int, ...]) -> None:
  if not bits:
    raise ValueError(f'{name}: at least one candidate bit width is needed.')
  if any(isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= 8 for b in bits):
    raise ValueError(f'{name}: candidate bit widths must be integers in 1..8, got {bits}.')
  if list(bits) != sorted(set(bits)):
    raise ValueError(f'{name}: candidates must be sorted and distinct, got {bits}; '
                     f'e.g. {tuple(sorted(set(bits)))}.')


@dataclasses.dataclass(frozen=True)
class Resolved:
  """The quantization of one layer, as resolved from a spec.

  ``w_bits``/``a_bits`` are the candidate tuples in supernet mode, a 1-tuple
  in fixed mode, and ``None`` for a full-precision operand.
  """
  w_bits: tuple[int, ...] | None
  a_bits: tuple[int, ...] | None
  searchable: bool


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """Quantization of a whole model.

  Attributes:
    mode: 'float' (no quantization), 'supernet' (EdMIPS-style mixture over
      candidate bit widths, with learnable logits) or 'fixed' (one bit width
      per layer, from ``policy`` or ``uniform``).
    w_bits: candidate weight bit widths (supernet mode, and the allowed values
      of a fixed policy).
    a_bits: candidate activation bit widths.
    policy: per-layer bits for fixed mode.
    uniform: bits of every non-edge layer in fixed mode when there is no policy.
    edge_bits: bits of the first and last layer (weights and activations) in
      supernet and fixed modes; None quantizes them like every other layer.
    quantizer: 'clip' (SAQ learnable clipping) or 'lsq' (learned step size).
    w_clip_init: initial weight clipping level, in standard deviations of the
      layer's weights.
    a_clip_init: initial activation clipping level.
  """
  mode: Mode = 'float'
  w_bits: tuple[int, ...] = (2, 3, 4, 6)
  a_bits: tuple[int, ...] = (2, 3, 4, 6)
  policy: Policy | None = None
  uniform: LayerBits | None = None
  edge_bits: int | None = 8
  quantizer: Quantizer = 'clip'
  w_clip_init: float = 3.0
  a_clip_init: float = 4.0

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f'unknown quantization mode {self.mode!r}; choose one of {MODES}.')
    if self.quantizer not in QUANTIZERS:
      raise ValueError(f'unknown quantizer {self.quantizer!r}; choose one of {QUANTIZERS}.')
    _check_candidates('w_bits', tuple(self.w_bits))
    _check_candidates('a_bits', tuple(self.a_bits))
    if self.edge_bits is not None and not 1 <= self.edge_bits <= 32:
      raise ValueError(f'edge_bits (first/last layer) must be in 1..32 or None, '
                       f'got {self.edge_bits}.')
    if self.mode == 'fixed' and (self.policy is None) == (self.uniform is None):
      raise ValueError("fixed mode needs exactly one of `policy` (per-layer bits) "
                       "or `uniform` (the same bits everywhere).")
    if self.w_clip_init <= 0 or self.a_clip_init <= 0:
      raise ValueError('clipping levels must be positive.')

  def resolve(self, path: str, edge: bool) -> Resolved:
    """Bits of the layer at ``path``; ``edge`` marks the first/last layer."""
    if self.mode == 'float':
      return Resolved(None, None, searchable=False)
    if edge and self.edge_bits is not None:
      b = None if self.edge_bits >= 32 else (self.edge_bits,)
      return Resolved(b, b, searchable=False)
    if self.mode == 'supernet':
      return Resolved(tuple(self.w_bits), tuple(self.a_bits), searchable=True)
    if self.policy is not None:
      if path not in self.policy:
        raise PolicyError(f'layer {path!r} is not in the policy; the policy has '
                          f'{len(self.policy)} layers, e.g. {self.policy.paths()[:3]}. '
                          'Use a policy searched for this model.')
      bits = self.policy[path]
    else:
      bits = self.uniform
    as_tuple = lambda b: None if b is None or b >= 32 else (b,)
    return Resolved(as_tuple(bits.w), as_tuple(bits.a), searchable=False)

  def with_policy(self, policy: Policy) -> QuantSpec:
    """The fixed-mode spec that quantizes with ``policy``."""
    return dataclasses.replace(self, mode='fixed', policy=policy, uniform=None)
