"""The generic mechanism: without a base it is the plain optimizer per objective."""

import jax
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


def _8bit_steps(tx, leaves, objectives, traced):
  """Per step, ``(updates, state)`` of ``tx`` on a tree ``{"w0": leaves[0], ...}``."""
  params = {f"w{i}": p for i, p in enumerate(leaves)}
  state = tx.init(params)
  update = lambda g, s, k: tx.update(g, s, params, objective=k)
  step = jax.jit(update) if traced else jax.jit(update, static_argnums=(2,))
  out = []
  for n, k in enumerate(objectives):
    g = {name: jnp.sin(p * (n + 1) + k) for name, p in params.items()}
    u, state = step(g, state, jnp.int32(k) if traced else k)
    out.append((u, state))
  return out


def _of_leaf(tree, name):
  """The arrays a state or update tree holds for parameter ``name``."""
  is_params = lambda t: isinstance(t, dict) and name in t
  return jax.tree.leaves(
    [t[name] for t in jax.tree.leaves(tree, is_leaf=is_params) if is_params(t)]
  )


@pytest.mark.parametrize("traced", [False, True])
def test_same_shaped_8bit_leaves_updated_together_equal_each_alone(traced):
  """Leaves with equal stackable codecs run as one stacked group (one loop body
  in the program); each leaf's updates and stored codes are those it gets in a
  tree of its own."""
  rng = np.random.default_rng(0)
  leaves = [jnp.asarray(rng.normal(size=(64, 300)), jnp.float32) for _ in range(3)]
  tx = dj.dualoptim_plus(1e-3, state_bits=8)
  objectives = [0, 1, 1, 0]
  together = _8bit_steps(tx, leaves, objectives, traced)
  for i, leaf in enumerate(leaves):
    alone = _8bit_steps(tx, [leaf], objectives, traced)
    for step_all, step_one in zip(together, alone):
      ours, theirs = _of_leaf(step_all, f"w{i}"), _of_leaf(step_one, "w0")
      assert len(ours) == len(theirs) == 1 + 6 * 2  # the update; six moments: codes, scales
      for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(a, b)


def test_the_8bit_program_holds_one_codec_per_group_not_per_leaf():
  """24 same-shaped 8-bit leaves compile to a program under twice the size of
  2 leaves' (one codec per leaf would be ~12x)."""
  tx = dj.dualoptim_plus(1e-3, state_bits=8)

  def program_size(n):
    params = {f"w{i}": jax.ShapeDtypeStruct((64, 300), jnp.float32) for i in range(n)}
    state = jax.eval_shape(tx.init, params)
    update = jax.jit(lambda g, s: tx.update(g, s, None, objective=0))
    return len(update.lower(params, state).compile().as_text())

  assert program_size(24) < 2 * program_size(2)


_BACKEND_COMPILES = []
jax.monitoring.register_event_duration_secs_listener(
  lambda event, secs, **kw: (
    _BACKEND_COMPILES.append(event)
    if event == "/jax/core/compile/backend_compile_duration"
    else None
  )
)


def test_an_eager_8bit_update_compiles_nothing_once_warm():
  """Run eagerly, every operation comes from JAX's cache after the first update:
  leaves are not grouped (a group's loop, a fresh closure each time, would be
  compiled again at every update), and the block reduction's computation is
  a module-level function, not a fresh lambda."""
  tx = dj.dualoptim_plus(1e-3, state_bits=8)
  params = {f"w{i}": jnp.full((64, 300), i + 1.0) for i in range(3)}
  grads = jax.tree.map(jnp.sin, params)
  state = tx.init(params)
  for objective in (0, 1):  # warm: every operation of both objectives' updates
    _, state = tx.update(grads, state, params, objective=objective)
  before = len(_BACKEND_COMPILES)
  tx.update(grads, state, params, objective=0)
  assert len(_BACKEND_COMPILES) == before
