"""Theorem 1 (stationary gradients): the cycle fixed point and its two regimes.

Closed forms are derived in docs/theory.md and implemented independently in
tests/reference.py; here they are checked against a plain NumPy simulation of
the recurrence and against the package's transform.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import theorem1_fixed_point

import dualoptim_jax as dj


def simulate(s_f, s_r, beta, base_beta, ff, fr, cycles=400):
  """The recurrence itself (no bias correction), read at a cycle boundary."""
  b = d_f = d_r = 0.0
  for _ in range(cycles):
    for _ in range(ff):
      d_f = beta * d_f + (1 - beta) * (s_f - b)
      b = base_beta * b + (1 - base_beta) * s_f
    for _ in range(fr):
      d_r = beta * d_r + (1 - beta) * (s_r - b)
      b = base_beta * b + (1 - base_beta) * s_r
  return b, d_f, d_r


def run_transform(m, n, G, ff, fr, b1, b2, bb1, bb2, cycles):
  tx = dj.scale_by_dualoptim_plus(b1, b2, bb1, bb2, num_objectives=2)
  params = {"w": jnp.zeros_like(G)}
  state = tx.init(params)
  sched = dj.alternating(ff, fr)
  grads = [{"w": m * G}, {"w": n * G}]

  @jax.jit
  def cycle(state):
    for step in range(ff + fr):
      k = sched(step)
      _, state = tx.update(grads[k], state, objective=k)
    return state

  for _ in range(cycles):
    state = cycle(state)
  return state


@pytest.mark.parametrize("ff,fr", [(1, 1), (1, 5), (2, 3), (3, 1)])
@pytest.mark.parametrize("beta,base_beta", [(0.9, 0.8), (0.9, 0.9), (0.7, 0.95)])
def test_closed_form_matches_simulation(ff, fr, beta, base_beta):
  s_f, s_r = 1.3, -0.4
  b0, _, d_f, d_r = theorem1_fixed_point(
    s_f, s_r, beta=beta, base_beta=base_beta, forget_steps=ff, retain_steps=fr
  )
  b, sim_f, sim_r = simulate(s_f, s_r, beta, base_beta, ff, fr)
  np.testing.assert_allclose([b, sim_f, sim_r], [b0, d_f, d_r], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("ff,fr", [(1, 5), (2, 3)])
def test_transform_reaches_fixed_point_unequal_frequencies(ff, fr):
  """F_f != F_r, where the poster's printed forms disagree with a simulation."""
  G = jnp.array([1.0, -2.0, 0.5])
  m, n = 1.5, 0.5
  b1, b2, bb1, bb2 = 0.8, 0.85, 0.7, 0.75
  state = run_transform(m, n, G, ff, fr, b1, b2, bb1, bb2, cycles=150)
  for i, (beta, base_beta, power) in enumerate([(b1, bb1, 1), (b2, bb2, 2)]):
    s_f, s_r = m**power * G**power, n**power * G**power
    b0, _, d_f, d_r = theorem1_fixed_point(
      s_f, s_r, beta=beta, base_beta=base_beta, forget_steps=ff, retain_steps=fr
    )
    np.testing.assert_allclose(state.base[i]["w"], b0, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(state.deltas[0][i]["w"], d_f, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(state.deltas[1][i]["w"], d_r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("ff,fr", [(1, 1), (1, 5)])
def test_agreeing_objectives_drive_deltas_to_zero(ff, fr):
  G = jnp.array([1.0, -2.0, 0.5])
  state = run_transform(0.7, 0.7, G, ff, fr, 0.9, 0.95, 0.9, 0.95, cycles=200)
  for k in range(2):
    for i in range(2):
      assert float(jnp.max(jnp.abs(state.deltas[k][i]["w"]))) < 1e-5
  # ...while the base carries the whole signal (first moment -> m G).
  np.testing.assert_allclose(state.base[0]["w"], 0.7 * G, rtol=1e-4)


@pytest.mark.parametrize("ff,fr", [(1, 1), (1, 5), (2, 3)])
def test_opposed_objectives_at_derived_ratio_drive_base_to_zero(ff, fr):
  """n/m = -a^Fr (1 - a^Ff) / (1 - a^Fr) zeroes the first-moment base at the
  cycle boundary; the deltas then carry each objective's own signal."""
  a, beta = 0.9, 0.9
  m = 1.0
  n = -m * a**fr * (1 - a**ff) / (1 - a**fr)
  G = jnp.array([1.0, -2.0, 0.5])
  state = run_transform(m, n, G, ff, fr, beta, 0.95, a, 0.95, cycles=300)
  assert float(jnp.max(jnp.abs(state.base[0]["w"]))) < 1e-5
  # Not a degenerate zero: the forget delta is the full forget moment.
  _, _, d_f, _ = theorem1_fixed_point(
    m * G, n * G, beta=beta, base_beta=a, forget_steps=ff, retain_steps=fr
  )
  np.testing.assert_allclose(state.deltas[0][0]["w"], d_f, rtol=1e-4)
  assert float(jnp.min(jnp.abs(state.deltas[0][0]["w"]))) > 0.1


def test_cycle_mean_of_base_vanishes_at_frequency_ratio():
  """Over one cycle the base averages (F_f s_f + F_r s_r) / (F_f + F_r)."""
  ff, fr, a = 1, 5, 0.9
  s_f = 1.0
  s_r = -s_f * ff / fr
  b = 0.0
  for _ in range(500):
    for s in [s_f] * ff + [s_r] * fr:
      b = a * b + (1 - a) * s
  values = []
  for s in [s_f] * ff + [s_r] * fr:
    values.append(b)
    b = a * b + (1 - a) * s
  assert abs(np.mean(values)) < 1e-12
  assert max(abs(v) for v in values) > 1e-2  # it oscillates, but averages to 0
