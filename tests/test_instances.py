"""DualOptim+ instances (Lion, EMA-SGD, RMSprop, Adafactor): parity, regimes, convergence.

References: tests/reference_instances.py (NumPy float64, from the maths) and,
for the first step and the DualOptim counterparts, optax itself.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from reference import DualOptimPlusRef, theorem1_fixed_point
from reference_instances import adafactor_ref, adam_ref, lion_ref, rmsprop_ref, sgd_ref
from test_transform import cycle, grads_for, make_params, run_pair

import dualoptim_jax as dj
from dualoptim_jax import instances

LR, WD = 1e-2, 0.05
MASK = {"w": True, "b": False}

# name -> (alias kwargs, reference builder, reference kwargs, parity bound).
# make_params() has w: (4, 5), b: (5,); min_dim_size_to_factor=4 factors w only.
INSTANCES = {
  "lion": (
    dj.dualoptim_plus_lion,
    dict(b1=0.9, b2=0.95, base_b2=0.8),
    lion_ref,
    dict(b1=0.9, b2=0.95, bb2=0.8),
    1e-5,
  ),
  "sgd": (
    dj.dualoptim_plus_sgd,
    dict(momentum=0.8, base_momentum=0.9),
    sgd_ref,
    dict(momentum=0.8, base_momentum=0.9, nesterov=False),
    1e-5,
  ),
  "sgd_nesterov": (
    dj.dualoptim_plus_sgd,
    dict(momentum=0.8, base_momentum=0.9, nesterov=True),
    sgd_ref,
    dict(momentum=0.8, base_momentum=0.9, nesterov=True),
    1e-5,
  ),
  "rmsprop": (
    dj.dualoptim_plus_rmsprop,
    dict(decay=0.9, eps=1e-2, base_decay=0.8),
    rmsprop_ref,
    dict(decay=0.9, base_decay=0.8, eps=1e-2, eps_in_sqrt=True, bias_correction=False),
    2e-4,
  ),
  "rmsprop_bc": (
    dj.dualoptim_plus_rmsprop,
    dict(decay=0.9, eps=1e-2, base_decay=0.8, eps_in_sqrt=False, bias_correction=True),
    rmsprop_ref,
    dict(decay=0.9, base_decay=0.8, eps=1e-2, eps_in_sqrt=False, bias_correction=True),
    2e-4,
  ),
  "adafactor": (
    dj.dualoptim_plus_adafactor,
    dict(b2=0.95, base_b2=0.9, eps=1e-30, min_dim_size_to_factor=4),
    adafactor_ref,
    dict(b2=0.95, bb2=0.9, eps=1e-30, clipping_threshold=1.0, parameter_scale=True),
    2e-4,
  ),
}


def test_generic_reference_reproduces_released_adam_reference():
  """The NumPy mechanism, given Adam's statistics, is the core's reference."""
  kw = dict(lr=LR, wd=WD, num_objectives=3, lr_scales=[1.0, 0.5, 2.0], wd_mask=MASK)
  ours = adam_ref(make_params(), b1=0.9, b2=0.95, bb1=0.8, bb2=0.9, eps=1e-6, **kw)
  released = DualOptimPlusRef(make_params(), b1=0.9, b2=0.95, bb1=0.8, bb2=0.9, eps=1e-6, **kw)
  p1 = p2 = {n: v.astype(np.float64) for n, v in make_params().items()}
  for n in range(30):
    k = cycle(3)(n)
    g = grads_for(2, n, k, p1)
    p1, p2 = ours.step(p1, g, k), released.step(p2, g, k)
  for name in p1:
    np.testing.assert_allclose(p1[name], p2[name], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(INSTANCES))
@pytest.mark.parametrize("num_objectives,traced", [(2, False), (2, True), (3, True)])
def test_instance_matches_reference(name, num_objectives, traced):
  make, kw, make_ref, ref_kw, bound = INSTANCES[name]
  scales = [1.0, 0.5, 2.0][:num_objectives]
  tx = make(LR, **kw, weight_decay=WD, num_objectives=num_objectives, lr_scales=scales, mask=MASK)
  ref = make_ref(
    make_params(),
    **ref_kw,
    lr=LR,
    wd=WD,
    num_objectives=num_objectives,
    lr_scales=scales,
    wd_mask=MASK,
  )
  worst, _ = run_pair(
    tx, ref, num_objectives, cycle(num_objectives), traced=traced, use_jit=True, steps=40
  )
  assert worst < bound, worst


def test_lion_reads_the_momentum_before_this_step():
  """Lion interpolates the *previous* estimate: a reference that used the
  updated one must fail the parity bound (the test can tell them apart)."""
  make, kw, _, ref_kw, bound = INSTANCES["lion"]

  ref = lion_ref(make_params(), **ref_kw, lr=LR, wd=0.0, num_objectives=2)
  b1 = ref_kw["b1"]
  ref.direction = lambda cur, prev, g, p: np.sign(b1 * cur[0] + (1 - b1) * g)
  worst, _ = run_pair(make(LR, **kw), ref, 2, cycle(2), traced=False, use_jit=True, steps=40)
  assert worst > 100 * bound, worst


# --- first step against optax: M = s exactly at n = t = 1 --------------------

SHAPES = [(3, 4, 5), (6, 4), (2, 3), (5,)]


def first_update(tx, g):
  return jax.jit(lambda g: tx.update(g, tx.init(g), objective=1)[0])(g)


@pytest.mark.parametrize("shape", SHAPES)
def test_first_step_matches_optax(shape):
  """At the first step the base is 0 and every delta holds (1 - beta) s(g).

  Bias-corrected estimates are then s(g) itself, uncorrected ones (1 - beta) s(g):
  the same as optax's own first step, including Adafactor's factoring rule
  (two largest axes, both >= min_dim_size_to_factor) on every shape.
  """
  g = jax.random.normal(jax.random.key(3), shape)
  cases = [
    (dj.scale_by_dualoptim_plus_lion(0.9, 0.95, 0.7), optax.scale_by_lion(0.9, 0.95)),
    (dj.scale_by_dualoptim_plus_rmsprop(0.9, 0.1, 0.7), optax.scale_by_rms(0.9, 0.1)),
    (
      dj.scale_by_dualoptim_plus_rmsprop(0.9, 0.1, 0.7, eps_in_sqrt=False),
      optax.scale_by_rms(0.9, 0.1, eps_in_sqrt=False),
    ),
    (
      dj.scale_by_dualoptim_plus_adafactor(0.95, 0.7, 1e-30, min_dim_size_to_factor=3),
      optax.scale_by_factored_rms(min_dim_size_to_factor=3, epsilon=1e-30),
    ),
  ]
  for ours, theirs in cases:
    expected = jax.jit(lambda g, t=theirs: t.update(g, t.init(g), g)[0])(g)
    np.testing.assert_allclose(first_update(ours, g), expected, rtol=2e-6, atol=1e-7)
  # EMA momentum = (1 - mu) * optax's trace, Nesterov included.
  for nesterov in (False, True):
    trace = optax.trace(0.8, nesterov=nesterov)
    expected = 0.2 * trace.update(g, trace.init(g))[0]
    ours = dj.scale_by_dualoptim_plus_sgd(0.8, nesterov, 0.7)
    np.testing.assert_allclose(first_update(ours, g), expected, rtol=1e-6)


@pytest.mark.parametrize("name", ["lion", "rmsprop", "rmsprop_eps_out", "sgd", "sgd_nesterov"])
def test_without_base_each_instance_is_its_optax_optimizer(name):
  """With ``use_base=False`` (a plain state per objective) the statistics and
  direction of an instance are optax's own optimizer, at every step."""
  moments, direction, plain = {
    "lion": (
      instances.lion_moments(0.95, 0.95),
      instances.lion_direction(0.8),
      optax.scale_by_lion(0.8, 0.95),
    ),
    "rmsprop": (
      instances.rmsprop_moments(0.9, 0.9),
      instances.rmsprop_direction(0.1, True),
      optax.scale_by_rms(0.9, 0.1),
    ),
    "rmsprop_eps_out": (
      instances.rmsprop_moments(0.9, 0.9),
      instances.rmsprop_direction(0.1, False),
      optax.scale_by_rms(0.9, 0.1, eps_in_sqrt=False),
    ),
    # EMA momentum = (1 - mu) * optax's trace.
    "sgd": (
      instances.sgd_moments(0.8, 0.8),
      instances.sgd_direction(0.8, False),
      optax.chain(optax.trace(0.8), optax.scale(0.2)),
    ),
    "sgd_nesterov": (
      instances.sgd_moments(0.8, 0.8),
      instances.sgd_direction(0.8, True),
      optax.chain(optax.trace(0.8, nesterov=True), optax.scale(0.2)),
    ),
  }[name]
  ours = dj.shared_base_moments(moments, direction, use_base=False)
  theirs = dj.decoupled(plain)
  params = jax.tree.map(jnp.asarray, make_params())
  s1, s2 = ours.init(params), theirs.init(params)
  for n in range(16):
    k = dj.alternating(1, 3)(n)
    g = jax.tree.map(jnp.asarray, grads_for(6, n, k, make_params()))
    (u1, s1), (u2, s2) = ours.update(g, s1, objective=k), theirs.update(g, s2, objective=k)
    for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_adafactor_state_is_factored():
  params = {"w": jnp.zeros((4, 6)), "wt": jnp.zeros((6, 4)), "b": jnp.zeros(6)}
  state = dj.scale_by_dualoptim_plus_adafactor(min_dim_size_to_factor=4).init(params)
  for tree in (state.base, *state.deltas):
    row, col = tree
    assert row["w"].shape == (4,) and col["w"].shape == (6,)
    assert row["wt"].shape == (4,) and col["wt"].shape == (6,)
    assert row["b"].shape == (6,) and col["b"].shape == (1,)


