"""Checksums of checkpointed arrays: written at save time, verified at restore.

orbax stores array bytes as they are; a flipped byte in a data file is read back as a different
number (or fails deep inside the reader), and a run resumed from it trains on damaged weights.
:func:`checksums` gives every array a 64-bit checksum computed on the devices, from the array's
values alone:

.. math::

   s_1 = \\sum_i w_i \\bmod 2^{32}, \\qquad s_2 = \\sum_i w_i\\,(\\phi\\, i + 1) \\bmod 2^{32}

where :math:`w_i` is the bit pattern of element :math:`i` (row-major index) as a uint32 and
:math:`\\phi` an odd constant. Integer addition modulo :math:`2^{32}` is associative, so the sum is
the same however the array is sharded -- over one device, eight, or two processes -- and a
checkpoint written on one mesh verifies on another. Any single changed element changes
:math:`s_1`; :math:`s_2` also catches elements that moved.

:class:`~dualoptim_jax.unlearn.checkpoint.Checkpointer` stores the checksums with each checkpoint
and checks them on restore, raising :class:`CheckpointCorruptError` (which names the array); a
checkpoint whose files cannot be read at all raises the same error.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["CheckpointCorruptError", "checksums", "mismatches", "describe_error"]

_PHI = 0x9E3779B1  # odd: multiplying by it permutes the uint32s
_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


class CheckpointCorruptError(ValueError):
  """A checkpoint's files are damaged: unreadable, or arrays that fail their checksums."""


def _words(x: jax.Array) -> jax.Array:
  """The bit patterns of ``x``'s elements as uint32 (an extra last axis of 2 for 64-bit types)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = np.dtype(x.dtype).itemsize
  if size == 8:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if size not in _UINT:
    raise TypeError(f"cannot checksum arrays of dtype {x.dtype}")
  return jax.lax.bitcast_convert_type(x, _UINT[size]).astype(jnp.uint32)


def _checksum(x: jax.Array) -> jax.Array:
  """``[s1, s2]`` (uint32) of one array."""
  w = _words(x)
  index = jnp.zeros(w.shape, jnp.uint32)
  for d, n in enumerate(w.shape):  # row-major linear index, without a reshape of the shards
    index = index * jnp.uint32(n) + jax.lax.broadcasted_iota(jnp.uint32, w.shape, d)
  weight = index * jnp.uint32(_PHI) + jnp.uint32(1)
  return jnp.stack([jnp.sum(w, dtype=jnp.uint32), jnp.sum(w * weight, dtype=jnp.uint32)])


@jax.jit
def _all_checksums(tree: Any) -> Any:
  return jax.tree.map(_checksum, tree)


def checksums(groups: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, str]]:
  """``{group: {name: "16 hex digits"}}`` for groups of named arrays (one jitted reduction).

  Arrays may be sharded over any mesh, across processes; every process gets the same result.
  """
  arrays = {g: {k: jnp.asarray(v) for k, v in named.items()} for g, named in groups.items()}
  sums = jax.device_get(_all_checksums(arrays))
  return {
    g: {k: f"{int(s[0]):08x}{int(s[1]):08x}" for k, s in named.items()} for g, named in sums.items()
  }


def mismatches(
  saved: Mapping[str, Mapping[str, str]], restored: Mapping[str, Mapping[str, str]]
) -> list[tuple[str, str]]:
  """``(group, name)`` of every array whose restored checksum differs from the saved one.

  Arrays without a saved checksum (older checkpoints) are not checked.
  """
  return [
    (g, k)
    for g, named in restored.items()
    for k, value in named.items()
    if saved.get(g, {}).get(k, value) != value
  ]


def describe_error(e: BaseException) -> str:
  """One line for an exception raised while reading a checkpoint's files."""
  text = " ".join(str(e).split())
  if len(text) > 200:
    text = text[:197] + "..."
  return f"{type(e).__name__}: {text}" if text else type(e).__name__
