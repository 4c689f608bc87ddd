"""Tests of the 8-bit block-wise dynamic quantization codec (quantize.py)."""

import json
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dualoptim_jax import quantize as qz
from dualoptim_jax import storage as st

# Jitted once per shape: op-by-op execution compiles every primitive and is
# slow; test_jit_equals_eager covers the eager path.
quantize = jax.jit(qz.quantize_blockwise, static_argnames=("signed", "block_size"))
dequantize = jax.jit(qz.dequantize_blockwise, static_argnames=("signed", "block_size", "dtype"))

F0 = {True: 6, False: 7}  # fraction bits of the top decade
ZERO = {True: 127, False: 0}  # code of 0


def definition_magnitudes(signed):
  """Non-zero magnitudes below 1 straight from the published definition."""
  out = []
  for e in range(6, -1, -1):
    n = 2 ** (F0[signed] - e)
    out += [10.0**-e * (0.1 + 0.9 * (j + 0.5) / n) for j in range(n)]
  return np.array(out)


def nearest_reference(y, signed):
  """Brute force: index of the nearest map value (float64 distances)."""
  m = qz.dynamic_map(signed).astype(np.float64)
  return np.abs(np.asarray(y, np.float64)[..., None] - m).argmin(-1)


def decade_bound(y, signed):
  """Per-element bound on |x_hat - x| / absmax for normalised values y.

  In decade e (10**-(e+1) <= |y| <= 10**-e) the map holds the midpoints of
  2**(F0 - e) equal sub-intervals: error <= 0.45 * 10**-e / 2**(F0 - e).
  Below 1e-7 the nearest value may be 0: error <= |y|.
  """
  u = np.abs(np.asarray(y, np.float64))
  e = np.clip(np.floor(-np.log10(np.maximum(u, 1e-30))), 0, 7)
  # |y| = 10**-k exactly belongs to both decades; take the larger bound.
  bound = 0.45 * 10.0**-e / 2.0 ** (F0[signed] - e)
  bound = np.where(e >= 7, u, bound)
  ulp = 4 * np.finfo(np.float32).eps  # float32 rounding of y and of x_hat
  return bound * (1 + ulp) + ulp * u


