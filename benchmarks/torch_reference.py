"""PyTorch reference steps for the CPU comparison: the same ResNet and step kinds.

An optional extra (``pip install torch==2.13.0``, the CPU build); without torch
:func:`available` is False and the benchmark skips this part. The network is
the CIFAR ResNet of ``asga_jax.models.resnet_cifar`` layer for layer (3x3 stem,
three stages of basic blocks, 1x1-projection shortcuts with BatchNorm, global
average pooling, linear head), so both frameworks time the same arithmetic;
:func:`time_steps` checks that the parameter counts agree, clipping levels and
bit logits included. Steps run eagerly (PyTorch's default) in NHWC memory
layout, the faster one for oneDNN here.

The quantized networks mirror ``asga_jax.quant``: SAQ's clipping quantizer
(standardized signed weights, unsigned activations after ReLU, a signed image
input), straight-through rounding written as ``u + (round(u) - u).detach()``
as in the papers' PyTorch code, 8-bit first and last layers, and the
EdMIPS supernet that mixes the quantized weights and inputs over the bit
candidates and runs one convolution. The step kinds are those of
:mod:`benchmarks.step_time`: SGD and SAM (full precision), SGD on a fixed
4/4-bit network (QAT), and on the supernet SGD and ASGA with the complexity
loss (lambda 0.1).
"""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

EDGE_BITS = 8
QAT_BITS = 4
COMPLEXITY_WEIGHT = 0.1


def available() -> bool:
  """Whether torch can be imported."""
  return importlib.util.find_spec('torch') is not None


def _ste_round(unit, bits: int):
  import torch
  levels = float(2**bits - 1)
  return unit + (torch.round(unit * levels) / levels - unit).detach()


def _clip_quantize(x, alpha, bits: Sequence[int], probs, signed: bool):
  """alpha * M(u), M the (mixed) STE rounding of u = clip(x / alpha) in [0, 1]."""
  import torch
  t = x / alpha
  unit = (torch.clamp(t, -1.0, 1.0) + 1.0) * 0.5 if signed else torch.clamp(t, 0.0, 1.0)
  if probs is None:
    mixed = _ste_round(unit, bits[0])
  else:
    mixed = sum(p * _ste_round(unit, b) for p, b in zip(probs, bits))
  return alpha * (2.0 * mixed - 1.0) if signed else alpha * mixed


def _quant_layer(base: type) -> type:
  """``base`` (Conv2d or Linear) with quantized weights and input, as QuantConv/QuantDense."""
  import torch
  from torch import nn

  class Quantized(base):

    def __init__(self, *args, w_bits: Sequence[int] | None = None,
                 a_bits: Sequence[int] | None = None, signed_input: bool = False, **kwargs):
      super().__init__(*args, **kwargs)
      self.w_bits, self.a_bits, self.signed_input = w_bits, a_bits, signed_input
      self.macs = 0  # per example, set by a dry forward pass
      if w_bits:
        self.w_clip = nn.Parameter(torch.tensor(3.0))
        self.a_clip = nn.Parameter(torch.tensor(4.0))
      if w_bits and len(w_bits) > 1:
        self.w_logits = nn.Parameter(torch.zeros(len(w_bits)))
        self.a_logits = nn.Parameter(torch.zeros(len(a_bits)))

    def expected_bits(self):
      if len(self.w_bits) == 1:
        return float(self.w_bits[0]), float(self.a_bits[0])
      return tuple(torch.softmax(logits, 0) @ torch.tensor(bits, dtype=torch.float32)
                   for logits, bits in ((self.w_logits, self.w_bits),
                                        (self.a_logits, self.a_bits)))

    def forward(self, x):
      if not self.w_bits:
        y = super().forward(x)
      else:
        mixed = len(self.w_bits) > 1
        w = self.weight
        mean, scale = w.detach().mean(), w.detach().std(correction=0) + 1e-8
        w = _clip_quantize((w - mean) / scale, self.w_clip.abs(), self.w_bits,
                           torch.softmax(self.w_logits, 0) if mixed else None, True)
        x = _clip_quantize(x, self.a_clip.abs(), self.a_bits,
                           torch.softmax(self.a_logits, 0) if mixed else None,
                           self.signed_input)
        y = self._conv_forward(x, w * scale + mean, self.bias) if base is nn.Conv2d else \
            nn.functional.linear(x, w * scale + mean, self.bias)
      if not self.macs:
        self.macs = y[0].numel() * self.weight[0].numel()
      return y

  return Quantized


