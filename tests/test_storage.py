"""8-bit optimizer states: accuracy against float32, storage rules, memory."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dualoptim_jax as dj
from dualoptim_jax import quantize as qz
from dualoptim_jax.quantize import QuantizedArray

STEPS = 300


def problem(seed=0):
  """Two regression objectives sharing an MLP (a 64x96 and a 96x8 layer)."""
  rng = np.random.default_rng(seed)
  xs = [rng.normal(size=(128, 64)) for _ in range(2)]
  w_true = [rng.normal(size=(64, 8)) / 8 for _ in range(2)]
  # Stacked, so a traced objective index can select its data.
  x = jnp.asarray(np.stack(xs), jnp.float32)
  y = jnp.asarray(np.stack([np.tanh(xi @ w) for xi, w in zip(xs, w_true)]), jnp.float32)
  params = {
    "hidden": {
      "kernel": jnp.asarray(rng.normal(size=(64, 96)) / 8, jnp.float32),
      "bias": jnp.zeros(96),
    },
    "out": {"kernel": jnp.asarray(rng.normal(size=(96, 8)) / 10, jnp.float32)},
  }

  def loss(p, k):
    h = jnp.tanh(x[k] @ p["hidden"]["kernel"] + p["hidden"]["bias"])
    return jnp.mean((h @ p["out"]["kernel"] - y[k]) ** 2)

  return params, loss


def train(tx, *, traced=False, use_jit=True, steps=STEPS, multi=True):
  params, loss = problem()
  state = tx.init(params)
  schedule = dj.alternating(1, 5)

  def step(p, s, k):
    g = jax.grad(loss)(p, k)
    u, s = tx.update(g, s, p, objective=k) if multi else tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  if use_jit:
    step = jax.jit(step, static_argnums=() if traced else (2,))
  for n in range(steps):
    k = schedule(n) if multi else n % 2
    params, state = step(params, state, jnp.int32(k) if traced else k)
  return params, state, float(loss(params, 0) + loss(params, 1))


def initial_loss():
  params, loss = problem()
  return float(loss(params, 0) + loss(params, 1))


def assert_close_loss(loss8, loss32):
  """8-bit ends within 10 % of the float32 loss (or 0.2 % of the initial loss).

  Measured (2-core CPU): DualOptim 1.0 %, DualOptim+ 6.4 % (lower than float32),
  AdamW 5 % of a loss 2500x below the initial one. DualOptim+ is the most
  sensitive: |v_delta/c + v_base| can nearly cancel, so code rounding in the
  delta moves individual denominators.
  """
  assert loss32 < 0.3 * initial_loss()  # the problem is actually being solved
  tolerance = max(0.10 * loss32, 0.002 * initial_loss())
  assert abs(loss8 - loss32) <= tolerance, (loss8, loss32)


CASES = {
  "dualoptim_plus": lambda bits: dj.dualoptim_plus(3e-3, weight_decay=0.01, state_bits=bits),
  "dualoptim": lambda bits: dj.dualoptim(3e-3, weight_decay=0.01, state_bits=bits),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_8bit_follows_float32(name):
  _, state8, loss8 = train(CASES[name](8))
  _, _, loss32 = train(CASES[name](32))
  assert_close_loss(loss8, loss32)
  assert any(
    isinstance(x, QuantizedArray)
    for x in jax.tree.leaves(state8, is_leaf=lambda x: isinstance(x, QuantizedArray))
  )


def test_adamw_8bit_follows_optax_adamw():
  _, _, loss8 = train(dj.adamw_8bit(3e-3, weight_decay=0.01), multi=False)
  _, _, loss32 = train(optax.adamw(3e-3, weight_decay=0.01), multi=False)
  assert_close_loss(loss8, loss32)


def quantized_paths(state):
  flat = jax.tree_util.tree_flatten_with_path(
    state, is_leaf=lambda x: isinstance(x, QuantizedArray)
  )[0]
  return {jax.tree_util.keystr(p) for p, leaf in flat if isinstance(leaf, QuantizedArray)}


def test_min_size_and_keep_fp32_rules():
  params, _ = problem()
  # hidden/kernel has 6144 elements, out/kernel 768, hidden/bias 96.
  state = dj.dualoptim_plus(1e-3, state_bits=8).init(params)
  q = quantized_paths(state)
  assert q and all("hidden']['kernel" in p for p in q)
  assert len(q) == 6  # 2 base + 2 objectives x 2 delta moments
  state = dj.dualoptim_plus(1e-3, storage=dj.state_storage(state_bits=8, min_8bit_size=512)).init(
    params
  )
  assert any("out']['kernel" in p for p in quantized_paths(state))
  state = dj.dualoptim_plus(
    1e-3,
    storage=dj.state_storage(
      state_bits=8, min_8bit_size=512, keep_fp32=lambda path: path.startswith("hidden")
    ),
  ).init(params)
  q = quantized_paths(state)
  assert q and not any("hidden" in p for p in q)


def test_quantize_base_and_delta_switches():
  params, _ = problem()
  only_base = dj.scale_by_dualoptim_plus(
    storage=dj.state_storage(state_bits=8, quantize_delta=False)
  ).init(params)
  only_delta = dj.scale_by_dualoptim_plus(
    storage=dj.state_storage(state_bits=8, quantize_base=False)
  ).init(params)
  is_q = lambda x: isinstance(x, QuantizedArray)
  assert any(is_q(x) for x in jax.tree.leaves(only_base.base, is_leaf=is_q))
  assert not any(is_q(x) for x in jax.tree.leaves(only_base.deltas, is_leaf=is_q))
  assert not any(is_q(x) for x in jax.tree.leaves(only_delta.base, is_leaf=is_q))
  assert any(is_q(x) for x in jax.tree.leaves(only_delta.deltas, is_leaf=is_q))


def test_maps_signed_for_deltas_and_first_moments_unsigned_for_base_second():
  """A delta second moment can be negative; the stored value must keep its sign."""
  params = {"w": jnp.zeros((8, 512))}
  tx = dj.scale_by_dualoptim_plus(storage=dj.state_storage(state_bits=8, min_8bit_size=0))
  state = tx.init(params)
  big = {"w": jnp.full((8, 512), 3.0)}
  small = {"w": jnp.full((8, 512), 0.1)}
  _, state = tx.update(big, state, objective=0)
  _, state = tx.update(small, state, objective=1)  # g^2 - v_B < 0
  v_delta = qz.dequantize_blockwise(state.deltas[1][1]["w"], signed=True)
  assert float(jnp.max(v_delta)) < 0
  v_base = qz.dequantize_blockwise(state.base[1]["w"], signed=False)
  assert float(jnp.min(v_base)) > 0


def test_8bit_dualoptim_traced_trajectory_equals_static():
  p_static, s_static, _ = train(CASES["dualoptim"](8), steps=12)
  p_traced, s_traced, _ = train(CASES["dualoptim"](8), steps=12, traced=True)
  for a, b in zip(jax.tree.leaves(p_static), jax.tree.leaves(p_traced)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(s_static), jax.tree.leaves(s_traced)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("other", ["eager", "traced"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_8bit_step_equals_static_jit_step(name, other):
  """From the same state, an eager (or traced-objective) step and a static jitted
  step store the same codes.

  Whole DualOptim+ trajectories are not compared: two differently fused
  programs may round a value within a float32 ulp of a code midpoint
  differently, and in DualOptim+ such a one-code flip can move
  |v_delta/c + v_base| across a near-cancellation and change the trajectory
  (see README, 8-bit accuracy).
  """
  tx = CASES[name](8)
  params, loss = problem()
  state = tx.init(params)

  def step(p, s, k):
    g = jax.grad(loss)(p, k)
    return tx.update(g, s, p, objective=k)

  jitted = jax.jit(step, static_argnums=2)
  if other == "eager":
    other_step = step
  else:
    traced = jax.jit(step)
    other_step = lambda p, s, k: traced(p, s, jnp.int32(k))
  is_q = lambda x: isinstance(x, QuantizedArray)
  for n in range(8):
    k = dj.alternating(1, 5)(n)
    u_jit, s_jit = jitted(params, state, k)
    u_other, s_other = other_step(params, state, k)
    for a, b in zip(jax.tree.leaves(s_jit, is_leaf=is_q), jax.tree.leaves(s_other, is_leaf=is_q)):
      if is_q(a):
        diff = np.abs(a.codes.astype(int) - b.codes.astype(int))
        assert diff.max() <= 1 and np.mean(diff > 0) <= 1e-3
        np.testing.assert_allclose(a.absmax, b.absmax, rtol=1e-6)
      else:
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
    for a, b in zip(jax.tree.leaves(u_jit), jax.tree.leaves(u_other)):
      # Measured: DualOptim equal to ~1e-8; DualOptim+ differs by > 1e-4
      # relative in <= 0.7 % of elements, by at most 0.4 lr, where
      # |v_delta/c + v_base| nearly cancels and one float32 ulp matters.
      assert np.mean(~np.isclose(a, b, rtol=1e-4, atol=1e-8)) <= 0.01
      assert np.max(np.abs(a - b)) <= 3e-3  # one nominal step (lr)
    params, state = optax.apply_updates(params, u_jit), s_jit


def layout_100m():
  """~100M parameters: 12 blocks of 4 (1024 x 2048) matrices, embeddings, norms."""
  shapes = {"embed": (32768, 1024)}
  for i in range(10):
    for j in range(3):
      shapes[f"l{i}_{j}"] = (1024, 2048)
    shapes[f"l{i}_norm"] = (1024,)
  return {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}


def analytic_bytes(params, moments_8bit, moments_float, counters):
  total = counters
  for spec in params.values():
    n = math.prod(spec.shape)
    if n >= 4096:
      blocks = math.prod(spec.shape[:-1]) * math.ceil(spec.shape[-1] / 256)
      total += moments_8bit * (n + 4 * blocks) + moments_float * 4 * n
    else:
      total += (moments_8bit + moments_float) * 4 * n
  return total


def test_state_nbytes_100m_layout():
  params = layout_100m()
  n_params = sum(math.prod(s.shape) for s in params.values())
  assert 95e6 < n_params < 110e6
  measured = {}
  for name, tx, moments, counters in [
    ("dualoptim_plus_8bit", dj.dualoptim_plus(1e-3, state_bits=8), 6, 4 + 8 + 4),
    ("dualoptim_8bit", dj.dualoptim(1e-3, state_bits=8), 4, 4 + 8 + 4),
    ("adamw_8bit", dj.adamw_8bit(1e-3), 2, 4 + 4 + 4),
  ]:
    state = jax.eval_shape(tx.init, params)
    measured[name] = dj.state_nbytes(state)
    assert measured[name] == analytic_bytes(params, moments, 0, counters), name
  state = jax.eval_shape(dj.dualoptim_plus(1e-3).init, params)
  assert dj.state_nbytes(state) == analytic_bytes(params, 0, 6, 4 + 8 + 4)
  assert measured["dualoptim_plus_8bit"] / n_params <= 6.2


def test_equal_8bit_moments_share_one_stackable_codec():
  """The policy gives same-shaped quantized moments equal codecs marked
  ``stack`` (so the update runs them as one group), and float ones unmarked."""
  policy = dj.state_storage(state_bits=8)
  spec = jax.ShapeDtypeStruct((64, 300), jnp.float32)
  a = policy(("a",), spec, 0, True, False)
  b = policy(("b",), spec, 0, True, False)
  assert a == b and a.stack
  assert policy(("a",), spec, 1, True, True) != a  # unsigned map: another codec
  small = policy(("bias",), jax.ShapeDtypeStruct((300,), jnp.float32), 0, True, False)
  assert not small.stack
  assert not dj.state_storage()(("a",), spec, 0, True, False).stack