def blockwise_absmax(x, block_size):
  """Reference absmax with the documented layout (rows, last axis)."""
  x = np.asarray(x, np.float64)
  rows = x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)
  nb = -(-rows.shape[1] // block_size)
  out = np.stack(
    [np.abs(rows[:, k * block_size : (k + 1) * block_size]).max(1) for k in range(nb)], axis=1
  )
  return out.reshape(*x.shape[:-1], nb) if x.ndim else out.reshape(1)


# --------------------------------------------------------------------------
# The map
# --------------------------------------------------------------------------


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_follows_the_definition(signed):
  m = qz.dynamic_map(signed)
  assert m.shape == (256,) and m.dtype == np.float32
  assert np.all(np.diff(m) > 0)
  assert m[ZERO[signed]] == 0.0 and m[-1] == 1.0
  mags = definition_magnitudes(signed)
  positives = m[ZERO[signed] + 1 : -1]
  # Within one float32 ulp of the exact decimal values.
  np.testing.assert_allclose(positives, mags, rtol=1.2e-7, atol=0)
  if signed:
    np.testing.assert_array_equal(m[:127], -positives[::-1])  # no -1
    assert m[0] == np.float32(-0.99296875)
  # Values per decade: 2**(F0 - e) in [10**-(e+1), 10**-e).
  for e in range(7):
    in_decade = (positives >= 10.0 ** -(e + 1)) & (positives < 10.0**-e)
    assert in_decade.sum() == 2 ** (F0[signed] - e)
  # A fresh copy: the module's map cannot be changed through it.
  m[0] = 5.0
  assert qz.dynamic_map(signed)[0] != 5.0


@pytest.mark.parametrize("signed", [True, False])
def test_decode_of_every_code_is_the_map(signed):
  q = qz.QuantizedArray(codes=jnp.arange(256, dtype=jnp.uint8), absmax=jnp.ones((1,), jnp.float32))
  out = dequantize(q, signed=signed)
  np.testing.assert_array_equal(np.asarray(out), qz.dynamic_map(signed))


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("absmax", [1.0, 3.7, 1e-3, 2.5e-30, 6e25])
def test_exact_round_trip_for_every_code(signed, absmax):
  m = qz.dynamic_map(signed)
  perm = np.random.default_rng(0).permutation(256)
  # Row 0: all codes permuted; row 1: all codes in order.  Each row is one
  # block holding the value 1 * absmax, so its absmax is recovered exactly.
  codes = np.stack([perm, np.arange(256)]).astype(np.uint8)
  x = (m[codes] * np.float32(absmax)).astype(np.float32)
  q = quantize(jnp.asarray(x), signed=signed)
  np.testing.assert_array_equal(np.asarray(q.absmax), np.full((2, 1), np.float32(absmax)))
  np.testing.assert_array_equal(np.asarray(q.codes), codes)
  back = dequantize(q, signed=signed)
  np.testing.assert_array_equal(np.asarray(back), x)


@pytest.mark.parametrize("signed", [True, False])
def test_values_beside_every_midpoint_go_to_the_nearer_code(signed):
  m = qz.dynamic_map(signed).astype(np.float64)
  mids = (m[1:] + m[:-1]) / 2
  below = np.nextafter(mids.astype(np.float32), np.float32(-np.inf))
  above = np.nextafter(mids.astype(np.float32), np.float32(np.inf))
  # Move 8 ulps further from the midpoint: beyond float32 rounding of the
  # arithmetic index, so the nearer code is unambiguous.
  below = (below - 8 * np.spacing(np.abs(below))).astype(np.float32)
  above = (above + 8 * np.spacing(np.abs(above))).astype(np.float32)
  y = np.concatenate([[1.0], below, above]).astype(np.float32)  # 1.0 fixes absmax
  codes = np.asarray(quantize(jnp.asarray(y), signed=signed, block_size=y.size).codes)
  np.testing.assert_array_equal(codes[1:256], np.arange(255))
  np.testing.assert_array_equal(codes[256:], np.arange(1, 256))


@pytest.mark.parametrize("signed", [True, False])
def test_decade_boundary_ties_go_to_the_larger_magnitude(signed):
  m = qz.dynamic_map(signed).astype(np.float64)
  zero = ZERO[signed]
  sizes = [1] + [2 ** (F0[signed] - e) for e in range(6, -1, -1)]
  firsts = zero + np.cumsum(sizes)  # first code of each decade and of 1
  for first in firsts:
    mid = (m[first - 1] + m[first]) / 2
    tie = np.float32(mid)
    if tie != mid:
      continue  # midpoint not representable: no exact tie to test
    y = jnp.asarray([1.0, tie, np.nextafter(tie, np.float32(0))], jnp.float32)
    codes = np.asarray(quantize(y, signed=signed).codes)
    assert codes[1] == first and codes[2] == first - 1


@pytest.mark.parametrize("signed", [True, False])
def test_random_values_get_the_nearest_code(signed):
  rng = np.random.default_rng(1)
  y = rng.standard_normal(20000) * np.exp(3 * rng.standard_normal(20000))
  y = np.clip(y / 50, -1, 1).astype(np.float32)
  y[0] = 1.0  # absmax 1 so the normalised values are y itself
  if not signed:
    y = np.abs(y)
  codes = np.asarray(quantize(jnp.asarray(y), signed=signed, block_size=y.size).codes)
  best = nearest_reference(y, signed)
  m = qz.dynamic_map(signed).astype(np.float64)
  excess = np.abs(m[codes] - y) - np.abs(m[best] - y)
  # Exactly nearest, up to float32 rounding at a midpoint (1 ulp of y).
  assert np.all(excess <= np.spacing(np.abs(y)))


# --------------------------------------------------------------------------
# Error bounds
# --------------------------------------------------------------------------


def _inputs(kind, shape, rng):
  if kind == "normal":
    return rng.standard_normal(shape)
  if kind == "lognormal":
    return rng.lognormal(0.0, 2.0, shape) * rng.choice([-1, 1], shape)
  if kind == "student_t":
    return rng.standard_t(2.0, shape)
  if kind == "cauchy":
    return rng.standard_cauchy(shape)
  raise ValueError(kind)


@pytest.mark.parametrize("kind", ["normal", "lognormal", "student_t", "cauchy"])
@pytest.mark.parametrize("signed", [True, False])
def test_error_within_the_bound_from_the_map_spacing(kind, signed):
  rng = np.random.default_rng(2)
  x = _inputs(kind, (24, 1000), rng).astype(np.float32)  # 1000 = 3 * 256 + 232
  if not signed:
    x = x * x  # a second moment
  q = quantize(jnp.asarray(x), signed=signed)
  x_hat = np.asarray(dequantize(q, signed=signed), np.float64)
  absmax = np.asarray(q.absmax, np.float64)
  np.testing.assert_allclose(absmax, blockwise_absmax(x, 256), rtol=0)
  scale = np.repeat(absmax, 256, axis=1)[:, :1000]
  err = np.abs(x_hat - x)
  y = x / scale
  # Per element: the decade bound; per block: 0.45 / 2**F0 of the absmax.
  assert np.all(err <= decade_bound(y, signed) * scale)
  worst = 0.45 / 2 ** F0[signed] + 4 * np.finfo(np.float32).eps  # + rounding of x_hat
  assert np.all(err <= worst * scale)
  # Per block in L2: the relative error is below the bound built from the
  # same spacing (this is what an optimizer's update sees).
  pad = lambda a: np.pad(a, [(0, 0), (0, 24)]).reshape(24, 4, 256)
  rel = np.linalg.norm(pad(err), axis=-1) / np.linalg.norm(pad(x), axis=-1)
  rel_bound = np.linalg.norm(pad(decade_bound(y, signed) * scale), axis=-1) / np.linalg.norm(
    pad(x), axis=-1
  )
  assert np.all(rel <= rel_bound)
  if kind == "normal":
    # Typical size: uniform rounding error over the top decade's spacing,
    # 0.9 / 2**F0 / sqrt(12) of the absmax (~3 sigma for 256 Gaussians):
    # ~1.2 % (signed) and ~0.6 % (unsigned, on x**2 whose values are smaller).
    assert np.median(rel) < (0.015 if signed else 0.008)


@pytest.mark.parametrize("signed", [True, False])
def test_zero_blocks_and_all_equal_blocks(signed):
  x = np.zeros((3, 512), np.float32)
  x[1, :256] = 2.5  # all-equal block
  x[1, 256:] = 0.0  # zero block in the same row
  x[2, :256] = 1e-30  # tiny but normal all-equal block
  x[2, 256:] = -7.0 if signed else 7.0
  q = quantize(jnp.asarray(x), signed=signed)
  np.testing.assert_array_equal(np.asarray(q.absmax), np.float32([[0, 0], [2.5, 0], [1e-30, 7.0]]))
  codes = np.asarray(q.codes)
  assert np.all(codes[0] == ZERO[signed]) and np.all(codes[1, 256:] == ZERO[signed])
  back = np.asarray(dequantize(q, signed=signed))
  assert np.all(np.isfinite(back))
  np.testing.assert_array_equal(back[0], 0.0)
  np.testing.assert_array_equal(back[1], x[1])  # +c -> code of 1, exact
  np.testing.assert_array_equal(back[2, :256], x[2, :256])
  if signed:  # -c -> the most negative code, -0.99296875 c (no -1 in the map)
    np.testing.assert_array_equal(back[2, 256:], np.float32(-0.99296875) * 7.0)
  else:
    np.testing.assert_array_equal(back[2, 256:], x[2, 256:])


def test_signed_map_never_flips_a_sign():
  rng = np.random.default_rng(3)
  tiny = rng.standard_normal(4095) * np.exp(-rng.uniform(0, 25, 4095))
  x = np.concatenate([[1.0], tiny, [-0.0]]).astype(np.float32)
  q = quantize(jnp.asarray(x), signed=True, block_size=512)
  back = np.asarray(dequantize(q, signed=True, block_size=512))
  assert np.all(np.sign(back) * np.sign(x) >= 0)  # same sign, or 0
  # Everything at least half the smallest map value survives with its sign.
  absmax = np.repeat(np.asarray(q.absmax), 512)[: x.size]
  keep = np.abs(x) >= 2.75e-7 * 1.0001 * absmax
  assert np.all(np.sign(back[keep]) == np.sign(x[keep]))
  assert back[-1] == 0.0 and np.asarray(q.codes)[-1] == 127


def test_unsigned_map_on_nonnegative_inputs():
  rng = np.random.default_rng(4)
  v = rng.standard_normal((8, 700)) ** 2 * np.exp(rng.uniform(-12, 0, (8, 700)))
  v = v.astype(np.float32)
  q = quantize(jnp.asarray(v), signed=False, block_size=128)
  back = np.asarray(dequantize(q, signed=False, block_size=128))
  assert np.all(back >= 0)
  scale = np.repeat(np.asarray(q.absmax), 128, axis=1)[:, :700]
  assert np.all(np.abs(back - v) <= decade_bound(v / scale, False) * scale)
  # The unsigned map is twice as fine as the signed one in the top decade.
  err_u = np.abs(back - v).max()
  signed_back = dequantize(
    quantize(jnp.asarray(v), signed=True, block_size=128), signed=True, block_size=128
  )
  assert err_u < np.abs(np.asarray(signed_back) - v).max()
  # Negative inputs (documented): stored as 0, never as a positive value.
  neg = quantize(jnp.asarray([1.0, -0.5, -1e-3, 0.25]), signed=False)
  np.testing.assert_array_equal(np.asarray(dequantize(neg, signed=False))[1:3], [0.0, 0.0])


# --------------------------------------------------------------------------
# Non-finite values
# --------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("signed", [True, False])
def test_a_non_finite_value_poisons_exactly_its_block(bad, signed):
  rng = np.random.default_rng(5)
  x = np.abs(rng.standard_normal((2, 600))).astype(np.float32)
  if signed:
    x = x * rng.choice([-1, 1], x.shape).astype(np.float32)
  clean = quantize(jnp.asarray(x), signed=signed)
  x[1, 300] = bad  # row 1, block 1 (elements 256..511)
  q = quantize(jnp.asarray(x), signed=signed)
  absmax = np.asarray(q.absmax)
  assert np.isnan(absmax[1, 1])
  back = np.asarray(dequantize(q, signed=signed))
  assert np.all(np.isnan(back[1, 256:512]))  # visible, not clipped or zeroed
  # Every other block is untouched.
  mask = np.ones(absmax.shape, bool)
  mask[1, 1] = False
  np.testing.assert_array_equal(absmax[mask], np.asarray(clean.absmax)[mask])
  other = np.ones(x.shape, bool)
  other[1, 256:512] = False
  np.testing.assert_array_equal(np.asarray(q.codes)[other], np.asarray(clean.codes)[other])
  # Deterministic codes for the poisoned block too.
  again = quantize(jnp.asarray(x), signed=signed)
  np.testing.assert_array_equal(np.asarray(again.codes), np.asarray(q.codes))


# --------------------------------------------------------------------------
# Layout, shapes, dtypes
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
  "shape, block_size, absmax_shape",
  [
    ((3, 1000), 256, (3, 4)),  # 1000 = 3 * 256 + 232: short last block
    ((2, 3, 512), 256, (2, 3, 2)),
    ((7, 100), 256, (7, 1)),  # rows shorter than a block
    ((5,), 2, (3,)),
    ((33,), 1, (33,)),
    ((), 256, (1,)),  # a scalar is one row
    ((4, 0), 256, (4, 0)),
  ],
)
def test_layout_shapes_and_dtypes(shape, block_size, absmax_shape):
  rng = np.random.default_rng(6)
  x = rng.standard_normal(shape).astype(np.float32)
  q = quantize(jnp.asarray(x), signed=True, block_size=block_size)
  assert q.codes.shape == shape and q.codes.dtype == jnp.uint8
  assert q.absmax.shape == absmax_shape and q.absmax.dtype == jnp.float32
  if x.size:
    np.testing.assert_array_equal(
      np.asarray(q.absmax), blockwise_absmax(x, block_size).astype(np.float32)
    )
  back = dequantize(q, signed=True, block_size=block_size)
  assert back.shape == shape and back.dtype == jnp.float32
  # Each block is quantized on its own: equal to quantizing the block alone.
  if len(shape) == 2 and x.size:
    k = absmax_shape[-1] - 1
    alone = quantize(
      jnp.asarray(x[1, k * block_size : (k + 1) * block_size]), signed=True, block_size=block_size
    )
    np.testing.assert_array_equal(np.asarray(q.codes)[1, k * block_size :], np.asarray(alone.codes))