def _resnet_cifar(depth: int, width: int, num_classes: int,
                  bits: Sequence[int] | None = None) -> Any:
  """The CIFAR ResNet; ``bits``: None (full precision), one width (fixed) or candidates."""
  import torch
  from torch import nn
  conv_cls, linear_cls = _quant_layer(nn.Conv2d), _quant_layer(nn.Linear)
  inner = {} if bits is None else {'w_bits': tuple(bits), 'a_bits': tuple(bits)}
  edge = {} if bits is None else {'w_bits': (EDGE_BITS,), 'a_bits': (EDGE_BITS,)}

  class Block(nn.Module):

    def __init__(self, cin: int, cout: int, stride: int):
      super().__init__()
      self.conv1 = conv_cls(cin, cout, 3, stride, 1, bias=False, **inner)
      self.bn1 = nn.BatchNorm2d(cout)
      self.conv2 = conv_cls(cout, cout, 3, 1, 1, bias=False, **inner)
      self.bn2 = nn.BatchNorm2d(cout)
      self.shortcut = nn.Identity()
      if stride != 1 or cin != cout:
        self.shortcut = nn.Sequential(conv_cls(cin, cout, 1, stride, bias=False, **inner),
                                      nn.BatchNorm2d(cout))

    def forward(self, x):
      y = torch.relu(self.bn1(self.conv1(x)))
      return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))

  n = (depth - 2) // 6
  widths = (width, 2 * width, 4 * width)
  layers = [conv_cls(3, width, 3, 1, 1, bias=False, signed_input=True, **edge),
            nn.BatchNorm2d(width), nn.ReLU()]
  cin = width
  for i, w in enumerate(widths):
    for j in range(n):
      layers.append(Block(cin, w, 2 if i > 0 and j == 0 else 1))
      cin = w
  layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), linear_cls(cin, num_classes, **edge)]
  return nn.Sequential(*layers)


def _complexity_loss(layers: list[Any]):
  """Expected BOPs over BOPs at 8/8 bits (``asga_jax.quant.complexity_loss``)."""
  total = sum(layer.macs * math.prod(layer.expected_bits()) for layer in layers)
  return total / (sum(layer.macs for layer in layers) * 64.0)


def _sgd_step(model, optimizer, loss_fn, images, labels, penalty=None) -> None:
  optimizer.zero_grad(set_to_none=True)
  loss = loss_fn(model(images), labels)
  if penalty is not None:
    loss = loss + COMPLEXITY_WEIGHT * penalty()
  loss.backward()
  optimizer.step()


def _layers(model) -> list[Any]:
  """The conv and linear layers (all quantized in the QAT and supernet networks)."""
  from torch import nn
  return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _weights(model) -> list[Any]:
  """The perturbed leaves: conv and linear weights and biases (the 'weights' label)."""
  return [p for m in _layers(model) for p in (m.weight, m.bias) if p is not None]