@pytest.mark.parametrize(
  "make",
  [
    lambda: dj.dualoptim_plus_lion(1e-3, weight_decay=0.1),
    lambda: dj.dualoptim_plus_sgd(1e-3, nesterov=True),
    lambda: dj.dualoptim_plus_rmsprop(1e-3, bias_correction=True),
    lambda: dj.dualoptim_plus_adafactor(1e-3, min_dim_size_to_factor=4),
  ],
)
def test_state_structure_and_dtypes_preserved(make):
  tx = make()
  params = jax.tree.map(jnp.asarray, make_params())
  s0 = tx.init(params)
  step = jax.jit(lambda g, s: tx.update(g, s, params, objective=jnp.int32(1)))
  u, s1 = step(params, s0)
  assert jax.tree.structure(s0) == jax.tree.structure(s1)
  for a, b in zip(jax.tree.leaves(s0), jax.tree.leaves(s1)):
    assert a.shape == b.shape and a.dtype == b.dtype
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(u))


@pytest.mark.parametrize(
  "bad",
  [
    lambda: dj.dualoptim_plus_lion(1e-3, b1=1.0),
    lambda: dj.dualoptim_plus_lion(1e-3, base_b2=-0.1),
    lambda: dj.dualoptim_plus_sgd(1e-3, momentum=1.5),
    lambda: dj.dualoptim_plus_sgd(1e-3, nesterov="yes"),
    lambda: dj.dualoptim_plus_rmsprop(1e-3, eps=-1.0),
    lambda: dj.dualoptim_plus_rmsprop(1e-3, weight_decay=-0.1),
    lambda: dj.dualoptim_plus_adafactor(1e-3, min_dim_size_to_factor=0),
    lambda: dj.dualoptim_plus_adafactor(1e-3, clipping_threshold=0.5),
    lambda: dj.dualoptim_plus_adafactor(1e-3, num_objectives=0),
  ],
)
def test_bad_hyperparameters_raise(bad):
  with pytest.raises(ValueError, match="got"):
    bad()