def test_low_precision_inputs_and_output_dtype():
  x = jnp.linspace(-3, 3, 1024, dtype=jnp.bfloat16).reshape(2, 512)
  q = quantize(x, signed=True)
  assert q.codes.dtype == jnp.uint8 and q.absmax.dtype == jnp.float32
  back = dequantize(q, signed=True, dtype=jnp.bfloat16)
  assert back.dtype == jnp.bfloat16
  np.testing.assert_allclose(
    np.asarray(back, np.float32), np.asarray(x, np.float32), atol=0.45 / 64 * 3 + 0.02
  )


def test_bad_arguments_name_the_value():
  x = jnp.ones((4, 4))
  with pytest.raises(ValueError, match="block_size.*0"):
    quantize(x, signed=True, block_size=0)
  with pytest.raises(TypeError, match="int32"):
    quantize(jnp.ones((4,), jnp.int32), signed=True)
  q = quantize(x, signed=True, block_size=2)
  with pytest.raises(ValueError, match=r"absmax has shape \(4, 2\)"):
    dequantize(q, signed=True, block_size=4)


@pytest.mark.parametrize("signed", [True, False])
def test_jit_equals_eager(signed):
  rng = np.random.default_rng(7)
  x = rng.standard_t(3.0, (16, 700)).astype(np.float32)
  if not signed:
    x = x * x
  fq = jax.jit(lambda x: qz.quantize_blockwise(x, signed=signed, block_size=128))
  with jax.disable_jit():
    eager = qz.quantize_blockwise(jnp.asarray(x), signed=signed, block_size=128)
  jitted = fq(jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(jitted.absmax), np.asarray(eager.absmax))
  ce, cj = np.asarray(eager.codes), np.asarray(jitted.codes)
  # Codes agree except where float32 rounding of the index arithmetic may
  # differ (fused multiply-adds): within one ulp of a midpoint of the map.
  m = qz.dynamic_map(signed).astype(np.float64)
  y = (x / np.repeat(np.asarray(eager.absmax), 128, axis=1)[:, :700]).astype(np.float64)
  differ = ce != cj
  assert np.all(np.abs(ce.astype(int) - cj.astype(int))[differ] == 1)
  mid = (m[np.minimum(ce, cj)] + m[np.maximum(ce, cj)]) / 2
  assert np.all(np.abs(y - mid)[differ] <= 2 * np.spacing(np.abs(y[differ])))
  assert differ.mean() < 1e-3
  fd = jax.jit(lambda q: qz.dequantize_blockwise(q, signed=signed, block_size=128))
  with jax.disable_jit():
    eager_back = qz.dequantize_blockwise(jitted, signed=signed, block_size=128)
  np.testing.assert_array_equal(np.asarray(fd(jitted)), np.asarray(eager_back))


