"""Plain-numpy references the tests compare the library against."""

import numpy as np


def quantize_unsigned(x, alpha, bits):
  n = 2**bits - 1
  return alpha * np.round(np.clip(x / alpha, 0.0, 1.0) * n) / n


def quantize_signed(x, alpha, bits):
  n = 2**bits - 1
  u = (np.clip(x / alpha, -1.0, 1.0) + 1.0) / 2.0
  return alpha * (2.0 * np.round(u * n) / n - 1.0)


def quantize_weight(w, alpha, bits):
  mean, std = w.mean(), w.std() + 1e-8
  return quantize_signed((w - mean) / std, alpha, bits) * std + mean


def softmax(z):
  e = np.exp(z - np.max(z))
  return e / e.sum()


def conv2d_nhwc(x, k, stride=1, pad=0, groups=1):
  """Direct convolution: x [N,H,W,C], k [kh,kw,C/groups,F]."""
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  n, h, w, c = x.shape
  kh, kw, cg, f = k.shape
  fg = f // groups
  ho, wo = (h - kh) // stride + 1, (w - kw) // stride + 1
  out = np.zeros((n, ho, wo, f))
  for i in range(ho):
    for j in range(wo):
      patch = x[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :]
      for g in range(groups):
        p = patch[..., g * cg:(g + 1) * cg].reshape(n, -1)
        out[:, i, j, g * fg:(g + 1) * fg] = p @ k[..., g * fg:(g + 1) * fg].reshape(-1, fg)
  return out


def difference_per_distance_moved(a, b, start):
  """||a - b|| / ||a - start||, each a list of arrays: how far apart two runs
  from ``start`` ended, per distance they moved."""
  flat = lambda arrays: np.concatenate([np.ravel(np.asarray(x)) for x in arrays])
  a, b, start = flat(a), flat(b), flat(start)
  return float(np.linalg.norm(a - b) / np.linalg.norm(a - start))
