"""DualOptim for any optax transform: one inner state per objective.

``decoupled(inner, num_objectives=K)`` keeps K independent states of ``inner``
and routes each update to the active objective's state. It is exact by
construction: driving it with objectives ``k_1, k_2, ...`` equals K independent
runs of ``inner``, run ``k`` seeing only the gradients of objective ``k``.

References:
  Zhong et al., "DualOptim: Enhancing Efficacy and Stability in Machine
  Unlearning with Dual Optimizers", 2025.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import optax

from dualoptim_jax import objective as objective_lib


class DecoupledState(NamedTuple):
  """State of :func:`decoupled`: ``inner_states[k]`` is objective k's state."""

  inner_states: tuple[Any, ...]


def decoupled(
  inner: optax.GradientTransformation, *, num_objectives: int = 2
) -> optax.GradientTransformationExtraArgs:
  """Keeps one state of ``inner`` per objective (DualOptim).

  Args:
    inner: any optax transform (e.g. ``optax.adamw(1e-3)``, ``optax.lion(1e-4)``).
    num_objectives: K >= 1.

  Returns:
    A transform whose ``update(updates, state, params=None, *, objective,
    **extra)`` applies ``inner.update`` to ``state.inner_states[objective]``
    only; other keyword arguments are forwarded to ``inner``. ``objective`` is
    an int (specialised at trace time) or an int32 scalar array (one program for
    all objectives; an out-of-range value yields NaN updates and an untouched
    state).

  Example:
    >>> import optax, jax.numpy as jnp, dualoptim_jax as dj
    >>> tx = dj.decoupled(optax.lion(1e-4), num_objectives=2)
    >>> state = tx.init({"w": jnp.zeros(3)})
    >>> u, state = tx.update({"w": jnp.ones(3)}, state, objective=1)
  """
  num_objectives = objective_lib.validate_num_objectives(num_objectives)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return DecoupledState(inner_states=tuple(inner.init(params) for _ in range(num_objectives)))

  def update_fn(updates, state, params=None, *, objective=None, **extra_args):
    objective = objective_lib.check_objective(objective, num_objectives)
    new_updates, inner_states = objective_lib.route(
      objective,
      state.inner_states,
      lambda k, inner_state: inner.update(updates, inner_state, params, **extra_args),
    )
    return new_updates, DecoupledState(inner_states)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