def test_update_round_trip_under_jit_with_donation():
  """decode -> EMA -> encode in one jitted step, as the optimizer does."""
  rng = np.random.default_rng(8)
  g = jnp.asarray(rng.standard_normal((32, 512)).astype(np.float32))
  spec = st.MomentSpec(quantized=True, signed=True)

  @jax.jit
  def step(m, g):
    return spec.encode(0.9 * spec.decode(m) + 0.1 * g)

  m8, m32 = spec.init(g), jnp.zeros_like(g)
  for _ in range(20):
    m8, m32 = step(m8, g), 0.9 * m32 + 0.1 * g
  # Each re-encode errs by at most 0.45/64 of the block's absmax, and the EMA
  # damps old errors by 0.9 per step: e <- 0.9 e + d, so |e| <= 0.45/64 / 0.1
  # of the largest absmax.  (Near a fixed point the rounding can stall the
  # EMA that far from the float32 one, as in bitsandbytes.)
  absmax = np.asarray(m8.absmax).max()
  err = np.abs(np.asarray(spec.decode(m8)) - np.asarray(m32)).max()
  assert err <= 0.45 / 64 / 0.1 * absmax * 1.0001
  assert err > 0  # the codec is lossy: the comparison above is not vacuous


# --------------------------------------------------------------------------
# Storage specs and byte counts
# --------------------------------------------------------------------------


