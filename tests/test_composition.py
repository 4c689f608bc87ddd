"""DualOptim(+) inside optax's wrappers and Flax NNX's Optimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import dualoptim_jax as dj

PARAMS = {"w": jnp.arange(6.0).reshape(2, 3) / 10, "b": jnp.ones(3)}


def grads(n, k):
  rng = np.random.default_rng(10 * n + k)
  return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), PARAMS)


def drive(tx, steps=8, *, use_jit=True, traced=False):
  state = tx.init(PARAMS)
  params = PARAMS

  def step(g, s, p, k):
    u, s = tx.update(g, s, p, objective=k)
    return optax.apply_updates(p, u), s

  if use_jit:
    step = jax.jit(step, static_argnums=() if traced else (3,))
  sched = dj.alternating(1, 2)
  for n in range(steps):
    k = sched(n)
    params, state = step(grads(n, k), state, params, jnp.int32(k) if traced else k)
  return params, state


def assert_trees_close(a, b, **kw):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw)


@pytest.fixture(params=["plus", "dual"])
def make(request):
  return dj.dualoptim_plus if request.param == "plus" else dj.dualoptim


def test_eager_equals_jit_static_and_traced(make):
  tx = make(1e-2, weight_decay=0.01)
  eager, s_eager = drive(tx, use_jit=False)
  jitted, s_jit = drive(tx, use_jit=True)
  traced, s_traced = drive(tx, use_jit=True, traced=True)
  assert_trees_close(eager, jitted, rtol=1e-6, atol=1e-7)
  assert_trees_close(jitted, traced, rtol=1e-6, atol=1e-7)
  assert jax.tree.structure(s_eager) == jax.tree.structure(s_traced)


def test_chain_and_named_chain_forward_objective(make):
  base, _ = drive(make(1e-2))
  chained, _ = drive(optax.chain(optax.clip_by_global_norm(1e9), make(1e-2)))
  named, _ = drive(optax.named_chain(("clip", optax.identity()), ("opt", make(1e-2))))
  assert_trees_close(base, chained, rtol=1e-6)
  assert_trees_close(base, named, rtol=1e-6)


def test_partition_and_masked(make):
  tx = optax.partition(
    {"opt": make(1e-2), "frozen": optax.set_to_zero()}, {"w": "opt", "b": "frozen"}
  )
  params, _ = drive(tx)
  np.testing.assert_array_equal(params["b"], PARAMS["b"])
  assert not np.allclose(params["w"], PARAMS["w"])
  full, _ = drive(make(1e-2))
  np.testing.assert_allclose(params["w"], full["w"], rtol=1e-6)

  masked = optax.masked(make(1e-2), {"w": True, "b": False})
  params, _ = drive(masked)
  np.testing.assert_allclose(params["w"], full["w"], rtol=1e-6)


def test_apply_if_finite_skips_nan_steps(make):
  tx = optax.apply_if_finite(make(1e-2), max_consecutive_errors=3)
  state = tx.init(PARAMS)
  bad = jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), PARAMS)
  u, state2 = tx.update(bad, state, PARAMS, objective=1)
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(u))
  u, _ = tx.update(grads(0, 1), state2, PARAMS, objective=1)
  assert any(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(u))


def test_conditionally_transform(make):
  tx = optax.conditionally_transform(make(1e-2), should_transform_fn=lambda n: n >= 2)
  state = tx.init(PARAMS)
  u0, state = tx.update(grads(0, 0), state, PARAMS, objective=0)
  np.testing.assert_array_equal(u0["w"], grads(0, 0)["w"])  # passed through
  u1, state = tx.update(grads(1, 1), state, PARAMS, objective=1)
  u2, state = tx.update(grads(2, 1), state, PARAMS, objective=1)
  assert not np.allclose(u2["w"], grads(2, 1)["w"])


def test_inject_hyperparams(make):
  tx = optax.inject_hyperparams(
    make, static_args=dj.static_hyperparams(make), hyperparam_dtype=jnp.float32
  )(learning_rate=1e-2)
  injected, state = drive(tx)
  plain, _ = drive(make(1e-2))
  assert_trees_close(injected, plain, rtol=1e-5, atol=1e-7)
  state.hyperparams["learning_rate"] = jnp.float32(0.0)
  u, _ = tx.update(grads(0, 0), state, injected, objective=0)
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(u))


def test_multisteps_called_directly(make):
  tx = optax.MultiSteps(make(1e-2), every_k_schedule=2)
  state = tx.init(PARAMS)
  g = grads(0, 1)
  u, state = tx.update(g, state, PARAMS, objective=1)
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(u))
  u, state = tx.update(g, state, PARAMS, objective=1)
  inner = make(1e-2)
  u_ref, _ = inner.update(g, inner.init(PARAMS), PARAMS, objective=1)
  assert_trees_close(u, u_ref, rtol=1e-6)


class TinyModel(nnx.Module):
  def __init__(self, rngs):
    self.lin = nnx.Linear(3, 2, rngs=rngs)

  def __call__(self, x):
    return self.lin(x)


def test_nnx_optimizer_forwards_objective(make):
  model = TinyModel(nnx.Rngs(0))
  opt = nnx.Optimizer(model, make(1e-2, num_objectives=2), wrt=nnx.Param)
  x = jnp.ones((4, 3))

  @nnx.jit(static_argnames="objective")
  def train_step(model, opt, objective):
    target = 0.0 if objective == 0 else 3.0
    grads = nnx.grad(lambda m: jnp.mean((m(x) - target) ** 2))(model)
    opt.update(model, grads, objective=objective)

  before = np.asarray(model.lin.kernel[...]).copy()
  for n in range(4):
    train_step(model, opt, dj.alternating(1, 1)(n))
  assert not np.allclose(before, model.lin.kernel[...])
  if make is dj.dualoptim_plus:
    # Both objectives stepped twice; deltas stay param-shaped Variables that
    # carry the parameter's metadata.
    state = opt.opt_state[0]
    np.testing.assert_array_equal(np.asarray(state.counts[...]), [2, 2])
    delta = state.deltas[1][0]["lin"]["kernel"]
    assert isinstance(delta, nnx.Variable) and delta[...].shape == (3, 2)


def test_nnx_optimizer_traced_objective(make):
  model = TinyModel(nnx.Rngs(0))
  opt = nnx.Optimizer(model, make(1e-2), wrt=nnx.Param)
  x = jnp.ones((4, 3))

  @nnx.jit
  def train_step(model, opt, objective):
    grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
    opt.update(model, grads, objective=objective)

  for n in range(3):
    train_step(model, opt, jnp.int32(n % 2))
  assert np.all(np.isfinite(np.asarray(model.lin.kernel[...])))


def test_inject_hyperparams_without_static_layout_args_explains():
  tx = optax.inject_hyperparams(dj.dualoptim_plus, hyperparam_dtype=jnp.float32)(learning_rate=1e-2)
  state = tx.init(PARAMS)
  with pytest.raises(ValueError, match=r"static_args=dj.static_hyperparams"):
    jax.jit(lambda s: tx.update(grads(0, 0), s, PARAMS, objective=0))(state)
