"""Objective schedules: which objective is active at a given global step."""

from __future__ import annotations

import numbers
from collections.abc import Callable

import jax
import jax.numpy as jnp


def alternating(
  forget_steps: int, retain_steps: int
) -> Callable[[int | jax.Array], int | jax.Array]:
  """``forget_steps`` steps of objective 0, then ``retain_steps`` of objective 1.

  The paper's unlearning schedule (default there: 1 forget step, then 5 retain
  steps), repeated: step ``n`` (0-based) is a forget step iff
  ``n mod (F_f + F_r) < F_f``.

  Args:
    forget_steps: F_f >= 1, consecutive steps on objective 0 (forget).
    retain_steps: F_r >= 1, consecutive steps on objective 1 (retain).

  Returns:
    ``schedule(step)``: a Python int for a Python int step (so a jitted update
    can be specialised per objective), an int32 array for an array step
    (jit-safe).

  Example:
    >>> import dualoptim_jax as dj
    >>> [dj.alternating(1, 5)(n) for n in range(7)]
    [0, 1, 1, 1, 1, 1, 0]
  """
  for name, value in (("forget_steps", forget_steps), ("retain_steps", retain_steps)):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
      raise ValueError(f"{name} must be an int >= 1, got {value!r}.")
  period = forget_steps + retain_steps

  def schedule(step):
    if isinstance(step, numbers.Integral) and not isinstance(step, bool):
      step = int(step)
      if step < 0:
        raise ValueError(f"step must be >= 0, got {step}.")
      return 0 if step % period < forget_steps else 1
    step = jnp.asarray(step)
    return jnp.where(step % period < forget_steps, 0, 1).astype(jnp.int32)

  return schedule