def test_choose_8bit_uses_the_global_size():
  assert st.choose_8bit((64, 64)) and st.choose_8bit((4096,))
  assert not st.choose_8bit((4095,)) and not st.choose_8bit(())
  assert st.choose_8bit((10,), min_8bit_size=10)
  assert st.choose_8bit((), min_8bit_size=0)
  with pytest.raises(ValueError, match="min_8bit_size.*-1"):
    st.choose_8bit((4,), min_8bit_size=-1)


def test_moment_spec_storage():
  w = jax.ShapeDtypeStruct((128, 300), jnp.bfloat16)
  b = jax.ShapeDtypeStruct((300,), jnp.bfloat16)
  sw = st.MomentSpec.for_shape(w.shape, signed=False, state_bits=8)
  sb = st.MomentSpec.for_shape(b.shape, signed=False, state_bits=8)
  s32 = st.MomentSpec.for_shape(w.shape, signed=True, state_bits=32, dtype=jnp.float32)
  assert sw.quantized and not sb.quantized and not s32.quantized
  zw, zb, z32 = sw.init(w), sb.init(b), s32.init(w)
  assert isinstance(zw, qz.QuantizedArray) and zw.absmax.shape == (128, 2)
  np.testing.assert_array_equal(np.asarray(sw.decode(zw)), 0.0)
  assert zb.dtype == jnp.bfloat16 and z32.dtype == jnp.float32  # dtype=None: param's
  x = jnp.abs(jax.random.normal(jax.random.key(0), w.shape))
  np.testing.assert_array_equal(
    np.asarray(sw.decode(sw.encode(x))),
    np.asarray(dequantize(quantize(x, signed=False), signed=False)),
  )
  assert s32.encode(x.astype(jnp.bfloat16)).dtype == jnp.float32
  row = x[0]
  assert sb.encode(row) is row and sb.decode(row) is row
  # Static and hashable; a pytree leaf, so a spec tree mirrors the params.
  assert hash(sw) == hash(st.MomentSpec(True, False, 256, None))
  specs = jax.tree.map(
    lambda p: st.MomentSpec.for_shape(p.shape, signed=True, state_bits=8), {"w": w, "b": b}
  )
  assert jax.tree.structure(specs) == jax.tree.structure({"w": 0, "b": 0})
  state = jax.tree.map(lambda s, p: s.init(p), specs, {"w": w, "b": b})
  decoded = jax.tree.map(lambda s, m: s.decode(m), specs, state)
  assert decoded["w"].shape == w.shape and decoded["b"].shape == b.shape
  with pytest.raises(TypeError, match="quantized"):
    sw.decode(jnp.zeros(w.shape))
  with pytest.raises(ValueError, match="state_bits.*16"):
    st.MomentSpec.for_shape(w.shape, signed=True, state_bits=16)
  with pytest.raises(ValueError, match="block_size.*-4"):
    st.MomentSpec(quantized=True, block_size=-4)


