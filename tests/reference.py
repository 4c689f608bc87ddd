"""Independent NumPy float64 references of the released algorithms, from the maths.

Written from DEVELOPERS.md / the authors' update rule, not from the package.
"""

from __future__ import annotations

import numpy as np


class DualOptimPlusRef:
  """DualOptim+ (Adam form, released code), AdamW-style decay, per-objective lr."""

  def __init__(
    self, params, *, lr, b1, b2, bb1, bb2, eps, wd, num_objectives, lr_scales=None, wd_mask=None
  ):
    self.lr, self.b1, self.b2, self.bb1, self.bb2 = lr, b1, b2, bb1, bb2
    self.eps, self.wd, self.K = eps, wd, num_objectives
    self.scales = lr_scales or [1.0] * num_objectives
    self.mask = wd_mask or {k: True for k in params}
    z = lambda: {k: np.zeros_like(v, np.float64) for k, v in params.items()}
    self.mB, self.vB = z(), z()
    self.mD = [z() for _ in range(num_objectives)]
    self.vD = [z() for _ in range(num_objectives)]
    self.n = 0
    self.t = [0] * num_objectives

  def step(self, params, grads, k):
    self.n += 1
    self.t[k] += 1
    n, t = self.n, self.t[k]
    out = {}
    for name, p in params.items():
      g = np.asarray(grads[name], np.float64)
      p = np.asarray(p, np.float64)
      if n == 1:
        mBh = np.zeros_like(g)
        vBh = np.zeros_like(g)
      else:
        mBh = self.mB[name] / (1 - self.bb1 ** (n - 1))
        vBh = self.vB[name] / (1 - self.bb2 ** (n - 1))
      self.mD[k][name] = self.b1 * self.mD[k][name] + (1 - self.b1) * (g - mBh)
      self.vD[k][name] = self.b2 * self.vD[k][name] + (1 - self.b2) * (g * g - vBh)
      m = self.mD[k][name] / (1 - self.b1**t) + mBh
      v = self.vD[k][name] / (1 - self.b2**t) + vBh
      u = m / (np.sqrt(np.abs(v)) + self.eps)
      if self.mask[name]:
        u = u + self.wd * p
      out[name] = p - self.lr * self.scales[k] * u
      self.mB[name] = self.bb1 * self.mB[name] + (1 - self.bb1) * g
      self.vB[name] = self.bb2 * self.vB[name] + (1 - self.bb2) * g * g
    return out


class DualOptimRef:
  """DualOptim: one bias-corrected Adam state per objective, AdamW-style decay."""

  def __init__(self, params, *, lr, b1, b2, eps, wd, num_objectives, lr_scales=None, wd_mask=None):
    self.lr, self.b1, self.b2, self.eps, self.wd = lr, b1, b2, eps, wd
    self.scales = lr_scales or [1.0] * num_objectives
    self.mask = wd_mask or {k: True for k in params}
    z = lambda: {k: np.zeros_like(v, np.float64) for k, v in params.items()}
    self.m = [z() for _ in range(num_objectives)]
    self.v = [z() for _ in range(num_objectives)]
    self.t = [0] * num_objectives

  def step(self, params, grads, k):
    self.t[k] += 1
    t = self.t[k]
    out = {}
    for name, p in params.items():
      g = np.asarray(grads[name], np.float64)
      p = np.asarray(p, np.float64)
      self.m[k][name] = self.b1 * self.m[k][name] + (1 - self.b1) * g
      self.v[k][name] = self.b2 * self.v[k][name] + (1 - self.b2) * g * g
      mh = self.m[k][name] / (1 - self.b1**t)
      vh = self.v[k][name] / (1 - self.b2**t)
      u = mh / (np.sqrt(vh) + self.eps)
      if self.mask[name]:
        u = u + self.wd * p
      out[name] = p - self.lr * self.scales[k] * u
    return out


def theorem1_fixed_point(s_f, s_r, *, beta, base_beta, forget_steps, retain_steps):
  """Periodic fixed point of one moment under constant statistics s_f, s_r.

  Schedule: F_f steps of objective 0, then F_r of objective 1, repeated; bias
  corrections -> 1. Returns (B0, C0, D_f, D_r): the base at the start of the
  forget phase, the base at the start of the retain phase, and the two deltas
  at their fixed points (they only change during their own phase). See
  docs/theory.md for the derivation.
  """
  a, b = base_beta, beta
  ff, fr = forget_steps, retain_steps
  b0 = (a**fr * (1 - a**ff) * s_f + (1 - a**fr) * s_r) / (1 - a ** (ff + fr))
  c0 = a**ff * b0 + (1 - a**ff) * s_f

  def geometric(f):  # sum_{j<f} b^(f-1-j) a^j
    return f * b ** (f - 1) if np.isclose(a, b) else (b**f - a**f) / (b - a)

  d_f = (1 - b) * (s_f - b0) * geometric(ff) / (1 - b**ff)
  d_r = (1 - b) * (s_r - c0) * geometric(fr) / (1 - b**fr)
  return b0, c0, d_f, d_r
