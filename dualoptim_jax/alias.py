"""Ready optimizers: wiring of the ``scale_by_*`` transforms, no maths of their own.

Each alias is ``chain(scale_by_X, add_decayed_weights(weight_decay, mask),
scale_by_objective_learning_rate(learning_rate, lr_scales))``, so one step on
objective k is :math:`\\theta \\leftarrow \\theta - \\eta s_k (u + \\lambda\\theta)`
(decoupled weight decay, as ``optax.adamw``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import optax

from dualoptim_jax import instances, transform
from dualoptim_jax.hyperparams import is_traced
from dualoptim_jax.storage import StoragePolicy


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
  storage: StoragePolicy | None = None,
  state_bits: int | None = None,
  careful_rounding: bool = False,
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
    storage: where the moments live: ``dj.state_storage(state_bits=8,
      block_size=..., keep_fp32=..., dtype=...)`` or any
      :data:`~dualoptim_jax.StoragePolicy` (default: float, the parameters'
      dtype).
    state_bits: sugar: 8 ("DO+ 8bit") is ``storage=dj.state_storage(state_bits=8)``.
    careful_rounding: the rounding-careful form of the combined moments (see
      :func:`~dualoptim_jax.scale_by_dualoptim_plus`); default: the released one.

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
      b1,
      b2,
      base_b1,
      base_b2,
      eps,
      num_objectives=num_objectives,
      storage=storage,
      state_bits=state_bits,
      careful_rounding=careful_rounding,
    ),
    learning_rate,
    weight_decay,
    mask,
    lr_scales,
    num_objectives,
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
  storage: StoragePolicy | None = None,
  state_bits: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  """DualOptim (one Adam state per objective) with decoupled weight decay.

  See :func:`~dualoptim_jax.scale_by_dualoptim`. With a constant learning rate
  and all ``lr_scales`` 1, objective k's parameter updates equal those of an
  ``optax.adamw`` fed only objective k's gradients. ``storage`` and
  ``state_bits=8`` ("DO 8bit") are as in :func:`dualoptim_plus`.
  """
  return _with_decay_and_lr(
    transform.scale_by_dualoptim(
      b1,
      b2,
      eps,
      num_objectives=num_objectives,
      storage=storage,
      state_bits=state_bits,
    ),
    learning_rate,
    weight_decay,
    mask,
    lr_scales,
    num_objectives,
  )


def adamw_8bit(
  learning_rate: optax.ScalarOrSchedule,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  eps_root: float = 0.0,
  mu_dtype: Any = None,
  weight_decay: float = 1e-4,
  mask: Any | Callable[[optax.Params], Any] | None = None,
  *,
  storage: StoragePolicy | None = None,
) -> optax.GradientTransformationExtraArgs:
  """``optax.adamw`` with block-wise 8-bit moments: the single-objective baseline.

  Same arguments and defaults as ``optax.adamw`` (``nesterov`` aside), plus
  ``storage`` (default ``dj.state_storage(state_bits=8, dtype=mu_dtype)``). Its
  ``update`` ignores ``objective=``, as ``optax.adamw``'s does. See
  :func:`~dualoptim_jax.scale_by_adam_8bit`.
  """
  return _with_decay_and_lr(
    transform.scale_by_adam_8bit(
      b1,
      b2,
      eps,
      eps_root,
      mu_dtype,
      storage=storage,
    ),
    learning_rate,
    weight_decay,
    mask,
    None,
    1,
  )


# DualOptim+ over other optimizers' statistics (see dualoptim_jax.instances).
# Their DualOptim counterparts are dj.decoupled(optax.<optimizer>(...)).


def dualoptim_plus_lion(
  learning_rate: optax.ScalarOrSchedule,
  b1: float = 0.9,
  b2: float = 0.99,
  base_b2: float = 0.99,
  weight_decay: float = 0.0,
  *,
  num_objectives: int = 2,
  lr_scales: Sequence[float] | None = None,
  mask: Any | Callable[[optax.Params], Any] | None = None,
  storage: StoragePolicy | None = None,
  state_bits: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  """DualOptim+ in Lion form with decoupled weight decay.

  See :func:`~dualoptim_jax.scale_by_dualoptim_plus_lion`. Hyperparameters as
  ``optax.lion`` (whose ``weight_decay`` defaults to 1e-3; here 0, as in every
  alias of this package). DualOptim counterpart:
  ``dj.decoupled(optax.lion(lr, b1, b2, weight_decay=...))``.

  Example:
    >>> import dualoptim_jax as dj
    >>> tx = dj.dualoptim_plus_lion(1e-5, weight_decay=0.1)
  """
  return _with_decay_and_lr(
    instances.scale_by_dualoptim_plus_lion(
      b1, b2, base_b2, num_objectives=num_objectives, storage=storage, state_bits=state_bits
    ),
    learning_rate,
    weight_decay,
    mask,
    lr_scales,
    num_objectives,
  )


def dualoptim_plus_sgd(
  learning_rate: optax.ScalarOrSchedule,
  momentum: float = 0.9,
  nesterov: bool = False,
  base_momentum: float = 0.9,
  weight_decay: float = 0.0,
  *,
  num_objectives: int = 2,
  lr_scales: Sequence[float] | None = None,
  mask: Any | Callable[[optax.Params], Any] | None = None,
  storage: StoragePolicy | None = None,
  state_bits: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  """DualOptim+ in SGD-with-momentum form (EMA momentum, optional Nesterov).

  See :func:`~dualoptim_jax.scale_by_dualoptim_plus_sgd`. ``momentum``
  defaults to 0.9 (``optax.sgd``'s ``None``, plain SGD, stores nothing to
  share). The EMA momentum is ``1 - momentum`` times optax's trace, so the
  DualOptim counterpart is
  ``dj.decoupled(optax.sgd(lr * (1 - momentum), momentum, nesterov))``.

  Example:
    >>> import dualoptim_jax as dj
    >>> tx = dj.dualoptim_plus_sgd(1e-2, momentum=0.9, nesterov=True)
  """
  return _with_decay_and_lr(
    instances.scale_by_dualoptim_plus_sgd(
      momentum,
      nesterov,
      base_momentum,
      num_objectives=num_objectives,
      storage=storage,
      state_bits=state_bits,
    ),
    learning_rate,
    weight_decay,
    mask,
    lr_scales,
    num_objectives,
  )


def dualoptim_plus_rmsprop(
  learning_rate: optax.ScalarOrSchedule,
  decay: float = 0.9,
  eps: float = 1e-8,
  base_decay: float = 0.9,
  weight_decay: float = 0.0,
  *,
  eps_in_sqrt: bool = True,
  bias_correction: bool = False,
  num_objectives: int = 2,
  lr_scales: Sequence[float] | None = None,
  mask: Any | Callable[[optax.Params], Any] | None = None,
  storage: StoragePolicy | None = None,
  state_bits: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  """DualOptim+ in RMSprop form with decoupled weight decay.

  See :func:`~dualoptim_jax.scale_by_dualoptim_plus_rmsprop`. DualOptim
  counterpart: ``dj.decoupled(optax.rmsprop(lr, decay, eps))``.

  Example:
    >>> import dualoptim_jax as dj
    >>> tx = dj.dualoptim_plus_rmsprop(1e-3, decay=0.9)
  """
  return _with_decay_and_lr(
    instances.scale_by_dualoptim_plus_rmsprop(
      decay,
      eps,
      base_decay,
      eps_in_sqrt=eps_in_sqrt,
      bias_correction=bias_correction,
      num_objectives=num_objectives,
      storage=storage,
      state_bits=state_bits,
    ),
    learning_rate,
    weight_decay,
    mask,
    lr_scales,
    num_objectives,
  )


def dualoptim_plus_adafactor(
  learning_rate: optax.ScalarOrSchedule,
  b2: float = 0.999,
  base_b2: float = 0.999,
  eps: float = 1e-30,
  weight_decay: float = 0.0,
  *,
  min_dim_size_to_factor: int = 128,
  factored: bool = True,
  clipping_threshold: float | None = 1.0,
  multiply_by_parameter_scale: bool = True,
  num_objectives: int = 2,
  lr_scales: Sequence[float] | None = None,
  mask: Any | Callable[[optax.Params], Any] | None = None,
  storage: StoragePolicy | None = None,
  state_bits: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  """DualOptim+ over Adafactor's factored second moments.

  ``chain(scale_by_dualoptim_plus_adafactor, clip_by_block_rms(clipping_threshold),
  scale_by_param_block_rms(), add_decayed_weights, -lr * s_k)``, the order of
  ``optax.adafactor`` (whose ``weight_decay_rate`` is not scaled by the
  learning rate; ``weight_decay`` here is, like every alias of this package).
  ``b2`` is a constant decay with bias correction, replacing optax's
  ``decay_rate`` exponent schedule; see
  :func:`~dualoptim_jax.scale_by_dualoptim_plus_adafactor`. Adafactor's
  optional momentum is not provided. The parameter scale needs ``params`` in
  ``update``. DualOptim counterpart: ``dj.decoupled(optax.adafactor(lr))``.

  Example:
    >>> import dualoptim_jax as dj
    >>> tx = dj.dualoptim_plus_adafactor(1e-2, min_dim_size_to_factor=32)
  """
  if clipping_threshold is not None and not is_traced(clipping_threshold):
    if not float(clipping_threshold) >= 1.0:
      raise ValueError(f"clipping_threshold must be >= 1 or None, got {clipping_threshold!r}.")
  parts: list[optax.GradientTransformation] = [
    instances.scale_by_dualoptim_plus_adafactor(
      b2,
      base_b2,
      eps,
      factored=factored,
      min_dim_size_to_factor=min_dim_size_to_factor,
      num_objectives=num_objectives,
      storage=storage,
      state_bits=state_bits,
    )
  ]
  if clipping_threshold is not None:
    parts.append(optax.clip_by_block_rms(clipping_threshold))
  if multiply_by_parameter_scale:
    parts.append(optax.scale_by_param_block_rms())
  return _with_decay_and_lr(
    optax.chain(*parts),
    learning_rate,
    weight_decay,
    mask,
    lr_scales,
    num_objectives,
  )
