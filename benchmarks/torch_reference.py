"""PyTorch reference steps for the CPU comparison: the same ResNet, SGD and SAM.

An optional extra (``pip install torch==2.13.0``, the CPU build); without torch
:func:`available` is False and the benchmark skips this part. The network is
the CIFAR ResNet of ``asga_jax.models.resnet_cifar`` layer for layer (3x3 stem,
three stages of basic blocks, 1x1-projection shortcuts with BatchNorm, global
average pooling, linear head), so both frameworks time the same arithmetic;
:func:`time_steps` checks that the parameter counts agree. Steps run eagerly
(PyTorch's default) in NHWC memory layout, the faster one for oneDNN here.
"""

from __future__ import annotations

import importlib.util
import statistics
import time
from typing import Any

import numpy as np


def available() -> bool:
  """Whether torch can be imported."""
  return importlib.util.find_spec('torch') is not None


def _resnet_cifar(depth: int, width: int, num_classes: int) -> Any:
  import torch
  from torch import nn

  class Block(nn.Module):

    def __init__(self, cin: int, cout: int, stride: int):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(cout)
      self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(cout)
      self.shortcut = nn.Identity()
      if stride != 1 or cin != cout:
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

    def forward(self, x):
      y = torch.relu(self.bn1(self.conv1(x)))
      return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))

  n = (depth - 2) // 6
  widths = (width, 2 * width, 4 * width)
  layers = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
  cin = width
  for i, w in enumerate(widths):
    for j in range(n):
      layers.append(Block(cin, w, 2 if i > 0 and j == 0 else 1))
      cin = w
  layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
  return nn.Sequential(*layers)


def _sgd_step(model, optimizer, loss_fn, images, labels) -> None:
  optimizer.zero_grad(set_to_none=True)
  loss_fn(model(images), labels).backward()
  optimizer.step()


def _sam_step(model, optimizer, loss_fn, images, labels, rho: float) -> None:
  """SAM (Foret et al.): ascend to w + rho g/||g||, take the gradient there, step from w."""
  import torch
  optimizer.zero_grad(set_to_none=True)
  loss_fn(model(images), labels).backward()
  params = [p for p in model.parameters() if p.grad is not None]
  with torch.no_grad():
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad)
                                                 for p in params]))
    shifts = [p.grad * (rho / (norm + 1e-12)) for p in params]
    for p, e in zip(params, shifts):
      p.add_(e)
  optimizer.zero_grad(set_to_none=True)
  loss_fn(model(images), labels).backward()
  with torch.no_grad():
    for p, e in zip(params, shifts):
      p.sub_(e)
  optimizer.step()


def time_steps(images: np.ndarray, labels: np.ndarray, *, depth: int, width: int,
               num_classes: int, num_params: int, warmup: int, steps: int,
               rho: float = 0.1) -> dict[str, dict[str, Any]]:
  """Median seconds of PyTorch SGD and SAM training steps on one batch.

  Args:
    images: NHWC float32 batch; labels: int labels.
    depth, width, num_classes: the CIFAR ResNet (as ``models.resnet_cifar``).
    num_params: the JAX model's parameter count, checked against PyTorch's.
    warmup, steps: untimed and timed steps per kind.
    rho: SAM radius.

  Returns:
    {'torch_sgd': {...}, 'torch_sam': {...}} with median/min/max ms, the
    thread count and the torch version.

  Raises:
    RuntimeError: the PyTorch network's parameter count differs from the JAX one.
  """
  import torch
  torch.manual_seed(0)
  model = _resnet_cifar(depth, width, num_classes).to(memory_format=torch.channels_last)
  count = sum(p.numel() for p in model.parameters())
  if count != num_params:
    raise RuntimeError(f'PyTorch ResNet-{depth} has {count} parameters, the JAX one '
                       f'{num_params}: the reference no longer matches the model.')
  model.train()
  x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).contiguous(
      memory_format=torch.channels_last)
  y = torch.from_numpy(labels.astype(np.int64))
  optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
  loss_fn = torch.nn.CrossEntropyLoss()
  kinds = {'torch_sgd': lambda: _sgd_step(model, optimizer, loss_fn, x, y),
           'torch_sam': lambda: _sam_step(model, optimizer, loss_fn, x, y, rho)}
  results = {}
  for name, step in kinds.items():
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
