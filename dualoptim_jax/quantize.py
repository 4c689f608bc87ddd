r"""8-bit block-wise dynamic quantization of optimizer states.

This is the codec of Dettmers et al., "8-bit Optimizers via Block-wise
Quantization" (ICLR 2022), as bitsandbytes implements it, in pure JAX:

* every value is normalised by the largest magnitude (``absmax``) of its block
  and replaced by the index of the **nearest** value of the 256-entry *dynamic
  (tree) map* (:func:`dynamic_map`);
* the map is *signed* for statistics that can be negative (first moments, the
  delta second moments of DualOptim+) and *unsigned* for non-negative ones
  (second moments);
* one float32 ``absmax`` is kept per block of ``block_size`` elements (256 by
  default, bitsandbytes' current optimizer default), so the state costs
  ``1 + 4 / block_size`` bytes per element instead of 4.

Block layout (the sharding rule)
--------------------------------
Blocks are contiguous runs of ``block_size`` elements along the **last axis of
each row**; the last block of a row is short when ``block_size`` does not divide
the row length.  A scalar or a 1-D array is a single row.  For ``x`` of shape
``(*lead, n)`` the codes have exactly ``x``'s shape (uint8) and the scales have
shape ``(*lead, ceil(n / block_size))`` (float32).  Consequences:

* a state sharded like its parameter along any *leading* axis is quantized and
  dequantized shard-locally (no all-gather, no collective at all);
* sharding along the *last* axis is also shard-local when the shard length is a
  multiple of ``block_size`` (then no block straddles two devices);
* whether a tensor is quantized at all is decided from its *global* shape
  (:func:`dualoptim_jax.storage.choose_8bit`; under ``jax.jit`` shapes are global), never from a local
  shard, so every shard of a tensor agrees.  (bitsandbytes flattens the tensor
  and decides per local shard, which breaks both properties under FSDP.)

Non-finite values
-----------------
A NaN or ±Inf anywhere in a block makes that block's stored ``absmax`` NaN, so
the **whole block dequantizes to NaN**.  A non-finite optimizer state means the
run has already diverged; in float32 the NaN would propagate into the
parameters, and the 8-bit state keeps it visible in the same way instead of
silently clipping it to ``±absmax`` or zeroing it.  The codes of such a block
are deterministic but carry no information.

Accuracy
--------
Rounding is to the nearest map value, so an element's error is at most half
the local spacing: at most 0.70 % (signed map) / 0.35 % (unsigned) of its
block's absmax, finer for smaller elements (see :func:`quantize_blockwise`).
Measured on blocks of 256: relative L2 error per block ~1.1 % for Gaussian
values with the signed map, ~0.6 % for their squares with the unsigned map.
A state that is decoded, updated and re-encoded every step accumulates these
errors like any other perturbation of an EMA with decay :math:`\beta`: the
stored EMA stays within :math:`0.45 \cdot 2^{-F_0} a / (1 - \beta)` of its
exact value (:math:`a` the largest absmax seen), and an increment smaller than
half a code spacing leaves the code unchanged (as in bitsandbytes, which also
rounds to nearest).

Speed
-----
Both directions are short chains of elementwise arithmetic and selects, with no
gather and no 256-way comparison, so XLA fuses them into the surrounding update
and never materialises a float32 copy of a quantized state:

* decode: the map value of a code has the closed form of :func:`dynamic_map`,
  evaluated with one multiply after a select among 7 or 8 scales;
* encode: 8 comparisons against the exact decision thresholds between decades
  find the decade, and the index inside a decade (where the map is linear) is a
  ``floor`` of an affine function;
* the block absmax is one fused max/min reduction.

Why not a lookup table: on XLA:CPU a gather is not fused into its consumers,
so every lookup would write a full-size temporary; recomputing the decode in
each consumer measured faster.  The codec is compute-bound (about 25 vector
operations per decoded and 50 per encoded element) where a float32 EMA is
memory-bound: on a shared 2-core CPU an 8-bit EMA step costs ~4x a float32 one
and an 8-bit Adam update ~2-3x a float32 Adam update
(``benchmarks/bench_quantize.py``).  Accelerators, with far more arithmetic
per byte of memory traffic, should pay relatively less (not measured here).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
  "QuantizedArray",
  "dynamic_map",
  "quantize_blockwise",
  "dequantize_blockwise",
  "absmax_shape",
  "zero_code",
  "state_nbytes",
]

_NUM_CODES = 256
# Code of the value 0 in each map (the maps are sorted ascending).
_ZERO_CODE = {True: 127, False: 0}
# Fraction bits of the top decade (E = 0 exponent bits): 8 bits minus the
# indicator bit and, for the signed map, the sign bit.
_TOP_FRACTION_BITS = {True: 6, False: 7}


def _scales(signed: bool) -> list[np.float32]:
  """``P_E = 5**E / (20 * 10**F0)`` for ``E = 0 .. F0`` (float32)."""
  f0 = _TOP_FRACTION_BITS[signed]
  return [np.float32(5.0**e / (20.0 * 10.0**f0)) for e in range(f0 + 1)]


def _build_map(signed: bool) -> np.ndarray:
  """The sorted dynamic map; see :func:`dynamic_map` for the derivation."""
  f0 = _TOP_FRACTION_BITS[signed]
  scales = _scales(signed)
  magnitudes = []
  # Position q = 2**E + j of the j-th value of the segment with E fraction bits
  # (2**E values); the unsigned map's segments start at E = 1.
  for e in range(0 if signed else 1, f0 + 1):
    q = np.arange(2**e, 2 ** (e + 1), dtype=np.float32)
    k = np.float32(18) * q + np.float32(9 - 16 * 2**e)  # exact integers
    magnitudes.append(k * scales[e])  # one float32 rounding, as in the decoder
  pos = np.concatenate(magnitudes)
  if signed:
    values = np.concatenate([-pos[::-1], [0.0], pos, [1.0]])
  else:
    values = np.concatenate([[0.0], pos, [1.0]])
  values = values.astype(np.float32)
  assert values.shape == (_NUM_CODES,) and np.all(np.diff(values) > 0)
  values.flags.writeable = False
  return values


_MAPS = {True: _build_map(True), False: _build_map(False)}


def dynamic_map(signed: bool) -> np.ndarray:
  r"""The 256 values of the dynamic (tree) quantization map, sorted ascending.

  Derivation (Dettmers, "8-Bit Approximations for Parallelism in Deep
  Learning", 2016; Dettmers et al., 2022, Sec. 2.2).  An 8-bit pattern is read
  from the left as

  1. a **sign bit** (signed map only);
  2. a run of :math:`e` **zero bits**, the decimal exponent: scale
     :math:`10^{-e}`;
  3. an **indicator bit** 1 that ends the exponent;
  4. the remaining :math:`F` bits, a **linear fraction** :math:`j \in [0, 2^F)`
     that picks the midpoint of one of :math:`2^F` equal sub-intervals of
     :math:`[0.1, 1]`:

  .. math::

     v = \pm 10^{-e} \left(0.1 + 0.9\,\frac{j + 1/2}{2^F}\right),
     \qquad F = F_0 - e, \quad F_0 = 6 \ \text{(signed)}, \ 7 \ \text{(unsigned)}.

  :math:`e` runs from 0 to 6 (with :math:`e = 7` no bit is left for the
  indicator).  The signed map therefore has :math:`2^{6-e}` values per decade
  and sign, :math:`64 + 32 + \dots + 1 = 127` per sign; the unsigned map, whose
  sign bit becomes one more fraction bit, has :math:`2^{7-e}` per decade,
  :math:`128 + \dots + 2 = 254` in all.  The two patterns without an indicator
  bit (all zeros after the sign) encode :math:`0` and, in place of a redundant
  :math:`-0`, :math:`1` (so an element equal to its block's absmax is exact).
  Hence the signed map contains :math:`0` and :math:`+1` but not :math:`-1`
  (its most negative value is :math:`-0.99296875`), exactly as bitsandbytes'
  ``create_dynamic_map``; the smallest non-zero magnitudes are
  :math:`5.5 \cdot 10^{-7}` (signed) and :math:`3.25 \cdot 10^{-7}` (unsigned).

  Closed form used by the codec: number the magnitudes of one sign from the
  smallest, :math:`q = 2^F + j` (so :math:`F = \lfloor \log_2 q \rfloor`);
  substituting :math:`e = F_0 - F` gives

  .. math::

     v(q) = \frac{18 q + 9 - 16 \cdot 2^F}{20 \cdot 2^F\, 10^{F_0 - F}}
          = K(q)\, P_F, \qquad P_F = \frac{5^F}{20 \cdot 10^{F_0}},

  with :math:`K(q)` an exact small integer.  The float32 values returned are
  :math:`\mathrm{fl}(K(q) \cdot \mathrm{fl}(P_F))`, within one ulp of the exact
  decimals and bit-identical to what :func:`dequantize_blockwise` computes.

  The code stored by :func:`quantize_blockwise` is the index into this sorted
  array (as in bitsandbytes), not the bit pattern above, so codes are monotone
  in value.

  Args:
    signed: the signed map (first moments, delta second moments) or the
      unsigned map (non-negative second moments).

  Returns:
    A fresh float32 array of shape ``(256,)``.
  """
  return _MAPS[bool(signed)].copy()


def _segment_thresholds(signed: bool) -> list[np.float32]:
  """The 8 decision thresholds between the segments of non-negative values.

  Segments in increasing order: ``{0}``, decades ``e = 6, ..., 0``, ``{1}``.  A
  threshold is the smallest float32 not below the exact midpoint of the two
  map values it separates, so a magnitude goes to the nearer one and an exact
  tie to the larger.
  """
  positives = _MAPS[signed][_ZERO_CODE[signed] :].astype(np.float64)
  f0 = _TOP_FRACTION_BITS[signed]
  sizes = [1] + [2 ** (f0 - e) for e in range(6, -1, -1)] + [1]
  firsts = np.cumsum(sizes)[:-1]  # index of each segment's first value but 0
  mids = (positives[firsts - 1] + positives[firsts]) / 2  # exact in float64
  out = []
  for mid in mids:
    t = np.float32(mid)
    if t < mid:
      t = np.nextafter(t, np.float32(np.inf))
    out.append(t)
  return out


_THRESHOLDS = {True: _segment_thresholds(True), False: _segment_thresholds(False)}


def _encode(y: jax.Array, signed: bool) -> jax.Array:
  r"""uint8 index of the map value nearest to each float32 ``y``.

  ``y`` is meant to lie in [-1, 1]; larger magnitudes and Inf get the code of
  :math:`\pm 1` (the most negative code for :math:`-1`), NaN the code of 0.
  With the unsigned map negative values get the code of 0.

  Segment ``s`` of the magnitude ``u`` (the number of thresholds ``<= u``,
  found with 8 comparisons) is the decade :math:`e = 7 - s` for ``s`` in 1..7,
  holding :math:`n = 2^{F_0 - e}` values whose decision boundaries are
  :math:`10^{-e}(0.1 + 0.9 k / n)`; the nearest one inside the decade is

  .. math::  j = \operatorname{clip}\!\left(\left\lfloor
             (10^{e+1} u - 1)\, n / 9 \right\rfloor,\ 0,\ n - 1\right)

  (the clip covers the parts of the segment beyond the decade's first and
  last value), and the magnitude's position is ``n + j`` (signed) or
  ``n - 1 + j`` (unsigned).  Segment 0 (``{0}``) and 8 (``{1}``) fall out of
  the same formula with :math:`n = 2^{s - 1}` (``2^s`` unsigned) and a zero
  scale.  Only magnitudes within float32 rounding of a boundary *inside* a
  decade may be sent to the farther neighbour; decade boundaries are exact.
  """
  f0 = _TOP_FRACTION_BITS[signed]
  # No clamp needed: above the last threshold (rounding above 1, Inf) the
  # scale is 0, and for NaN every comparison fails, giving the code of 0.
  u = jnp.abs(y)
  first_log2n = f0 - 7  # log2 n of segment 0: -1 (signed) or 0 (unsigned)
  n = jnp.full(y.shape, np.float32(2.0**first_log2n))
  ten = jnp.zeros(y.shape, jnp.float32)
  for s, t in enumerate(_THRESHOLDS[signed], start=1):
    above = u >= t
    n = jnp.where(above, np.float32(2.0 ** (first_log2n + s)), n)
    # 10**(e + 1) with e = 7 - s; 0 in the segment {1} (so j = 0 there).
    ten = jnp.where(above, np.float32(10.0 ** (8 - s) if s < 8 else 0.0), ten)
  j = jnp.floor((u * ten - 1.0) * (n * np.float32(1 / 9)))
  # Clips written as selects: jnp.maximum/minimum propagate NaN, which costs
  # several instructions each on x86.
  j = jnp.where(j > 0.0, j, 0.0)
  top = n - 1.0
  j = jnp.where(j < top, j, top)
  position = n + j if signed else n + j - 1.0
  if signed:
    # 127 +- position; -128 (there is no -1 in the map) is raised to -127.
    code = _ZERO_CODE[True] + _copysign(position, y)
    code = jnp.where(code > 0.0, code, 0.0)
  else:
    code = jnp.where(y < 0, 0.0, position)
  return _small_float_to_uint8(code)


def _copysign(magnitude: jax.Array, sign_of: jax.Array) -> jax.Array:
  """``magnitude`` (>= 0) with the sign bit of ``sign_of``: two bit operations."""
  as_int = lambda v: jax.lax.bitcast_convert_type(v, jnp.int32)
  bits = as_int(magnitude) | (as_int(sign_of) & np.int32(-(2**31)))
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _small_float_to_uint8(v: jax.Array) -> jax.Array:
  """Exact integers 0..255 held in float32 -> uint8.

  Adding 2**23 puts the integer in the low mantissa bits, which a truncating
  integer cast keeps; cheaper than the saturating float->int conversion.
  """
  bits = jax.lax.bitcast_convert_type(v + np.float32(2**23), jnp.int32)
  return bits.astype(jnp.uint8)


def _decode(codes: jax.Array, signed: bool) -> jax.Array:
  """float32 map values of uint8 codes: the closed form of :func:`dynamic_map`."""
  f0 = _TOP_FRACTION_BITS[signed]
  scales = _scales(signed)
  c = codes.astype(jnp.float32)
  if signed:
    d = c - _ZERO_CODE[True]
    q = jnp.abs(d)  # position among the magnitudes of one sign; 0 is zero
  else:
    q = c + 1.0  # 1 is zero, 2 .. 255 the magnitudes, 256 is one
  # 2**floor(log2 q): keep only the exponent bits of q.
  n = jax.lax.bitcast_convert_type(
    jax.lax.bitcast_convert_type(q, jnp.int32) & 0x7F800000, jnp.float32
  )
  k = 18.0 * q + 9.0 - 16.0 * n  # exact integer
  scale = jnp.zeros(codes.shape, jnp.float32)  # 0 for the zero code
  for e in range(0 if signed else 1, f0 + 1):
    scale = jnp.where(q >= 2**e, scales[e], scale)
  v = jnp.where(q >= 2 ** (f0 + 1), 1.0, k * scale)
  return _copysign(v, d) if signed else v


class QuantizedArray(NamedTuple):
  """A block-wise 8-bit array (a pytree with two leaves).

  Attributes:
    codes: uint8, exactly the source array's shape; indices into
      :func:`dynamic_map`.
    absmax: float32, shape ``(*shape[:-1], ceil(shape[-1] / block_size))``
      (``(1,)`` for a scalar): the largest magnitude of each block, NaN for a
      block holding a non-finite value.
  """

  codes: jax.Array
  absmax: jax.Array


def _check_block_size(block_size: int) -> None:
  if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
    raise ValueError(f"block_size must be a positive int, got {block_size!r}")


def _num_blocks(n: int, block_size: int) -> int:
  return -(-n // block_size)


def _row_parts(x: jax.Array, block_size: int) -> list[jax.Array]:
  """``(*lead, n)`` rows as blocks: ``(*lead, n // b, b)`` whole ones, then ``(*lead, 1, n % b)``.

  Either part is left out when empty (a row shorter than one block is one
  block of its own length). Nothing is padded: a padded copy would be a
  float32 temporary of the whole moment, since the block reduction needs it
  materialised, where the two parts fuse with their producer and consumer.
  """
  if x.ndim == 0:
    x = x.reshape(1)
  *lead, n = x.shape
  whole = n // block_size * block_size
  parts = []
  if whole or not n:  # an empty row is no blocks, not no parts
    parts.append(x[..., :whole].reshape(*lead, whole // block_size, block_size))
  if whole < n:
    parts.append(x[..., whole:].reshape(*lead, 1, n - whole))
  return parts


def _join_rows(parts: list[jax.Array], shape: tuple[int, ...]) -> jax.Array:
  """Inverse of :func:`_row_parts`."""
  rows = [p.reshape(*p.shape[:-2], -1) for p in parts]
  return (rows[0] if len(rows) == 1 else jnp.concatenate(rows, axis=-1)).reshape(shape)


def absmax_shape(shape: tuple[int, ...], block_size: int) -> tuple[int, ...]:
  """Shape of the block scales of an array of ``shape``: ``(*shape[:-1], n_blocks)``."""
  _check_block_size(block_size)
  n = shape[-1] if shape else 1
  return (*shape[:-1], _num_blocks(n, block_size))


def zero_code(signed: bool) -> int:
  """The code of the value 0 in the signed or unsigned map."""
  return _ZERO_CODE[bool(signed)]


def quantize_blockwise(x: jax.Array, *, signed: bool, block_size: int = 256) -> QuantizedArray:
  r"""Quantizes ``x`` to 8 bits with per-block absmax scaling.

  For each block :math:`B` (see the module docstring for the layout),

  .. math::

     a_B = \max_{i \in B} |x_i|, \qquad
     c_i = \operatorname*{arg\,min}_k \left| M_k - x_i / a_B \right|,

  with :math:`M` = :func:`dynamic_map` (``signed``).  Nearness is in value.
  An exact tie goes to the larger magnitude; between two codes of the same
  decade the index is computed arithmetically, so a value within about one
  float32 ulp of their midpoint may go to either (deterministically for a given
  compiled program; ``jax.jit`` and op-by-op execution can differ there).  A
  block of zeros stores :math:`a_B = 0` and the code of 0; the sign of a value
  is never flipped (tiny values round to 0).  With the unsigned map, negative
  values are stored as 0.  Non-finite values: see the module docstring.

  Error bound, from the map's spacing: a normalised magnitude in decade
  :math:`e` (:math:`10^{-e-1} \le |x_i| / a_B \le 10^{-e}`, :math:`e \le 6`)
  is within half a sub-interval of a map value, because that decade holds the
  midpoints of its :math:`2^{F_0 - e}` equal sub-intervals, so

  .. math::

     |\hat x_i - x_i| \le \frac{0.45 \cdot 10^{-e}}{2^{F_0 - e}}\, a_B
     \le \frac{0.45}{2^{F_0}}\, a_B,

  with :math:`2^{F_0} = 64` (signed) or 128 (unsigned): at most 0.70 %
  (signed) / 0.35 % (unsigned) of the block's absmax, and at most
  :math:`4.5 / 2^{F_0}` (7.0 % / 3.5 %) of :math:`|x_i|` itself in the top
  decade.  Magnitudes below :math:`10^{-7} a_B` may round to 0.

  Args:
    x: a floating array of any shape (computed in float32).
    signed: which map to use (keyword-only, static).
    block_size: elements per block along the last axis (static, >= 1).

  Returns:
    A :class:`QuantizedArray`.
  """
  _check_block_size(block_size)
  signed = bool(signed)
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"quantize_blockwise needs a floating array, got {x.dtype}")
  parts = _row_parts(x.astype(jnp.float32), block_size)
  scales = [_block_absmax(p) for p in parts]
  codes = [_encode(p * _reciprocal(a)[..., None], signed) for p, a in zip(parts, scales)]
  absmax = scales[0] if len(scales) == 1 else jnp.concatenate(scales, axis=-1)
  return QuantizedArray(codes=_join_rows(codes, x.shape), absmax=absmax)


def _block_absmax(blocks: jax.Array) -> jax.Array:
  """Largest magnitude per block (the last axis); NaN for a block holding a non-finite value."""
  # One variadic max/min reduction instead of max(abs(x)): XLA:CPU fuses the
  # producer of x (e.g. decode -> EMA) into it, where a plain max would be
  # handed to a library kernel that needs x materialised in float32.
  hi, lo = jax.lax.reduce(
    (blocks, blocks),
    (np.float32(-np.inf), np.float32(np.inf)),
    _max_min,
    (blocks.ndim - 1,),
  )
  absmax = jnp.maximum(hi, -lo)
  return jnp.where(jnp.isfinite(absmax), absmax, jnp.nan)


def _max_min(a: tuple, b: tuple) -> tuple:
  # A module-level function, not a lambda: run eagerly, the reduction is cached
  # by its computation's identity, and a fresh lambda compiled at every call.
  return jnp.maximum(a[0], b[0]), jnp.minimum(a[1], b[1])


def _reciprocal(absmax: jax.Array) -> jax.Array:
  # Multiplying by it is cheaper than dividing.  Zero, subnormal and NaN
  # scales give 0 so the codes stay finite and deterministic.
  return jnp.where(absmax >= np.finfo(np.float32).tiny, 1.0 / absmax, 0.0)


def dequantize_blockwise(
  q: QuantizedArray,
  *,
  signed: bool,
  block_size: int = 256,
  dtype: Any = jnp.float32,
) -> jax.Array:
  r"""Inverse of :func:`quantize_blockwise`: :math:`\hat x_i = M_{c_i} a_B`.

  Args:
    q: the quantized array.
    signed: the map it was quantized with (static).
    block_size: the block size it was quantized with (static).
    dtype: dtype of the result.

  Returns:
    An array of ``q.codes``'s shape.
  """
  _check_block_size(block_size)
  shape = q.codes.shape
  expected = absmax_shape(shape, block_size)
  if q.absmax.shape != expected:
    raise ValueError(
      f"absmax has shape {q.absmax.shape}, expected {expected} for codes of"
      f" shape {shape} and block_size={block_size}"
    )
  parts, start = [], 0
  for codes in _row_parts(q.codes, block_size):
    scales = q.absmax[..., start : start + codes.shape[-2]]
    start += codes.shape[-2]
    parts.append(_decode(codes, bool(signed)) * scales[..., None].astype(jnp.float32))
  return _join_rows(parts, shape).astype(dtype)


def state_nbytes(tree: Any) -> int:
  """Bytes held by the arrays of a pytree: sum of ``size * itemsize``.

  Works on concrete arrays, NumPy arrays and ``jax.ShapeDtypeStruct`` leaves,
  so ``state_nbytes(jax.eval_shape(tx.init, params))`` counts an optimizer
  state without allocating it.  Python scalars count as NumPy would store them.
  """
  total = 0
  for leaf in jax.tree.leaves(tree):
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
      dtype = leaf.dtype  # np.dtype, or a JAX extended dtype (PRNG keys)
      itemsize = getattr(dtype, "itemsize", None) or np.dtype(dtype).itemsize
      total += math.prod(leaf.shape) * itemsize
    else:
      total += np.asarray(leaf).nbytes
  return int(total)
