"""Where optimizer moments live: float arrays or 8-bit block-wise codes.

A storage policy (:data:`StoragePolicy`) picks, for every moment leaf, a
:class:`MomentCodec` from static facts only (the parameter's path, the moment's
*global* shape, whether it is a base or a delta, whether its value is never
negative). The optimizer maths in :mod:`dualoptim_jax.moments` is the same for
every policy: it decodes, updates in float32 and encodes again, leaf by leaf
inside one jitted step, so no float32 copy of the whole state exists at once.

Every optimizer of this package takes one ``storage=`` option: a policy from
:func:`state_storage` (``dj.state_storage(state_bits=8, keep_fp32=...)``) or
your own; ``state_bits=8`` is sugar for ``storage=state_storage(state_bits=8)``.

8-bit storage (Dettmers et al., 2022, "8-bit Optimizers via Block-wise
Quantization") uses the codec of :mod:`dualoptim_jax.quantize`: signed dynamic
map for moments that can be negative (first moments; every DualOptim+ delta,
since ``s(g) - B`` can be negative), unsigned map for non-negative ones (base
second moments; second moments without a base); one float32 absmax per block of
``block_size`` elements along the last axis of each row.

Placement: a codec's ``init`` receives the moment's shape as a
``jax.ShapeDtypeStruct`` that carries the parameter's sharding when the
parameter is a laid-out array of that shape (:func:`placed_spec`), so
``tx.init(params)`` on FSDP-sharded parameters creates every state leaf on its
parameter's shards, as ``optax.adamw(...).init`` does.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from dualoptim_jax.hyperparams import is_traced, static_value
from dualoptim_jax.quantize import (
  QuantizedArray,
  absmax_shape,
  dequantize_blockwise,
  quantize_blockwise,
  zero_code,
)

__all__ = [
  "MomentCodec",
  "MomentSpec",
  "QuantizedArray",
  "StoragePolicy",
  "absmax_sharding",
  "choose_8bit",
  "float_codec",
  "float_storage",
  "path_string",
  "placed_spec",
  "resolve_storage",
  "state_storage",
]


class MomentCodec(NamedTuple):
  """How one moment leaf is stored: ``encode`` float -> stored, ``decode`` back.

  ``init(spec)`` returns the stored zero moment for a ``jax.ShapeDtypeStruct``
  (the moment's shape and the parameter's dtype; its ``sharding``, when set,
  is where to create it).

  ``stack``: leaves of the same shape whose codecs are equal and all set
  ``stack`` are updated together, stacked along a new axis under
  ``jax.vmap`` (same results), so the compiled step holds one copy of the
  codec per group instead of one per leaf. Stacking copies the stored values,
  so it pays for long codecs over small storage (8-bit codes: XLA:CPU compiled
  the codec of SmolLM2-135M's 211 quantized leaves into a step of ~1.6 GiB
  resident and ~80 s of compile), not for plain float moments.
  """

  init: Callable[[jax.ShapeDtypeStruct], Any]
  encode: Callable[[jax.Array], Any]
  decode: Callable[[Any], jax.Array]
  stack: bool = False


# (path of the parameter, the stored moment's global shape and the parameter's
#  dtype, moment index, is_base, whether the stored value is never negative)
#  -> codec. Decided from global shapes only, so every shard of a sharded
#  parameter makes the same choice.
StoragePolicy = Callable[[tuple, jax.ShapeDtypeStruct, int, bool, bool], MomentCodec]


def float_codec(dtype: Any) -> MomentCodec:
  """Stores a moment as a plain array of ``dtype``."""
  return MomentCodec(
    init=lambda spec: jnp.zeros(spec.shape, dtype, device=_target(spec)),
    encode=lambda x: x.astype(dtype),
    decode=lambda x: x,
  )


def float_storage(dtype: Any = None) -> StoragePolicy:
  """Every moment as a plain array (``dtype=None``: the parameter's dtype)."""

  def policy(path, param, index, is_base, nonnegative):
    del path, index, is_base, nonnegative
    return float_codec(dtype or param.dtype)

  return policy


def _target(spec: Any) -> NamedSharding | None:
  """Where to create a moment for ``spec``: its NamedSharding if it is a placed spec."""
  if isinstance(spec, jax.ShapeDtypeStruct) and isinstance(spec.sharding, NamedSharding):
    return spec.sharding
  return None


def placed_spec(param: Any, shape: tuple[int, ...]) -> jax.ShapeDtypeStruct:
  """``shape`` with ``param``'s dtype, and its sharding if it is a laid-out array of that shape.

  Only a concrete array on a :class:`~jax.sharding.NamedSharding` passes its
  sharding on (inside ``jit`` the compiler propagates shardings itself; an
  array on one device is left where JAX puts new arrays, as ``optax`` does).
  A moment of another shape (Adafactor's factored rows and columns) is not
  placed.
  """
  sharding = None
  if isinstance(param, jax.Array) and not is_traced(param):
    candidate = getattr(param, "sharding", None)
    if isinstance(candidate, NamedSharding) and tuple(shape) == tuple(param.shape):
      sharding = candidate
  return jax.ShapeDtypeStruct(tuple(shape), jnp.result_type(param), sharding=sharding)


def absmax_sharding(
  param_sharding: NamedSharding | None, shape: tuple[int, ...]
) -> NamedSharding | None:
  """Sharding of the block scales ``shape = (*param.shape[:-1], n_blocks)``.

  The parameter's spec on the leading axes; on the block axis too when the mesh
  axes named there divide the block count (then block ``j``'s scale lives where
  block ``j``'s codes do). ``None`` stays ``None``.
  """
  if param_sharding is None:
    return None
  mesh = param_sharding.mesh
  entries = list(param_sharding.spec)[: len(shape)]
  entries += [None] * (len(shape) - len(entries))
  fitted = []
  for size, entry in zip(shape, entries):
    names = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
    split = math.prod(mesh.shape[n] for n in names)
    fitted.append(entry if size % split == 0 else None)
  return NamedSharding(mesh, PartitionSpec(*fitted))


def path_string(path: tuple) -> str:
  """``('layers', 0, 'kernel')``-style key path as ``'layers/0/kernel'``."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def choose_8bit(shape: tuple[int, ...], *, min_8bit_size: int = 4096) -> bool:
  """Whether a tensor of this **global** shape is kept in 8 bits.

  Tensors with fewer than ``min_8bit_size`` elements (biases, norms, scalars)
  stay in floating point: their states are cheap and the per-block overhead
  and error would buy nothing.  Pass the parameter's global shape (under
  ``jax.jit`` that is ``param.shape``; never a shard's shape inside
  ``shard_map``), so every shard of a tensor makes the same choice.
  """
  if not isinstance(min_8bit_size, int) or min_8bit_size < 0:
    raise ValueError(f"min_8bit_size must be an int >= 0, got {min_8bit_size!r}")
  return math.prod(shape) >= min_8bit_size


@dataclasses.dataclass(frozen=True)
class MomentSpec:
  """Static description of how one moment leaf is stored, with its codec.

  ``init`` / ``encode`` / ``decode`` have the shape of the optimizer core's
  ``MomentCodec`` fields, so ``MomentCodec(spec.init, spec.encode,
  spec.decode)`` wires a spec in.  A spec is hashable and is a pytree *leaf*,
  so a tree of specs built with ``jax.tree.map(..., params)`` has the
  parameters' structure and can lead a ``jax.tree.map`` over stored moments
  (whose quantized leaves are :class:`QuantizedArray` nodes).

  Attributes:
    quantized: keep the moment as a :class:`~dualoptim_jax.quantize.QuantizedArray`; otherwise as a
      plain array.
    signed: map of a quantized moment: True for moments that can be negative
      (first moments, delta second moments), False for non-negative ones
      (base second moments).
    block_size: block size of a quantized moment.
    dtype: storage dtype of an unquantized moment (optax's ``mu_dtype``);
      None keeps the dtype it is given (``init``: the parameter's).
  """

  quantized: bool = False
  signed: bool = True
  block_size: int = 256
  dtype: Any = None

  def __post_init__(self):
    if (
      isinstance(self.block_size, bool)
      or not isinstance(self.block_size, int)
      or self.block_size < 1
    ):
      raise ValueError(f"block_size must be a positive int, got {self.block_size!r}")

  @classmethod
  def for_shape(
    cls,
    shape: tuple[int, ...],
    *,
    signed: bool,
    state_bits: int = 32,
    block_size: int = 256,
    min_8bit_size: int = 4096,
    dtype: Any = None,
  ) -> MomentSpec:
    """The spec of a moment of a parameter with this **global** ``shape``.

    Quantized iff ``state_bits == 8`` and :func:`choose_8bit` accepts the
    shape; a caller with a ``keep_fp32`` rule passes ``state_bits=32`` for the
    leaves it keeps.
    """
    if state_bits not in (8, 32):
      raise ValueError(f"state_bits must be 8 or 32, got {state_bits!r}")
    quantized = state_bits == 8 and choose_8bit(shape, min_8bit_size=min_8bit_size)
    return cls(quantized=quantized, signed=bool(signed), block_size=block_size, dtype=dtype)

  def init(self, like: Any) -> jax.Array | QuantizedArray:
    """The zero moment for a parameter ``like`` (array or ShapeDtypeStruct).

    A ``like`` with a :class:`~jax.sharding.NamedSharding` (see
    :func:`placed_spec`) gets its zeros created on that sharding: the codes
    like the parameter, the block scales on its leading axes (:func:`absmax_sharding`).
    """
    shape = tuple(like.shape)
    sharding = _target(like)
    if self.quantized:
      scales = absmax_shape(shape, self.block_size)
      return QuantizedArray(
        codes=jnp.full(shape, zero_code(self.signed), jnp.uint8, device=sharding),
        absmax=jnp.zeros(scales, jnp.float32, device=absmax_sharding(sharding, scales)),
      )
    return jnp.zeros(shape, like.dtype if self.dtype is None else self.dtype, device=sharding)

  def encode(self, x: jax.Array) -> jax.Array | QuantizedArray:
    """Stores a float moment."""
    if self.quantized:
      return quantize_blockwise(x, signed=self.signed, block_size=self.block_size)
    return x if self.dtype is None else jnp.asarray(x).astype(self.dtype)

  def decode(self, stored: jax.Array | QuantizedArray) -> jax.Array:
    """The moment as an array: float32 if quantized, else as stored."""
    if self.quantized:
      if not isinstance(stored, QuantizedArray):
        raise TypeError(f"spec is quantized but got a {type(stored).__name__}")
      return dequantize_blockwise(stored, signed=self.signed, block_size=self.block_size)
    if isinstance(stored, QuantizedArray):
      raise TypeError("spec is not quantized but got a QuantizedArray")
    return stored


def check_state_options(
  state_bits: Any, block_size: Any, min_8bit_size: Any, keep_fp32: Any
) -> tuple[int, int, int]:
  """Validates the options of :func:`state_storage`."""
  state_bits = static_value("state_bits", state_bits)
  block_size = static_value("block_size", block_size)
  min_8bit_size = static_value("min_8bit_size", min_8bit_size)
  if state_bits not in (8, 32) or isinstance(state_bits, bool):
    raise ValueError(f"state_bits must be 8 or 32, got {state_bits!r}.")
  if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral) or block_size < 1:
    raise ValueError(f"block_size must be an int >= 1, got {block_size!r}.")
  if (
    isinstance(min_8bit_size, bool)
    or not isinstance(min_8bit_size, numbers.Integral)
    or min_8bit_size < 0
  ):
    raise ValueError(f"min_8bit_size must be an int >= 0, got {min_8bit_size!r}.")
  if keep_fp32 is not None and not callable(keep_fp32):
    raise ValueError(
      "keep_fp32 must be None or a predicate on the parameter's path string "
      f"(e.g. lambda path: 'embed' in path), got {keep_fp32!r}."
    )
  return int(state_bits), int(block_size), int(min_8bit_size)


def state_storage(
  *,
  state_bits: int = 32,
  block_size: int = 256,
  min_8bit_size: int = 4096,
  quantize_base: bool = True,
  quantize_delta: bool = True,
  keep_fp32: Callable[[str], bool] | None = None,
  dtype: Any = None,
) -> StoragePolicy:
  """A storage policy: float moments, or 8-bit block-wise ones where allowed.

  Args:
    state_bits: 32 keeps every moment as a float array; 8 quantizes the moments
      the other options allow.
    block_size: elements per quantization block (bitsandbytes' default 256).
    min_8bit_size: moments with fewer elements stay float (biases, norms).
    quantize_base: quantize the shared base moments.
    quantize_delta: quantize the per-objective moments (deltas).
    keep_fp32: predicate on the parameter's path (``'layers/0/attn/q/kernel'``)
      that keeps its moments float, e.g. embeddings.
    dtype: dtype of float moments (optax's ``mu_dtype``; default: the
      parameter's).

  Returns:
    A :data:`StoragePolicy`, for the ``storage=`` option of every optimizer.

  Example:
    >>> import dualoptim_jax as dj
    >>> storage = dj.state_storage(state_bits=8, keep_fp32=lambda p: "embed" in p)
    >>> tx = dj.dualoptim_plus(1e-5, storage=storage)
  """
  state_bits, block_size, min_8bit_size = check_state_options(
    state_bits, block_size, min_8bit_size, keep_fp32
  )
  quantize_base = bool(static_value("quantize_base", quantize_base))
  quantize_delta = bool(static_value("quantize_delta", quantize_delta))

  def policy(path, spec, index, is_base, nonnegative):
    del index
    wanted = state_bits == 8 and (quantize_base if is_base else quantize_delta)
    if wanted and keep_fp32 is not None and keep_fp32(path_string(path)):
      wanted = False
    moment = MomentSpec.for_shape(
      tuple(spec.shape),
      signed=not nonnegative,
      state_bits=8 if wanted else 32,
      block_size=block_size,
      min_8bit_size=min_8bit_size,
      dtype=dtype or spec.dtype,
    )
    return _codec(moment)

  return policy


@functools.cache
def _codec(moment: MomentSpec) -> MomentCodec:
  # One codec per distinct spec, so that equal specs give equal codecs (bound
  # methods compare by the identity of their object), which stacking needs.
  return MomentCodec(moment.init, moment.encode, moment.decode, stack=moment.quantized)


def resolve_storage(
  storage: StoragePolicy | None, state_bits: Any = None, dtype: Any = None
) -> StoragePolicy:
  """The one policy a factory uses: ``storage``, or the one its sugar options name.

  ``state_bits=8`` is ``state_storage(state_bits=8)``; ``dtype`` (optax's
  ``mu_dtype``, where a factory mirrors an optax signature that has it) is
  ``state_storage(dtype=...)``. Passing ``storage`` together with either
  raises, so one run never has two answers to where its moments live.
  """
  state_bits = None if state_bits is None else static_value("state_bits", state_bits)
  if storage is not None:
    if state_bits not in (None, 32) or dtype is not None:
      raise ValueError(
        "pass the storage options either as storage=dj.state_storage(...) or as "
        f"state_bits=/mu_dtype=, not both (got state_bits={state_bits!r}, dtype={dtype!r})."
      )
    if not callable(storage):
      raise ValueError(f"storage must be a StoragePolicy (dj.state_storage(...)), got {storage!r}.")
    return storage
  return state_storage(state_bits=32 if state_bits is None else state_bits, dtype=dtype)
