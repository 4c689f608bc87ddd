"""The active objective: validation and dispatch between static and traced indices.

Every multi-objective transform in this package takes ``objective=`` in
``update``. It may be

* a Python ``int`` (or NumPy integer): the update is specialised for that
  objective at trace time, so a jitted step compiles once per objective and
  touches only that objective's state; or
* an integer scalar ``jax.Array`` (possibly traced): one compiled program serves
  every objective, with one :func:`jax.lax.cond` per objective (see
  :func:`route`).

A traced index outside ``[0, K)`` cannot raise inside ``jit``, and a
``lax.switch`` would clamp it onto another objective. Here no branch is taken:
the state is left untouched and the updates are NaN, so the error is visible in
the parameters and is caught by ``jax.experimental.checkify`` with
``checkify.float_checks`` (or ``jax_debug_nans``).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any, TypeGuard, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from dualoptim_jax.hyperparams import is_traced

S = TypeVar("S")
R = TypeVar("R")

Objective = int | jax.Array


def validate_num_objectives(num_objectives: Any) -> int:
  """Checks ``num_objectives`` is a positive Python int and returns it."""
  if is_traced(num_objectives):
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
    raise ValueError(f"num_objectives must be a positive int (>= 1), got {num_objectives!r}.")
  return int(num_objectives)


def is_static(objective: Any) -> TypeGuard[int]:
  """True when ``objective`` is a Python/NumPy integer known at trace time."""
  return isinstance(objective, numbers.Integral) and not isinstance(objective, bool)


def check_objective(objective: Any, num_objectives: int) -> Objective:
  """Validates ``objective`` and returns it as an int or an int32 scalar array.

  With one objective (``adamw_8bit``, any K = 1 instance) the argument is
  ignored, whatever it is, as ``optax`` transforms ignore it: a single-state
  optimizer can sit in a multi-objective loop unchanged.

  Raises:
    ValueError: if the objective is missing, not an integer scalar, or (when
      its value is known, eagerly or statically) outside ``[0, num_objectives)``.
  """
  if num_objectives == 1:
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
  if not is_traced(arr):
    value = int(np.asarray(arr))
    if not 0 <= value < num_objectives:
      raise ValueError(
        f"objective={value} is out of range: allowed values are "
        f"0..{num_objectives - 1} (num_objectives={num_objectives})."
      )
  return arr.astype(jnp.int32)


def is_valid(objective: Objective, num_objectives: int) -> bool | jax.Array:
  """Python ``True`` for a (validated) static objective; a traced bool otherwise."""
  if is_static(objective):
    return True
  return (objective >= 0) & (objective < num_objectives)


def update_in_place(
  objective: Objective,
  states: tuple[S, ...],
  update: Callable[[int, S], S],
) -> tuple[tuple[S, ...], jax.Array]:
  """Replaces the active objective's state by ``update(k, states[k])``.

  Args:
    objective: a validated objective (see :func:`check_objective`).
    states: one state per objective.
    update: ``update(k, state) -> new state`` for a static ``k``.

  Returns:
    ``(states with the active one replaced, ready)``. For a traced objective
    each state goes through its own ``lax.cond`` (``update`` if active, else
    unchanged) whose only other output is ``ready``, an exact float32 1.0:
    multiplying a later computation by it orders that computation after the
    conditionals without reading any array (see ``shared_base_moments``).
    Nothing but the states leaves a conditional, so XLA updates them in place
    and materialises nothing else. An out-of-range index updates no state.
  """
  # Each branch makes its own 1.0: a value passed through both branches would
  # be forwarded by XLA, and the ordering lost.
  one = lambda: jnp.ones([], jnp.float32)
  if is_static(objective):
    return tuple(update(j, s) if j == objective else s for j, s in enumerate(states)), one()
  new_states, ready = [], one()
  for j, state in enumerate(states):
    new, done = jax.lax.cond(
      objective == j,
      lambda s, j=j: (update(j, s), one()),
      lambda s: (s, one()),
      state,
    )
    new_states.append(new)
    ready = ready * done
  return tuple(new_states), ready


def select(objective: Objective, values: Sequence[jax.Array]) -> jax.Array:
  """``values[objective]``, elementwise (``values[K-1]`` beyond the range)."""
  if is_static(objective):
    return values[objective]
  out = values[-1]
  for j in range(len(values) - 2, -1, -1):
    out = jnp.where(objective == j, values[j], out)
  return out


def route(
  objective: Objective,
  states: tuple[S, ...],
  step: Callable[[int, S], tuple[R, S]],
) -> tuple[R, tuple[S, ...]]:
  """Applies ``step`` to the active objective's state; the others pass through.

  Args:
    objective: a validated objective (see :func:`check_objective`).
    states: one state per objective.
    step: ``step(k, states[k]) -> (result, new_state_k)`` for a static ``k``.

  Returns:
    ``(result, states with the active one replaced)``. For a traced objective
    this is one ``lax.cond`` per objective whose inactive branch returns its
    operands unchanged, so with donated buffers XLA updates the active state in
    place and copies nothing (a ``lax.switch`` returning the whole tuple would
    copy every inactive state). The result starts as NaN and is overwritten by
    the active branch, so an out-of-range index yields NaN and untouched states.
  """
  if is_static(objective):
    result, new = step(objective, states[objective])
    return result, tuple(new if j == objective else s for j, s in enumerate(states))
  result_shape = jax.eval_shape(lambda: step(0, states[0])[0])
  result = jax.tree.map(lambda x: jnp.full(x.shape, jnp.nan, x.dtype), result_shape)
  new_states = list(states)
  for j in range(len(states)):

    def active(operand, j=j):
      result_j, new = step(j, operand[0])
      return new, result_j

    new_states[j], result = jax.lax.cond(
      objective == j, active, lambda operand: operand, (new_states[j], result)
    )
  return result, tuple(new_states)
