"""NumPy float64 references of the DualOptim+ instances, written from the maths.

``SharedBaseRef`` is the shared-base + decoupled-delta recurrence of
``dualoptim_jax.moments`` (module doc) for any list of statistics; each
instance below names its statistics and writes its update rule out in NumPy
(Lion: Chen et al. 2023; RMSprop: optax.scale_by_rms; Adafactor: Shazeer &
Stern 2018, Alg. 4, for matrices and vectors only).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np


class StatRef(NamedTuple):
  statistic: Callable[[np.ndarray], np.ndarray]
  decay: float
  base_decay: float
  bias_correction: bool


class SharedBaseRef:
  """DualOptim+ over ``stats`` and ``direction``, AdamW-style decay, per-objective lr.

  ``direction(current, previous, g, p) -> u`` per parameter, where
  ``current[i]`` / ``previous[i]`` are the combined estimates
  D_hat_{i,k} + B_hat_i after / before this step's delta EMA.
  """

  def __init__(
    self, params, *, stats, direction, lr, wd, num_objectives, lr_scales=None, wd_mask=None
  ):
    self.stats, self.direction = list(stats), direction
    self.lr, self.wd, self.K = lr, wd, num_objectives
    self.scales = lr_scales or [1.0] * num_objectives
    self.mask = wd_mask or {name: True for name in params}

    def zeros():
      return {
        name: [np.zeros_like(st.statistic(np.asarray(p, np.float64))) for st in self.stats]
        for name, p in params.items()
      }

    self.base = zeros()
    self.delta = [zeros() for _ in range(num_objectives)]
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
      current, previous = [], []
      for i, st in enumerate(self.stats):
        s = st.statistic(g)
        b, d = self.base[name][i], self.delta[k][name][i]
        a, beta = st.base_decay, st.decay
        if st.bias_correction:
          b_hat = np.zeros_like(b) if n == 1 else b / (1 - a ** (n - 1))
          prev_scale = 0.0 if t == 1 else 1 / (1 - beta ** (t - 1))
          cur_scale = 1 / (1 - beta**t)
        else:
          b_hat, prev_scale, cur_scale = b, 1.0, 1.0
        previous.append(d * prev_scale + b_hat)
        d = beta * d + (1 - beta) * (s - b_hat)
        current.append(d * cur_scale + b_hat)
        self.delta[k][name][i] = d
        self.base[name][i] = a * b + (1 - a) * s
      u = self.direction(current, previous, g, p)
      if self.mask[name]:
        u = u + self.wd * p
      out[name] = p - self.lr * self.scales[k] * u
    return out


def adam_ref(params, *, b1, b2, bb1, bb2, eps, **kw):
  stats = [StatRef(lambda g: g, b1, bb1, True), StatRef(np.square, b2, bb2, True)]

  def direction(cur, prev, g, p):
    return cur[0] / (np.sqrt(np.abs(cur[1])) + eps)

  return SharedBaseRef(params, stats=stats, direction=direction, **kw)


def lion_ref(params, *, b1, b2, bb2, **kw):
  """u = sign(b1 m_prev + (1 - b1) g); m = EMA_b2(g), no bias correction."""
  stats = [StatRef(lambda g: g, b2, bb2, False)]

  def direction(cur, prev, g, p):
    return np.sign(b1 * prev[0] + (1 - b1) * g)

  return SharedBaseRef(params, stats=stats, direction=direction, **kw)


def sgd_ref(params, *, momentum, base_momentum, nesterov, **kw):
  """m = EMA_mu(g), no bias correction; u = m or mu m + (1 - mu) g."""
  stats = [StatRef(lambda g: g, momentum, base_momentum, False)]

  def direction(cur, prev, g, p):
    return momentum * cur[0] + (1 - momentum) * g if nesterov else cur[0]

  return SharedBaseRef(params, stats=stats, direction=direction, **kw)


def rmsprop_ref(params, *, decay, base_decay, eps, eps_in_sqrt, bias_correction, **kw):
  stats = [StatRef(np.square, decay, base_decay, bias_correction)]

  def direction(cur, prev, g, p):
    v = np.abs(cur[0])
    return g / np.sqrt(v + eps) if eps_in_sqrt else g / (np.sqrt(v) + eps)

  return SharedBaseRef(params, stats=stats, direction=direction, **kw)


def adafactor_ref(params, *, b2, bb2, eps, clipping_threshold, parameter_scale, **kw):
  """Factored second moments for (r, c) matrices with r <= c (all factored).

  R_i = EMA(mean_j (g_ij^2 + eps)), C_j = EMA(mean_i (g_ij^2 + eps)),
  v_hat = R C^T / mean(R), u = g / sqrt(v_hat); vectors keep V = EMA(g^2 + eps).
  Then u / max(1, rms(u) / threshold) and u * max(rms(p), 1e-3).
  """
  for p in params.values():
    assert np.ndim(p) == 1 or (np.ndim(p) == 2 and p.shape[0] <= p.shape[1])

  def row(g):
    return (g * g + eps).mean(axis=1) if g.ndim == 2 else g * g + eps

  def col(g):
    return (g * g + eps).mean(axis=0) if g.ndim == 2 else np.zeros(1)

  stats = [StatRef(row, b2, bb2, True), StatRef(col, b2, bb2, True)]

  def direction(cur, prev, g, p):
    r, c = (np.maximum(np.abs(x), eps) for x in cur)
    if g.ndim == 2:
      v_hat = np.outer(r, c) / r.mean()
    else:
      v_hat = r
    u = g / np.sqrt(v_hat)
    if clipping_threshold is not None:
      u = u / max(1.0, np.sqrt(np.mean(u * u)) / clipping_threshold)
    if parameter_scale:
      u = u * max(np.sqrt(np.mean(p * p)), 1e-3)
    return u

  return SharedBaseRef(params, stats=stats, direction=direction, **kw)
