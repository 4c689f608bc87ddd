"""Ready optimizers: wiring of the ``scale_by_*`` transforms, no maths of their own.

Each alias is ``chain(scale_by_X, add_decayed_weights(weight_decay, mask),
scale_by_objective_learning_rate(learning_rate, lr_scales))``, so one step on
objective k is :math:`\\theta \\leftarrow \\theta - \\eta s_k (u + \\lambda\\theta)`
(decoupled weight decay, as ``optax.adamw``).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import optax

from dualoptim_jax import transform
from dualoptim_jax.moments import is_traced


def _with_decay_and_lr(
    scale_by: optax.GradientTransformation,
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: float,
    mask: Any,
    lr_scales: Sequence[float] | None,
    num_objectives: int,
) -> optax.GradientTransformationExtraArgs:
  if not is_traced(weight_decay) and float(weight_decay) < 0:
    raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}.")
  parts = [scale_by]
  # A Python 0 skips the term rather than adding 0 * params (which would read
  # every parameter for nothing). Arrays keep it, so the chain's structure
  # never depends on a value that inject_hyperparams may later trace.
  if not (isinstance(weight_decay, (int, float)) and weight_decay == 0):
    parts.append(optax.add_decayed_weights(weight_decay, mask))
  parts.append(
      transform.scale_by_objective_learning_rate(
          learning_rate, lr_scales=lr_scales, num_objectives=num_objectives
      )
  )
  return optax.chain(*parts)


def dualoptim_plus(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.95,
    base_b1: float = 0.9,
    base_b2: float = 0.95,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    num_objectives: int = 2,
    lr_scales: Sequence[float] | None = None,
    mask: Any | Callable[[optax.Params], Any] | None = None,
    mu_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """DualOptim+ with decoupled weight decay (AdamW form).

  See :func:`~dualoptim_jax.scale_by_dualoptim_plus` for the update rule.

  Args:
    learning_rate: float or optax schedule of the global step.
    b1, b2: delta decays; base_b1, base_b2: shared-base decays.
    eps: denominator term.
    weight_decay: decoupled weight decay λ (scaled by the objective's lr).
    num_objectives: K.
    lr_scales: per-objective learning-rate multipliers (e.g. forget, retain).
    mask: weight-decay mask, as ``optax.adamw``'s.
    mu_dtype: dtype of the stored moments.

  Example:
    >>> import jax.numpy as jnp, optax, dualoptim_jax as dj
    >>> tx = dj.dualoptim_plus(1e-5, weight_decay=0.01)
    >>> params = {"w": jnp.ones(3)}
    >>> state = tx.init(params)
    >>> u, state = tx.update({"w": jnp.ones(3)}, state, params, objective=0)
    >>> params = optax.apply_updates(params, u)
  """
  return _with_decay_and_lr(
      transform.scale_by_dualoptim_plus(
          b1, b2, base_b1, base_b2, eps,
          num_objectives=num_objectives, mu_dtype=mu_dtype,
      ),
      learning_rate, weight_decay, mask, lr_scales, num_objectives,
  )


def dualoptim(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    num_objectives: int = 2,
    lr_scales: Sequence[float] | None = None,
    mask: Any | Callable[[optax.Params], Any] | None = None,
    mu_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """DualOptim (one Adam state per objective) with decoupled weight decay.

  See :func:`~dualoptim_jax.scale_by_dualoptim`. With a constant learning rate
  and all ``lr_scales`` 1, objective k's parameter updates equal those of an
  ``optax.adamw`` fed only objective k's gradients.
  """
  return _with_decay_and_lr(
      transform.scale_by_dualoptim(
          b1, b2, eps, num_objectives=num_objectives, mu_dtype=mu_dtype
      ),
      learning_rate, weight_decay, mask, lr_scales, num_objectives,
  )
