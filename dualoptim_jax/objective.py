"""The active objective: validation and dispatch between static and traced indices.

Every multi-objective transform in this package takes ``objective=`` in
``update``. It may be

* a Python ``int`` (or NumPy integer): the update is specialised for that
  objective at trace time, so a jitted step compiles once per objective and
  touches only that objective's state; or
* an integer scalar ``jax.Array`` (possibly traced): one compiled program serves
  every objective, selecting the branch with :func:`jax.lax.switch`.

A traced index outside ``[0, K)`` cannot raise inside ``jit``. Because
``lax.switch`` clamps out-of-range indices, a naive implementation would silently
update another objective's state. Here such an index selects an extra branch
that leaves the state untouched and returns NaN updates, so the error is visible
in the parameters and is caught by ``jax.experimental.checkify`` with
``checkify.float_checks`` (or ``jax_debug_nans``).
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

S = TypeVar("S")

Objective = int | jax.Array


def validate_num_objectives(num_objectives: Any) -> int:
  """Checks ``num_objectives`` is a positive Python int and returns it."""
  if isinstance(num_objectives, jax.core.Tracer):
    raise ValueError(
        "num_objectives decides the optimizer state's layout and must be "
        "static; with optax.inject_hyperparams pass "
        "static_args=dj.static_hyperparams(<optimizer>)."
    )
  if isinstance(num_objectives, (jax.Array, np.ndarray)) and np.ndim(num_objectives) == 0:
    if jnp.issubdtype(num_objectives.dtype, jnp.integer):
      num_objectives = int(num_objectives)
  if (
      isinstance(num_objectives, bool)
      or not isinstance(num_objectives, numbers.Integral)
      or num_objectives < 1
  ):
    raise ValueError(
        f"num_objectives must be a positive int (>= 1), got {num_objectives!r}."
    )
  return int(num_objectives)


def is_static(objective: Any) -> bool:
  """True when ``objective`` is a Python/NumPy integer known at trace time."""
  return isinstance(objective, numbers.Integral) and not isinstance(
      objective, bool
  )


def check_objective(objective: Any, num_objectives: int) -> Objective:
  """Validates ``objective`` and returns it as an int or an int32 scalar array.

  Raises:
    ValueError: if the objective is missing, not an integer scalar, or (when
      its value is known, eagerly or statically) outside ``[0, num_objectives)``.
  """
  if objective is None and num_objectives == 1:
    return 0
  if objective is None:
    raise ValueError(
        "This transform needs the active objective: call "
        "update(updates, state, params, objective=k) with k an int in "
        f"[0, {num_objectives}) or an int32 scalar array."
    )
  if is_static(objective):
    if not 0 <= objective < num_objectives:
      raise ValueError(
          f"objective={objective} is out of range: allowed values are "
          f"0..{num_objectives - 1} (num_objectives={num_objectives})."
      )
    return int(objective)
  if isinstance(objective, bool):
    raise ValueError(f"objective must be an integer, got bool {objective!r}.")
  arr = jnp.asarray(objective)
  if arr.shape != () or not jnp.issubdtype(arr.dtype, jnp.integer):
    raise ValueError(
        "objective must be an int or an integer scalar array, got "
        f"{type(objective).__name__} with shape {arr.shape} and dtype "
        f"{arr.dtype}."
    )
  if not isinstance(arr, jax.core.Tracer):
    value = int(np.asarray(arr))
    if not 0 <= value < num_objectives:
      raise ValueError(
          f"objective={value} is out of range: allowed values are "
          f"0..{num_objectives - 1} (num_objectives={num_objectives})."
      )
  return arr.astype(jnp.int32)


def dispatch(
    objective: Objective,
    num_objectives: int,
    branch: Callable[[int], S],
    invalid: Callable[[], S],
) -> S:
  """Runs ``branch(k)`` for the active objective ``k``.

  Args:
    objective: a validated objective (see :func:`check_objective`).
    num_objectives: K.
    branch: builds the result for a static objective index.
    invalid: builds the result for an out-of-range traced index (NaN updates,
      untouched state).

  Returns:
    ``branch(objective)`` for a static objective, otherwise a
    :func:`jax.lax.switch` over the K branches plus the invalid one.
  """
  if is_static(objective):
    return branch(int(objective))
  in_range = (objective >= 0) & (objective < num_objectives)
  index = jnp.where(in_range, objective, num_objectives)
  branches = [lambda k=k: branch(k) for k in range(num_objectives)]
  branches.append(invalid)
  return jax.lax.switch(index, branches)


def nan_like(tree: Any) -> Any:
  """NaNs shaped like the (floating) leaves of ``tree``."""
  return jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), tree)
