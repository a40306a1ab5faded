"""Bit-width policies: per-layer (weight, activation) bits keyed by module path.

A policy is what a search produces and what a fixed-policy (QAT) model
consumes. Layers are named by their Flax module path joined with '/', e.g.
``"stage1/block0/conv1"``, so a policy searched on one model applies to any
model with the same layer names (a CIFAR and an ImageNet ResNet-18 share them).

JSON format (``save_policy`` / ``load_policy``)::

  {
    "format": "asga_jax.policy/v1",
    "layers": {"stage1/block0/conv1": {"w": 4, "a": 3}, ...},
    "meta": {...}            # free-form: model, data set, BOPs, ...
  }
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

from asga_jax.files import write_json

POLICY_FORMAT = 'asga_jax.policy/v1'


class PolicyError(ValueError):
  """A policy is malformed or does not fit the model it is applied to."""


@dataclasses.dataclass(frozen=True)
class LayerBits:
  """Bit widths of one layer; None means full precision."""
  w: int | None
  a: int | None


def _check_bits(value: Any, where: str) -> int:
  if isinstance(value, bool) or not isinstance(value, int):
    raise PolicyError(f'{where}: bits must be an integer, got {value!r}.')
  if not 1 <= value <= 32:
    raise PolicyError(f'{where}: bits must be in 1..32, got {value}.')
  return value


@dataclasses.dataclass(frozen=True)
class Policy:
  """An immutable, hashable mapping from layer path to :class:`LayerBits`.

  Hashable so that it can be a Flax module attribute. Build one with
  ``Policy.from_dict({"stage1/block0/conv1": (4, 3), ...})``.
  """
  layers: tuple[tuple[str, LayerBits], ...]

  @classmethod
  def from_dict(cls, layers: Mapping[str, Any]) -> Policy:
    """Builds a policy from {path: LayerBits | (w, a) | {"w": w, "a": a}}."""
    items = []
    for path, bits in layers.items():
      if isinstance(bits, LayerBits):
        w, a = bits.w, bits.a
      elif isinstance(bits, Mapping):
        missing = {'w', 'a'} - set(bits)
        if missing:
          raise PolicyError(
              f'layer {path!r}: missing key(s) {sorted(missing)}; each layer '
              'needs {"w": <bits>, "a": <bits>}.')
        w, a = bits['w'], bits['a']
      elif isinstance(bits, (tuple, list)) and len(bits) == 2:
        w, a = bits
      else:
        raise PolicyError(
            f'layer {path!r}: expected {{"w": bits, "a": bits}}, got {bits!r}.')
      items.append((path, LayerBits(_check_bits(w, f'layer {path!r} "w"'),
                                    _check_bits(a, f'layer {path!r} "a"'))))
    return cls(tuple(sorted(items)))

  def as_dict(self) -> dict[str, LayerBits]:
    return dict(self.layers)

  def __getitem__(self, path: str) -> LayerBits:
    for name, bits in self.layers:
      if name == path:
        return bits
    raise KeyError(path)

  def __contains__(self, path: object) -> bool:
    return any(name == path for name, _ in self.layers)

  def __len__(self) -> int:
    return len(self.layers)

  def paths(self) -> tuple[str, ...]:
    return tuple(name for name, _ in self.layers)

  def to_json_dict(self, meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return {
        'format': POLICY_FORMAT,
        'layers': {p: {'w': b.w, 'a': b.a} for p, b in self.layers},
        'meta': dict(meta or {}),
    }

  @classmethod
  def from_json_dict(cls, data: Any, source: str = '<dict>') -> Policy:
    if not isinstance(data, Mapping) or 'layers' not in data:
      raise PolicyError(
          f'{source}: not a policy file: expected a JSON object with a '
          '"layers" mapping (written by `asga_jax` search as policy.json).')
    if data.get('format', POLICY_FORMAT) != POLICY_FORMAT:
      raise PolicyError(f'{source}: unsupported format {data["format"]!r}; '
                        f'this version reads {POLICY_FORMAT!r}.')
    if not isinstance(data['layers'], Mapping) or not data['layers']:
      raise PolicyError(f'{source}: "layers" must be a non-empty mapping.')
    try:
      return cls.from_dict(data['layers'])
    except PolicyError as e:
      raise PolicyError(f'{source}: {e}') from None


def save_policy(policy: Policy, path: str | os.PathLike[str],
                meta: Mapping[str, Any] | None = None) -> None:
  """Writes ``policy`` as JSON, atomically (temporary file, then rename)."""
  write_json(path, policy.to_json_dict(meta), sort_keys=True)


def load_policy(path: str | os.PathLike[str]) -> tuple[Policy, dict[str, Any]]:
  """Reads a policy JSON file; returns (policy, meta).

  Raises:
    PolicyError: missing file, invalid JSON or malformed content, with the
      file name and what is wrong.
  """
  path = os.fspath(path)
  try:
    with open(path) as f:
      data = json.load(f)
  except FileNotFoundError:
    raise PolicyError(f'policy file {path!r} does not exist; pass the '
                      'policy.json written by a search stage.') from None
  except json.JSONDecodeError as e:
    raise PolicyError(f'policy file {path!r} is not valid JSON: {e}') from None
  return Policy.from_json_dict(data, source=path), dict(data.get('meta', {}))


def validate_policy(policy: Policy, searchable: Mapping[str, tuple[tuple[int, ...],
                                                                  tuple[int, ...]]]
                    ) -> None:
  """Checks that ``policy`` covers exactly the searchable layers of a model.

  Args:
    policy: the policy to check.
    searchable: {layer path: (weight bit candidates, activation candidates)}
      for every layer whose bits a policy decides.

  Raises:
    PolicyError: listing unknown layers, missing layers and bits outside the
      candidates, all at once.
  """
  problems = []
  unknown = sorted(set(policy.paths()) - set(searchable))
  missing = sorted(set(searchable) - set(policy.paths()))
  if unknown:
    problems.append(f'unknown layers (not in the model): {unknown}')
  if missing:
    problems.append(f'missing layers (the model has them): {missing}')
  for path, bits in policy.layers:
    if path not in searchable:
      continue
    w_cands, a_cands = searchable[path]
    if bits.w not in w_cands:
      problems.append(f'{path}: weight bits {bits.w} not in candidates {list(w_cands)}')
    if bits.a not in a_cands:
      problems.append(f'{path}: activation bits {bits.a} not in candidates {list(a_cands)}')
  if problems:
    raise PolicyError('policy does not fit the model:\n  ' + '\n  '.join(problems)
                      + '\nSearch a policy for this model, or set the bit '
                      'candidates to the ones the policy was searched with.')


def uniform_policy(paths: Iterable[str], w: int, a: int) -> Policy:
  """The policy that gives every layer in ``paths`` the same bits."""
  return Policy.from_dict({p: (w, a) for p in paths})