# --- Theorem 1 regimes under stationary per-objective gradients --------------

G = jnp.array([[1.0, -2.0, 0.5, 1.5], [0.3, 1.0, -0.7, 2.0], [-1.0, 0.2, 0.8, -0.4]])


def run_cycles(tx, m, n, ff, fr, cycles):
  """Objective 0 sees m G for ff steps, objective 1 sees n G for fr steps."""
  params = {"w": jnp.zeros_like(G)}
  grads = [{"w": m * G}, {"w": n * G}]
  sched = dj.alternating(ff, fr)

  @jax.jit
  def one_cycle(state):
    for step in range(ff + fr):
      k = sched(step)
      _, state = tx.update(grads[k], state, objective=k)
    return state

  state = tx.init(params)
  for _ in range(cycles):
    state = one_cycle(state)
  return state


def statistics(name, g):
  """The instance's statistics of a gradient, in NumPy."""
  g = np.asarray(g, np.float64)
  if name in ("lion", "sgd"):
    return [g]
  if name == "rmsprop":
    return [g * g]
  return [(g * g).mean(axis=1), (g * g).mean(axis=0)]  # adafactor, (3, 4)


def instance(name, beta, base_beta):
  return {
    "lion": lambda: dj.scale_by_dualoptim_plus_lion(0.9, beta, base_beta),
    "sgd": lambda: dj.scale_by_dualoptim_plus_sgd(beta, False, base_beta),
    "rmsprop": lambda: dj.scale_by_dualoptim_plus_rmsprop(beta, 1e-8, base_beta),
    "adafactor": lambda: dj.scale_by_dualoptim_plus_adafactor(
      beta, base_beta, 0.0, min_dim_size_to_factor=2
    ),
  }[name]()