def _two_pass_step(model, optimizer, loss_fn, images, labels, scale: Callable[[Any], Any],
                   epsilon: float | None, penalty=None) -> Any:
  """One sharpness step; returns h = L(t_adv) - L(t).

  The first pass gives g (with lambda grad L_comp when ``penalty`` is set); the
  weights move by ``scale(||g_w||) * g_w``; the second pass's gradient replaces
  g (SAM, ``epsilon=None``) or is added to it times ``epsilon`` (ASGA).
  """
  import torch
  optimizer.zero_grad(set_to_none=True)
  loss = loss_fn(model(images), labels)
  total = loss if penalty is None else loss + COMPLEXITY_WEIGHT * penalty()
  total.backward()
  params = [p for p in model.parameters() if p.grad is not None]
  first = [p.grad for p in params]
  weights = [p for p in _weights(model) if p.grad is not None]
  with torch.no_grad():
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad)
                                                 for p in weights]))
    factor = scale(norm)
    shifts = [p.grad * factor for p in weights]
    for p, e in zip(weights, shifts):
      p.add_(e)
  optimizer.zero_grad(set_to_none=True)
  adv_loss = loss_fn(model(images), labels)
  adv_loss.backward()
  with torch.no_grad():
    for p, e in zip(weights, shifts):
      p.sub_(e)
    if epsilon is not None:
      for p, g in zip(params, first):
        p.grad = g + epsilon * p.grad if p.grad is not None else g
  optimizer.step()
  return (adv_loss - loss).detach()


def _sam_step(model, optimizer, loss_fn, images, labels, rho: float) -> None:
  """SAM (Foret et al.): ascend to w + rho g/||g||, take the gradient there, step from w."""
  _two_pass_step(model, optimizer, loss_fn, images, labels,
                 lambda norm: rho / (norm + 1e-12), None)


class _ASGA:
  """ASGA's step with its adaptive radius (``asga_jax.optim.asga`` defaults)."""

  def __init__(self, rho0: float = 0.1, rho_max: float = 0.5, mu: float = 0.01,
               epsilon: float = 0.1):
    self.rho, self.rho0, self.rho_max, self.mu, self.epsilon = rho0, rho0, rho_max, mu, epsilon
    self.phi = None

  def step(self, model, optimizer, loss_fn, images, labels, penalty) -> None:
    h = float(_two_pass_step(model, optimizer, loss_fn, images, labels,
                             lambda norm: self.rho / (norm + 1e-12) - self.mu, self.epsilon,
                             penalty))
    if math.isfinite(h) and h > 0:
      self.phi = self.phi or self.rho0 * math.log1p(h)
      self.rho = min(self.rho_max, self.phi / math.log1p(h))
    elif math.isfinite(h):
      self.rho = self.rho_max


def _kinds(groups: Sequence[str], depth: int, width: int, num_classes: int, x, y,
           bits: Sequence[int], rho: float) -> dict[str, tuple[str, Any, Callable[[], None]]]:
  """name -> (group, model, step) of the PyTorch step kinds that mirror ``groups``."""
  import torch
  loss_fn = torch.nn.CrossEntropyLoss()

  def build(layer_bits):
    torch.manual_seed(0)
    model = _resnet_cifar(depth, width, num_classes, layer_bits).to(
        memory_format=torch.channels_last)
    model.train()
    with torch.no_grad():
      model(x[:1])  # records each layer's MACs
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

  kinds = {}
  if 'fp' in groups:
    model, opt = build(None)
    kinds['torch_sgd'] = 'fp', model, lambda: _sgd_step(model, opt, loss_fn, x, y)
    kinds['torch_sam'] = 'fp', model, lambda: _sam_step(model, opt, loss_fn, x, y, rho)
  if 'qat' in groups:
    qat, qat_opt = build((QAT_BITS,))
    kinds['torch_qat_sgd'] = 'qat', qat, lambda: _sgd_step(qat, qat_opt, loss_fn, x, y)
  if 'supernet' in groups:
    net, net_opt = build(bits)
    asga = _ASGA()
    layers = _layers(net)
    penalty = lambda: _complexity_loss(layers)
    kinds['torch_supernet_sgd'] = ('supernet', net,
                                   lambda: _sgd_step(net, net_opt, loss_fn, x, y, penalty))
    kinds['torch_asga'] = ('supernet', net,
                           lambda: asga.step(net, net_opt, loss_fn, x, y, penalty))
  return kinds


