"""Figures: per-layer bit allocation (the ASGA paper's Figure 5)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import matplotlib

matplotlib.use('Agg')  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from asga_jax.files import save_figure  # noqa: E402
from asga_jax.quant import LayerReport  # noqa: E402
from asga_jax.quant.quantizers import FULL_PRECISION_BITS  # noqa: E402


def plot_bit_allocation(rows: Sequence[LayerReport], path: str | os.PathLike[str], *,
                        title: str = 'Bit allocation') -> None:
  """Bars of weight and activation bits per layer, in network order.

  Args:
    rows: per-layer rows from :func:`asga_jax.quant.layer_report` (their
      argmax bits are plotted; full precision shows as 32).
    path: output file (PNG by extension).
    title: figure title; the total GBOPs is appended.
  """
  names = [r.path for r in rows]
  w = np.array([r.w or FULL_PRECISION_BITS for r in rows])
  a = np.array([r.a or FULL_PRECISION_BITS for r in rows])
  x = np.arange(len(rows))
  fig, ax = plt.subplots(figsize=(max(6.0, 0.42 * len(rows) + 2), 4.2), layout='constrained')
  ax.bar(x - 0.2, w, 0.4, label='weights', color='#1f77b4')
  ax.bar(x + 0.2, a, 0.4, label='activations', color='#ff7f0e')
  ax.set_xticks(x, names, rotation=75, ha='right', fontsize=8)
  ax.set_ylabel('bits')
  ax.set_xlabel('layer')
  top = max(int(w.max()), int(a.max()))
  ax.set_yticks(range(0, top + 1, 1 if top <= 8 else 4))
  ax.set_ylim(0, 1.3 * top + 1)  # headroom: the legend sits above the tallest bars
  ax.grid(axis='y', alpha=0.3)
  ax.legend(loc='upper center', ncols=2)
  gbops = sum(r.bops_argmax for r in rows) / 1e9
  ax.set_title(f'{title} ({gbops:.3f} GBOPs)')
  save_figure(fig, path, dpi=120)
  plt.close(fig)