ALL = ["lion", "sgd", "rmsprop", "adafactor"]


def check_fixed_point(name, state, m, n, beta, base_beta, ff, fr):
  for i, (s_f, s_r) in enumerate(zip(statistics(name, m * G), statistics(name, n * G))):
    b0, _, d_f, d_r = theorem1_fixed_point(
      s_f, s_r, beta=beta, base_beta=base_beta, forget_steps=ff, retain_steps=fr
    )
    np.testing.assert_allclose(state.base[i]["w"], b0, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(state.deltas[0][i]["w"], d_f, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(state.deltas[1][i]["w"], d_r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("ff,fr", [(1, 1), (1, 5)])
def test_agreeing_statistics_drive_deltas_to_zero(name, ff, fr):
  """Equal statistics: the base carries them, every delta vanishes.

  For the squared-gradient instances (RMSprop, Adafactor) opposed gradients
  of equal size (n = -m) agree: their statistics cannot see the sign.
  """
  m = 0.7
  for n in [m] if name in ("lion", "sgd") else [m, -m]:
    state = run_cycles(instance(name, 0.9, 0.8), m, n, ff, fr, cycles=150)
    for i, s in enumerate(statistics(name, m * G)):
      for k in range(2):
        assert float(jnp.max(jnp.abs(state.deltas[k][i]["w"]))) < 1e-5
      np.testing.assert_allclose(state.base[i]["w"], s, rtol=1e-4)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("ff,fr", [(1, 1), (1, 5), (2, 3)])
def test_opposed_objectives_at_derived_ratio(name, ff, fr):
  """n/m = -a^Fr (1 - a^Ff) / (1 - a^Fr), a the base decay.

  Gradient-moment instances (Lion, EMA-SGD): the base at the cycle boundary
  vanishes and the forget delta carries the whole forget moment.
  Squared-gradient instances (RMSprop, Adafactor): no base can vanish (it is a
  convex mix of positive statistics); base and deltas sit at the fixed point
  of theorem1_fixed_point for s = m^2 G^2, n^2 G^2, the base above the smaller
  statistic.
  """
  beta, a, m = 0.9, 0.9, 1.0
  n = -m * a**fr * (1 - a**ff) / (1 - a**fr)
  state = run_cycles(instance(name, beta, a), m, n, ff, fr, cycles=250)
  check_fixed_point(name, state, m, n, beta, a, ff, fr)
  base = np.asarray(state.base[0]["w"])
  if name in ("lion", "sgd"):
    assert np.max(np.abs(base)) < 1e-5
    assert np.min(np.abs(np.asarray(state.deltas[0][0]["w"]))) > 0.1
  else:
    floor = np.minimum(*(statistics(name, c * G)[0] for c in (m, n)))
    assert np.all(base >= floor * (1 - 1e-4))


# --- DualOptim counterparts: decoupled(optax.<optimizer>) --------------------


@pytest.mark.parametrize("use_jit", [False, True])
def test_decoupled_adamw_is_dualoptim_bit_for_bit(use_jit):
  params = jax.tree.map(jnp.asarray, make_params())
  ours = dj.dualoptim(1e-2, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.01)
  theirs = dj.decoupled(optax.adamw(1e-2, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.01))
  upd_ours, upd_theirs = ours.update, theirs.update
  if use_jit:
    upd_ours = jax.jit(upd_ours, static_argnames="objective")
    upd_theirs = jax.jit(upd_theirs, static_argnames="objective")
  s1, s2 = ours.init(params), theirs.init(params)
  p = params
  for n in range(12):
    k = dj.alternating(1, 2)(n)
    g = jax.tree.map(jnp.asarray, grads_for(3, n, k, make_params()))
    u1, s1 = upd_ours(g, s1, p, objective=k)
    u2, s2 = upd_theirs(g, s2, p, objective=k)
    for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    p = optax.apply_updates(p, u1)


@pytest.mark.parametrize("num_objectives", [2, 3])
def test_decoupled_lion_is_independent_lion_runs(num_objectives):
  """Objective k's parameters follow an optax.lion run fed only k's gradients."""
  make = lambda: optax.lion(1e-2, b1=0.9, b2=0.99, weight_decay=1e-3)
  tx = dj.decoupled(make(), num_objectives=num_objectives)
  singles = [make() for _ in range(num_objectives)]
  start = jax.tree.map(jnp.asarray, make_params())
  params, state = start, tx.init(start)
  single_params = [start] * num_objectives
  single_states = [s.init(start) for s in singles]
  sched = cycle(num_objectives)
  for n in range(18):
    k = sched(n)
    g = jax.tree.map(jnp.asarray, grads_for(4, n, k, make_params()))
    u, state = tx.update(g, state, params, objective=k)
    params = optax.apply_updates(params, u)
    u_k, single_states[k] = singles[k].update(g, single_states[k], single_params[k])
    single_params[k] = optax.apply_updates(single_params[k], u_k)
    # Weight decay reads the shared params, so compare the per-objective
    # states, which see only objective k's gradients.
    for a, b in zip(jax.tree.leaves(state.inner_states[k]), jax.tree.leaves(single_states[k])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --- Two conflicting quadratics: where each optimizer comes to rest ----------

H = [np.array([[1.0, 2.0, 0.5], [0.3, 1.0, 2.0]]), np.array([[2.0, 0.5, 1.0], [1.0, 3.0, 0.4]])]
C = [
  np.array([[1.0, -1.0, 2.0], [0.5, 1.5, -2.0]]),
  np.array([[-1.0, 1.0, 0.0], [-0.5, -1.5, 1.0]]),
]
X_STAR = (H[0] * C[0] + H[1] * C[1]) / (H[0] + H[1])  # argmin f_0 + f_1
LO, HI = np.minimum(*C), np.maximum(*C)
X0 = np.where(np.arange(6).reshape(2, 3) % 2 == 0, HI + 1.0, LO - 1.0)


def rest_point(tx, steps=2500):
  """f_k(X) = 1/2 sum H_k (X - C_k)^2; schedule 1/5 with lr_scales (5, 1), so
  one cycle weighs both objectives equally; cosine-decayed learning rate."""
  sched = dj.alternating(1, 5)
  h, c = jnp.asarray(np.stack(H), jnp.float32), jnp.asarray(np.stack(C), jnp.float32)

  def body(i, carry):
    x, state = carry
    k = sched(i)
    u, state = tx.update(h[k] * (x - c[k]), state, x, objective=k)
    return optax.apply_updates(x, u), state

  x = jnp.asarray(X0, jnp.float32)
  run = jax.jit(lambda x, s: jax.lax.fori_loop(0, steps, body, (x, s)))
  return np.asarray(run(x, tx.init(x))[0], np.float64)


def lr(peak, steps=2500):
  return optax.cosine_decay_schedule(peak, steps, alpha=1e-3)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_reaches_the_joint_optimum(nesterov):
  tx = dj.dualoptim_plus_sgd(lr(0.2), nesterov=nesterov, lr_scales=(5.0, 1.0))
  assert np.max(np.abs(rest_point(tx) - X_STAR)) < 2e-2


@pytest.mark.parametrize(
  "name,make",
  [
    ("dualoptim_plus", lambda s: dj.dualoptim_plus(lr(0.05), lr_scales=s)),
    ("dualoptim", lambda s: dj.dualoptim(lr(0.05), lr_scales=s)),
    ("lion", lambda s: dj.dualoptim_plus_lion(lr(0.05), lr_scales=s)),
    ("rmsprop", lambda s: dj.dualoptim_plus_rmsprop(lr(0.05), lr_scales=s)),
    (
      "adafactor",
      lambda s: dj.dualoptim_plus_adafactor(
        lr(0.05), min_dim_size_to_factor=2, multiply_by_parameter_scale=False, lr_scales=s
      ),
    ),
  ],
)
def test_adaptive_instances_come_to_rest_between_the_minima(name, make):
  """Per-objective normalisation makes each objective's step sign-like under
  deterministic gradients, so the cycle's steps cancel wherever the two
  gradients have opposite signs: the box between the two minima (on this
  separable problem, the coordinate-wise Pareto set), which contains but does
  not single out the optimum of the sum. Every coordinate starts 1 outside it.
  """
  x = rest_point(make((5.0, 1.0)))
  outside = np.maximum(LO - x, 0) + np.maximum(x - HI, 0)
  assert np.max(outside) < 1e-2, (name, x)


@pytest.mark.parametrize(
  "make,kw",
  [
    (dj.dualoptim_plus_lion, dict(b1=0.8, b2=0.95, weight_decay=0.1)),
    (dj.dualoptim_plus_sgd, dict(momentum=0.8, nesterov=True)),
    (dj.dualoptim_plus_rmsprop, dict(decay=0.8, eps=1e-3)),
    (dj.dualoptim_plus_adafactor, dict(b2=0.9, min_dim_size_to_factor=4)),
  ],
)
def test_inject_hyperparams_matches_plain_alias(make, kw):
  """Numeric hyperparameters may be traced (optax.inject_hyperparams); the
  structural ones are passed as static_args."""
  static = ("num_objectives", "nesterov", "min_dim_size_to_factor")
  static = tuple(s for s in static if s in kw or s == "num_objectives")
  injected = optax.inject_hyperparams(make, static_args=static)(1e-2, **kw)
  plain = make(1e-2, **kw)
  params = jax.tree.map(jnp.asarray, make_params())
  s1, s2 = injected.init(params), plain.init(params)
  step1 = jax.jit(lambda g, s, k: injected.update(g, s, params, objective=k))
  step2 = jax.jit(lambda g, s, k: plain.update(g, s, params, objective=k))
  for n in range(2):
    k = jnp.int32(n % 2)
    g = jax.tree.map(jnp.asarray, grads_for(5, n, n % 2, make_params()))
    (u1, s1), (u2, s2) = step1(g, s1, k), step2(g, s2, k)
    for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
      # float32 rounding of (1 - b2) traced vs folded: a few ulps.
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-8)