def time_steps(images: np.ndarray, labels: np.ndarray, *, depth: int, width: int,
               num_classes: int, num_params: dict[str, int], groups: Sequence[str],
               bits: Sequence[int], warmup: int, steps: int,
               rho: float = 0.1) -> dict[str, dict[str, Any]]:
  """Median times of the PyTorch step kinds of ``groups`` on one batch.

  Args:
    images: NHWC float32 batch; labels: int labels.
    depth, width, num_classes: the CIFAR ResNet (as ``models.resnet_cifar``).
    num_params: the JAX models' parameter counts per group ('fp', 'qat',
      'supernet'), checked against PyTorch's.
    groups: some of 'fp' (SGD, SAM), 'qat' (SGD at 4/4 bits), 'supernet'
      (SGD, ASGA).
    bits: the supernet's candidate bit widths.
    warmup, steps: untimed and timed steps per kind.
    rho: SAM radius.

  Returns:
    {'torch_sgd': {...}, ...} with median/min/max ms, the thread count and the
    torch version.

  Raises:
    RuntimeError: a PyTorch network's parameter count differs from the JAX one.
  """
  import torch
  x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).contiguous(
      memory_format=torch.channels_last)
  y = torch.from_numpy(labels.astype(np.int64))
  results = {}
  for name, (group, model, step) in _kinds(groups, depth, width, num_classes, x, y, bits,
                                           rho).items():
    count = sum(p.numel() for p in model.parameters())
    expected = num_params[group]
    if count != expected:
      raise RuntimeError(f'{name}: the PyTorch ResNet-{depth} has {count} parameters, the JAX '
                         f'one {expected}: the reference no longer matches the model.')
    for _ in range(warmup):
      step()
    times = []
    for _ in range(steps):
      t0 = time.perf_counter()
      step()
      times.append(time.perf_counter() - t0)
    results[name] = {'median_ms': 1e3 * statistics.median(times), 'min_ms': 1e3 * min(times),
                     'max_ms': 1e3 * max(times), 'steps': steps,
                     'threads': torch.get_num_threads(), 'torch': torch.__version__}
  return results


def time_steps_apart(images: np.ndarray, labels: np.ndarray,
                     **kwargs: Any) -> dict[str, dict[str, Any]]:
  """:func:`time_steps` in a Python process of its own, as PyTorch's users run it.

  In the benchmark's process the OpenMP teams that asga_jax.onednn's
  convolutions leave idle count against the libgomp that PyTorch shares with
  them (one soname, loaded once). libgomp then throttles the spin-waiting of
  PyTorch's own team: its steps measured 15-20% slower there than alone.

  Raises:
    RuntimeError: the process failed (its error's last lines are in the message).
  """
  with tempfile.TemporaryDirectory() as directory:
    folder = pathlib.Path(directory)
    np.savez(folder / 'batch.npz', images=images, labels=labels)
    (folder / 'kwargs.json').write_text(json.dumps(kwargs))
    process = subprocess.run([sys.executable, '-m', 'benchmarks.torch_reference', directory],
                             cwd=pathlib.Path(__file__).resolve().parents[1],
                             capture_output=True, text=True, check=False)
    if process.returncode:
      raise RuntimeError(f'the PyTorch reference failed:\n{process.stderr[-3000:]}')
    return json.loads((folder / 'results.json').read_text())


def _main(directory: str) -> None:
  folder = pathlib.Path(directory)
  with np.load(folder / 'batch.npz') as batch:
    images, labels = batch['images'], batch['labels']
  kwargs = json.loads((folder / 'kwargs.json').read_text())
  results = time_steps(images, labels, **kwargs)
  (folder / 'results.json').write_text(json.dumps(results))


if __name__ == '__main__':
  _main(sys.argv[1])