def test_state_nbytes_of_a_100m_parameter_layout_without_allocating():
  params = {
    "embed": jax.ShapeDtypeStruct((32768, 1024), jnp.float32),
    "layers": [
      {
        "w_in": jax.ShapeDtypeStruct((1024, 4000), jnp.float32),  # 4000 % 256 != 0
        "w_out": jax.ShapeDtypeStruct((4000, 1024), jnp.float32),
        "norm": jax.ShapeDtypeStruct((1024,), jnp.float32),
      }
      for _ in range(8)
    ],
  }
  n_params = sum(math.prod(p.shape) for p in jax.tree.leaves(params))
  assert 97e6 < n_params < 103e6

  def init(params, bits):
    def leaf(p):
      spec = st.MomentSpec.for_shape(p.shape, signed=True, state_bits=bits)
      return spec.init(p)

    return {"count": jnp.zeros([], jnp.int32), "mu": jax.tree.map(leaf, params)}

  state8 = jax.eval_shape(lambda: init(params, 8))
  state32 = jax.eval_shape(lambda: init(params, 32))
  assert all(isinstance(l, jax.ShapeDtypeStruct) for l in jax.tree.leaves(state8))

  def analytic(shape):
    if math.prod(shape) < 4096:  # stays float32
      return 4 * math.prod(shape)
    rows, cols = math.prod(shape[:-1]), shape[-1]
    return rows * cols + 4 * rows * math.ceil(cols / 256)

  expected8 = 4 + sum(analytic(p.shape) for p in jax.tree.leaves(params))
  assert qz.state_nbytes(state8) == expected8
  assert qz.state_nbytes(state32) == 4 + 4 * n_params
  # ~1 byte + 4 bytes per 256 (a bit more for the short blocks of 4000-rows).
  assert 1.0156 <= expected8 / n_params < 1.018
  # Concrete arrays, NumPy arrays, PRNG keys and Python scalars count too.
  assert (
    qz.state_nbytes(
      [jnp.zeros((3, 5), jnp.bfloat16), np.zeros(4, np.int8), jax.random.key(0), None, 1.5]
    )
    == 30 + 4 + 8 + 8
  )


