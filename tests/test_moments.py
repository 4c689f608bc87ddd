"""The generic mechanism: without a base it is the plain optimizer per objective."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dualoptim_jax as dj
from dualoptim_jax.transform import adam_direction, adam_moments


def test_without_base_and_one_objective_is_adam():
  params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)}
  tx = dj.shared_base_moments(
    adam_moments(0.9, 0.95, 0.9, 0.95), adam_direction(1e-8), num_objectives=1, use_base=False
  )
  ref = optax.scale_by_adam(0.9, 0.95, 1e-8)
  s, r = tx.init(params), ref.init(params)
  assert s.base == ()
  for n in range(20):
    g = {"w": jnp.sin(params["w"] * (n + 1))}
    u, s = tx.update(g, s, objective=0)
    v, r = ref.update(g, r)
    np.testing.assert_allclose(u["w"], v["w"], rtol=2e-6, atol=1e-7)


def test_without_base_k_objectives_is_dualoptim():
  params = {"w": jnp.linspace(-1.0, 1.0, 6)}
  tx = dj.shared_base_moments(
    adam_moments(0.9, 0.95, 0.9, 0.95), adam_direction(1e-8), num_objectives=2, use_base=False
  )
  ref = dj.scale_by_dualoptim(0.9, 0.95, 1e-8)
  s, r = tx.init(params), ref.init(params)
  for n in range(15):
    k = dj.alternating(1, 2)(n)
    g = {"w": jnp.cos(params["w"] * (n + 1)) * (k + 1)}
    u, s = tx.update(g, s, objective=k)
    v, r = ref.update(g, r, objective=k)
    np.testing.assert_allclose(u["w"], v["w"], rtol=2e-6, atol=1e-7)


def test_rejects_empty_moments_and_bad_decays():
  with pytest.raises(ValueError, match="at least one statistic"):
    dj.shared_base_moments((), adam_direction(0.0))
  with pytest.raises(ValueError, match=r"moments\[1\].base_decay must be in \[0, 1\), got 1.0"):
    dj.shared_base_moments(adam_moments(0.9, 0.9, 0.9, 1.0), adam_direction(0.0))


def test_none_leaves_are_kept():
  params = {"w": jnp.ones(3), "frozen": None}
  tx = dj.dualoptim_plus(1e-2)
  s = tx.init(params)
  u, s = tx.update({"w": jnp.ones(3), "frozen": None}, s, params, objective=0)
  assert u["frozen"] is None and u["w"].shape == (3,)
