"""Hyperparameters: checked once in the factory, static or traced.

Every factory of this package validates its numeric hyperparameters when it is
called, as optax does. Under ``optax.inject_hyperparams`` numeric arguments
become arrays, possibly traced ones. Two kinds are told apart here:

* **layout hyperparameters** (:data:`STATIC_HYPERPARAMS`: the number of
  objectives, the storage options, ...) decide the shape of the state or of the
  program. They must stay static: pass
  ``static_args=static_hyperparams(<factory>)`` to ``inject_hyperparams``; a
  traced one raises a :class:`ValueError` that says so;
* **value hyperparameters** (decays, ``eps``, learning rate, weight decay) are
  checked when they are concrete. A *traced* value is **not checked**: a
  ``b1=1.0`` injected as a traced array runs (and its bias correction divides
  by zero, so the updates go NaN or Inf, which ``jax.experimental.checkify``
  with ``float_checks`` or ``jax_debug_nans`` reports). Checking a traced value
  would need ``checkify.check`` inside the update, which then could not run
  under a plain ``jax.jit``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.core import Tracer

# Hyperparameters that shape the state or the program, not just its values:
# optax.inject_hyperparams must keep them static (see static_hyperparams).
STATIC_HYPERPARAMS = (
  "num_objectives",
  "state_bits",
  "storage",
  "careful_rounding",
  "nesterov",
  "eps_in_sqrt",
  "bias_correction",
  "factored",
  "min_dim_size_to_factor",
  "multiply_by_parameter_scale",
)


def is_traced(value: Any) -> bool:
  """True for a traced hyperparameter (e.g. under ``optax.inject_hyperparams`` in jit)."""
  return isinstance(value, Tracer)


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
  if is_traced(value):
    raise ValueError(
      f"{name} decides the optimizer state's layout and must be static; with "
      "optax.inject_hyperparams pass static_args=dj.static_hyperparams(<optimizer>)."
    )
  if isinstance(value, (jax.Array, np.ndarray, np.generic)) and np.ndim(value) == 0:
    return np.asarray(value).item()
  return value


def check_decay(name: str, value: Any) -> Any:
  """Raises unless ``0 <= value < 1``; a traced value passes unchecked (module doc)."""
  if is_traced(value):
    return value
  try:
    ok = 0.0 <= float(value) < 1.0
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise ValueError(f"{name} must be in [0, 1), got {value!r}.")
  return value


def check_eps(eps: Any, name: str = "eps") -> Any:
  """Raises unless ``eps >= 0``; a traced value passes unchecked (module doc)."""
  if is_traced(eps):
    return eps
  try:
    ok = float(eps) >= 0.0
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise ValueError(f"{name} must be >= 0, got {eps!r}.")
  return eps