# --------------------------------------------------------------------------
# Sharding: no collective for states sharded like their parameter
# --------------------------------------------------------------------------

_SHARDING_SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from dualoptim_jax import quantize as qz

    COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute",
                   "reduce-scatter")

    def check(mesh_shape, x_shape, spec, absmax_spec):
      mesh = Mesh(np.array(jax.devices()).reshape(mesh_shape), ("fsdp", "tp"))
      sh = qz.QuantizedArray(NamedSharding(mesh, spec), NamedSharding(mesh, absmax_spec))
      x = jax.device_put(jax.random.normal(jax.random.key(0), x_shape), sh.codes)
      m = jax.jit(lambda x: qz.quantize_blockwise(0.5 * x, signed=True),
                  out_shardings=sh)(x)

      def step(m, g):
        new = 0.9 * qz.dequantize_blockwise(m, signed=True) + 0.1 * g
        return qz.quantize_blockwise(new, signed=True)

      f = jax.jit(step, out_shardings=sh)
      hlo = f.lower(m, x).compile().as_text()
      out = f(m, x)
      ref = step(jax.device_get(m), jax.device_get(x))
      return dict(
          collectives=[c for c in COLLECTIVES if c in hlo],
          codes_sharding_kept=out.codes.sharding.is_equivalent_to(sh.codes, 2),
          equal=bool(np.array_equal(np.asarray(out.codes), np.asarray(ref.codes))),
      )

    print(json.dumps(dict(
        # FSDP on rows, tensor parallel on columns with 512 = 2 blocks per shard.
        aligned=check((4, 2), (64, 1024), P("fsdp", "tp"), P("fsdp", "tp")),
        # Column shards of 128 < 256: blocks straddle devices.
        straddling=check((2, 4), (64, 512), P("fsdp", "tp"), P("fsdp", None)),
    )))
""")


def test_sharded_like_the_parameter_needs_no_collective():
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run(
    [sys.executable, "-c", _SHARDING_SCRIPT], env=env, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  aligned, straddling = result["aligned"], result["straddling"]
  assert aligned["collectives"] == [], aligned
  assert aligned["codes_sharding_kept"] and aligned["equal"]
  # The check can fail: shards that split a block do need communication.
  assert straddling["collectives"], straddling
  assert straddling["equal"]


def test_rows_are_cut_into_blocks_without_a_padded_copy():
  """A row of 576 in blocks of 256 (two whole blocks and a short one) is coded
  in place: the compiled program holds no float32 copy of the input padded to
  768 (which the block reduction would have to materialise)."""
  x = jax.ShapeDtypeStruct((576, 576), jnp.float32)
  program = jax.jit(lambda x: quantize(x * 2.0 + 1.0, signed=True)).lower(x).compile()
  assert program.memory_analysis().temp_size_in_bytes < 576 * 576 * 4 / 2
