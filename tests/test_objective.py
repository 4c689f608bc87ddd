"""Bad input: clear errors at construction and at update; visible traced errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental import checkify

import dualoptim_jax as dj

PARAMS = {"w": jnp.ones((2, 3))}


@pytest.mark.parametrize("name", ["b1", "b2", "base_b1", "base_b2"])
@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5])
def test_betas_out_of_range(name, value):
  with pytest.raises(ValueError, match=rf"{name} must be in \[0, 1\), got {value}"):
    dj.dualoptim_plus(1e-3, **{name: value})
  if name in ("b1", "b2"):
    with pytest.raises(ValueError, match=name):
      dj.dualoptim(1e-3, **{name: value})


def test_negative_eps():
  with pytest.raises(ValueError, match=r"eps must be >= 0, got -1e-08"):
    dj.scale_by_dualoptim_plus(eps=-1e-8)
  with pytest.raises(ValueError, match="eps"):
    dj.scale_by_dualoptim(eps=-1.0)


@pytest.mark.parametrize("k", [0, -1, 2.0, True, "2"])
def test_bad_num_objectives(k):
  for make in (dj.dualoptim_plus, dj.dualoptim):
    with pytest.raises(ValueError, match="num_objectives must be a positive int"):
      make(1e-3, num_objectives=k)
  with pytest.raises(ValueError, match="num_objectives"):
    dj.decoupled(optax.sgd(1.0), num_objectives=k)


def test_lr_scales_wrong_length():
  with pytest.raises(ValueError, match=r"one entry per objective \(3\), got 2"):
    dj.dualoptim_plus(1e-3, num_objectives=3, lr_scales=(1.0, 0.5))
  with pytest.raises(ValueError, match="finite and >= 0"):
    dj.dualoptim(1e-3, lr_scales=(1.0, -1.0))


def test_negative_weight_decay():
  with pytest.raises(ValueError, match="weight_decay must be >= 0, got -0.1"):
    dj.dualoptim_plus(1e-3, weight_decay=-0.1)


@pytest.mark.parametrize("make", [dj.dualoptim_plus, dj.dualoptim])
def test_static_objective_out_of_range(make):
  tx = make(1e-3, num_objectives=2)
  s = tx.init(PARAMS)
  with pytest.raises(ValueError, match=r"objective=2 is out of range: allowed values are 0..1"):
    tx.update(PARAMS, s, PARAMS, objective=2)
  with pytest.raises(ValueError, match=r"objective=-1 is out of range"):
    tx.update(PARAMS, s, PARAMS, objective=-1)


@pytest.mark.parametrize("make", [dj.dualoptim_plus, dj.dualoptim])
def test_missing_objective(make):
  tx = make(1e-3)
  s = tx.init(PARAMS)
  with pytest.raises(ValueError, match="needs the active objective"):
    tx.update(PARAMS, s, PARAMS)


def test_concrete_array_objective_out_of_range_raises_eagerly():
  tx = dj.dualoptim_plus(1e-3)
  s = tx.init(PARAMS)
  with pytest.raises(ValueError, match="objective=3 is out of range"):
    tx.update(PARAMS, s, PARAMS, objective=jnp.int32(3))


def test_non_integer_objective():
  tx = dj.dualoptim_plus(1e-3)
  s = tx.init(PARAMS)
  with pytest.raises(ValueError, match="integer scalar"):
    tx.update(PARAMS, s, PARAMS, objective=jnp.float32(1.0))
  with pytest.raises(ValueError, match="integer scalar"):
    tx.update(PARAMS, s, PARAMS, objective=jnp.array([0, 1]))


@pytest.mark.parametrize("make", [dj.dualoptim_plus, dj.dualoptim])
@pytest.mark.parametrize("bad", [2, 7, -1])
def test_traced_objective_out_of_range_is_visible(make, bad):
  """Out-of-range traced objectives give NaN updates and leave the state alone."""
  tx = make(1e-3, num_objectives=2)
  s = tx.init(PARAMS)
  step = jax.jit(lambda g, s, k: tx.update(g, s, PARAMS, objective=k))
  u, s_new = step(PARAMS, s, jnp.int32(bad))
  assert np.all(np.isnan(np.asarray(u["w"])))
  for a, b in zip(jax.tree.leaves(s), jax.tree.leaves(s_new)):
    np.testing.assert_array_equal(a, b)
  # And valid indices still work in the same program.
  u, _ = step(PARAMS, s, jnp.int32(1))
  assert np.all(np.isfinite(np.asarray(u["w"])))


def test_traced_objective_out_of_range_caught_by_checkify():
  tx = dj.dualoptim_plus(1e-3)
  s = tx.init(PARAMS)

  def apply(k):
    u, _ = tx.update(PARAMS, s, PARAMS, objective=k)
    return optax.apply_updates(PARAMS, u)

  checked = jax.jit(checkify.checkify(apply, errors=checkify.float_checks))
  err, _ = checked(jnp.int32(0))
  err.throw()  # no error for a valid objective
  err, _ = checked(jnp.int32(5))
  with pytest.raises(checkify.JaxRuntimeError, match="nan"):
    err.throw()


# --------------------------------------------------------------------------- single-state optimizers


@pytest.mark.parametrize(
  "make",
  [
    lambda: dj.adamw_8bit(1e-2),
    lambda: dj.dualoptim_plus(1e-2, num_objectives=1),
    lambda: dj.dualoptim_plus_lion(1e-3, num_objectives=1, state_bits=8),
    lambda: dj.dualoptim(1e-2, num_objectives=1),
  ],
  ids=["adamw_8bit", "dualoptim_plus_k1", "lion_8bit_k1", "dualoptim_k1"],
)
def test_single_state_optimizers_ignore_objective(make):
  """As ``optax.adamw`` does: a traced ``objective=1`` (from a multi-objective loop) changes
  nothing, state included."""
  tx = make()
  params = {"w": jnp.linspace(-1.0, 1.0, 64 * 64).reshape(64, 64)}
  grads = {"w": jnp.cos(params["w"] * 3.0)}
  state = tx.init(params)
  plain = jax.jit(lambda g, s: tx.update(g, s, params))
  with_k = jax.jit(lambda g, s, k: tx.update(g, s, params, objective=k))
  for _ in range(2):
    u0, s0 = plain(grads, state)
    u1, s1 = with_k(grads, state, jnp.int32(1))
    assert bool(jnp.all(jnp.isfinite(u1["w"])))
    np.testing.assert_array_equal(u0["w"], u1["w"])
    jax.tree.map(np.testing.assert_array_equal, s0, s1)
    state = s0


def test_traced_hyperparameters_are_unchecked_and_show_as_nan():
  """Documented in dualoptim_jax.hyperparams: a concrete b1 = 1 raises at construction, a
  traced one (optax.inject_hyperparams under jit) runs unchecked, and its division by
  1 - b1**t = 0 gives non-finite updates that checkify's float checks report."""
  with pytest.raises(ValueError, match=r"b1 must be in \[0, 1\)"):
    dj.dualoptim_plus(1e-2, b1=1.0)
  make = optax.inject_hyperparams(
    dj.dualoptim_plus, static_args=dj.static_hyperparams(dj.dualoptim_plus)
  )
  tx = make(learning_rate=1e-2)
  params = {"w": jnp.ones(4)}
  state = tx.init(params)
  state.hyperparams["b1"] = jnp.asarray(1.0)
  update = lambda g, s: tx.update(g, s, params, objective=0)[0]
  u = jax.jit(update)({"w": jnp.ones(4)}, state)
  assert not bool(jnp.all(jnp.isfinite(u["w"])))
  err, _ = checkify.checkify(jax.jit(update), errors=checkify.float_checks)(
    {"w": jnp.ones(4)}, state
  )
  assert err.get() is not None
