"""quant.layers.stored_once: the convolution inputs are stored, and nothing else changes.

XLA:CPU fused the BatchNorm/ReLU/residual chain (or the quantizer) into the
transposes that feed each weight gradient; ``stored_once`` makes those
transposes read a stored array. The tests compile a small ResNet's gradient
with and without it (monkeypatched to the identity), with XLA's own
convolutions (the oneDNN ones, custom calls, store their inputs anyway).
"""

import re

import jax
import numpy as np
import pytest

from asga_jax import onednn, quant
from asga_jax.quant import layers
from tests.cpu_flags_script import compiled_value_and_grad

BATCH = 12  # no channel or spatial size of the model, so batch-minor shapes are recognizable
SPECS = {'fp': quant.QuantSpec(),
         'supernet': quant.QuantSpec(mode='supernet', w_bits=(2, 4), a_bits=(2, 4))}
# Ops of a fusion that only moves data.
DATA_MOVEMENT = {'parameter', 'transpose', 'copy', 'bitcast', 'reshape'}


@pytest.fixture(autouse=True)
def _xla_convolutions(monkeypatch):
  monkeypatch.setenv(onednn.conv.OPT_OUT, '0')


def _without_stored_once(monkeypatch) -> None:
  monkeypatch.setattr(layers, 'stored_once', lambda x: x)


def _batch_minor_transposes(hlo: str) -> list[set[str]]:
  """The op kinds of each fusion that transposes an activation to batch-minor order."""
  found = []
  for body in re.findall(r'\n%fused_computation[^\n]*\{\n(.*?)\n\}', hlo, re.S):
    root = next(line for line in body.split('\n') if line.lstrip().startswith('ROOT'))
    if ' transpose(' in body and re.search(rf'= f32\[\d+,\d+,\d+,{BATCH}\]', root):
      found.append(set(re.findall(r'= \S+ ([a-z-]+)\(', body)))
  return found


def test_weight_gradient_transposes_only_move_data(monkeypatch):
  stored = _batch_minor_transposes(compiled_value_and_grad(SPECS['fp'], BATCH)[0].as_text())
  # One per distinct convolution input: the image, each block's input and middle (a
  # strided block's first convolution and shortcut share theirs): 7 in ResNet-8.
  assert len(stored) == 7
  for ops in stored:
    assert ops <= DATA_MOVEMENT, ops - DATA_MOVEMENT
  # Without it, some transposes recompute the forward chain (the test can fail).
  _without_stored_once(monkeypatch)
  hlo = compiled_value_and_grad(SPECS['fp'], BATCH)[0].as_text()
  recomputing = [ops - DATA_MOVEMENT for ops in _batch_minor_transposes(hlo)
                 if not ops <= DATA_MOVEMENT]
  assert recomputing and all({'maximum', 'add'} & ops for ops in recomputing)


@pytest.mark.parametrize('name', sorted(SPECS))
def test_loss_and_gradients_are_unchanged(name, monkeypatch):
  step, params = compiled_value_and_grad(SPECS[name], BATCH)
  loss, grads = step(params)
  _without_stored_once(monkeypatch)
  step, params = compiled_value_and_grad(SPECS[name], BATCH)
  ref_loss, ref_grads = step(params)
  # x / 1 is exact; what remains is XLA fusing the same expressions differently
  # (tolerances as in test_cpu_flags.py: round-off, and in a quantized network
  # the few rounding flips it causes).
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  a, b = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)]) for g in (grads, ref_grads))
  tolerance = 1e-5 if name == 'fp' else 5e-3
  assert np.linalg.norm(a - b) <= tolerance * np.linalg.norm(b)
