"""Where optimizer moments live: float arrays or 8-bit block-wise codes.

A storage policy picks, for every moment leaf, a
:class:`~dualoptim_jax.moments.MomentCodec` from static facts only (the
parameter's path, the moment's *global* shape, whether it is a base or a delta,
whether its value is never negative). The optimizer maths in
:mod:`dualoptim_jax.moments` is the same for every policy: it decodes, updates
in float32 and encodes again, leaf by leaf inside one jitted step, so no float32
copy of the whole state exists at once.

8-bit storage (Dettmers et al., 2022, "8-bit Optimizers via Block-wise
Quantization") uses :mod:`dualoptim_jax.quantize`: signed dynamic map for
moments that can be negative (first moments; every DualOptim+ delta, since
``s(g) - B`` can be negative), unsigned map for non-negative ones (base second
moments; second moments without a base); one float32 absmax per block of
``block_size`` elements along the last axis of each row.
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from dualoptim_jax.moments import MomentCodec, StoragePolicy
from dualoptim_jax.quantize import MomentSpec


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


# Hyperparameters that shape the state or the program, not just its values:
# optax.inject_hyperparams must keep them static (see static_hyperparams).
STATIC_HYPERPARAMS = (
  "num_objectives",
  "state_bits",
  "block_size",
  "min_8bit_size",
  "quantize_base",
  "quantize_delta",
  "nesterov",
  "eps_in_sqrt",
  "bias_correction",
  "factored",
  "min_dim_size_to_factor",
  "multiply_by_parameter_scale",
)


def static_hyperparams(factory: Callable[..., Any]) -> tuple[str, ...]:
  """The arguments of ``factory`` that ``optax.inject_hyperparams`` must keep static.

  Example:
    >>> import optax, dualoptim_jax as dj
    >>> tx = optax.inject_hyperparams(
    ...     dj.dualoptim_plus, static_args=dj.static_hyperparams(dj.dualoptim_plus)
    ... )(learning_rate=1e-3)
  """
  names = inspect.signature(factory).parameters
  return tuple(name for name in STATIC_HYPERPARAMS if name in names)


def static_value(name: str, value: Any) -> Any:
  """``value`` as a Python scalar; a clear error if it is traced.

  Concrete arrays (``optax.inject_hyperparams`` wraps every numeric argument)
  are converted; traced ones cannot choose a state layout.
  """
  if isinstance(value, jax.core.Tracer):
    raise ValueError(
      f"{name} decides the optimizer state's layout and must be static; with "
      "optax.inject_hyperparams pass static_args=dj.static_hyperparams(<optimizer>)."
    )
  if isinstance(value, (jax.Array, np.ndarray, np.generic)) and np.ndim(value) == 0:
    return np.asarray(value).item()
  return value


def check_state_options(
  state_bits: Any, block_size: Any, min_8bit_size: Any, keep_fp32: Any
) -> tuple[int, int, int]:
  """Validates the 8-bit keyword options shared by every optimizer."""
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
  return state_bits, block_size, min_8bit_size


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
  """The storage policy behind the optimizers' ``state_bits=`` options.

  Args:
    state_bits: 32 keeps every moment as a float array; 8 quantizes the moments
      the other options allow.
    block_size: elements per quantization block (bitsandbytes' default 256).
    min_8bit_size: moments with fewer elements stay float (biases, norms).
    quantize_base: quantize the shared base moments.
    quantize_delta: quantize the per-objective moments (deltas).
    keep_fp32: predicate on the parameter's path (``'layers/0/attn/q/kernel'``)
      that keeps its moments float, e.g. embeddings.
    dtype: dtype of float moments (default: the parameter's).

  Returns:
    A :data:`~dualoptim_jax.moments.StoragePolicy`.
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
    return MomentCodec(init=moment.init, encode=moment.encode, decode=moment.decode)

  return policy
