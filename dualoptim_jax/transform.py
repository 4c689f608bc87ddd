r"""DualOptim+ and DualOptim in Adam form, and the per-objective learning rate.

``scale_by_dualoptim_plus`` is the Adam instance of the shared-base +
decoupled-delta mechanism of :mod:`dualoptim_jax.moments`; ``scale_by_dualoptim``
is :func:`dualoptim_jax.decoupled` around ``optax.scale_by_adam``.

References:
  Zhong et al., "DualOptim: Enhancing Efficacy and Stability in Machine
  Unlearning with Dual Optimizers", 2025.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dualoptim_jax import objective as objective_lib
from dualoptim_jax.decoupled import decoupled
from dualoptim_jax.hyperparams import check_decay, check_eps, is_traced, static_value
from dualoptim_jax.moments import Direction, Moment, shared_base_moments
from dualoptim_jax.storage import StoragePolicy, resolve_storage, state_storage


def adam_moments(b1: float, b2: float, base_b1: float, base_b2: float) -> tuple[Moment, Moment]:
  """Adam's statistics: the gradient and its square."""
  return (
    Moment(lambda g: g, decay=b1, base_decay=base_b1),
    Moment(jnp.square, decay=b2, base_decay=base_b2, nonnegative=True),
  )


def adam_direction(eps: float, eps_root: float = 0.0) -> Direction:
  """``m / (sqrt(|v| + eps_root) + eps)``; ``|.|`` as a delta estimate can go negative."""

  def direction(current, previous, g):
    del previous, g
    m, v = current
    v = jnp.abs(v)
    if eps_root:
      v = v + eps_root
    return m / (jnp.sqrt(v) + eps)

  return direction


def scale_by_dualoptim_plus(
  b1: float = 0.9,
  b2: float = 0.95,
  base_b1: float = 0.9,
  base_b2: float = 0.95,
  eps: float = 1e-8,
  *,
  num_objectives: int = 2,
  storage: StoragePolicy | None = None,
  state_bits: int | None = None,
  careful_rounding: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales updates with DualOptim+ (shared base + decoupled deltas, Adam form).

  For the active objective :math:`k`, global step :math:`n` and the objective's
  own step :math:`t_k`, with base moments :math:`m_B, v_B` (EMAs over every
  step) and delta moments :math:`m_{\Delta k}, v_{\Delta k}`:

  .. math::

    \hat m_B &= m_B / (1 - \bar\beta_1^{\,n-1}), \quad
    \hat v_B = v_B / (1 - \bar\beta_2^{\,n-1}) \quad (0 \text{ at } n = 1) \\
    m_{\Delta k} &\leftarrow \beta_1 m_{\Delta k} + (1-\beta_1)(g - \hat m_B) \\
    v_{\Delta k} &\leftarrow \beta_2 v_{\Delta k} + (1-\beta_2)(g^2 - \hat v_B) \\
    u &= \frac{m_{\Delta k}/(1-\beta_1^{t_k}) + \hat m_B}
             {\sqrt{|v_{\Delta k}/(1-\beta_2^{t_k}) + \hat v_B|} + \epsilon} \\
    m_B &\leftarrow \bar\beta_1 m_B + (1-\bar\beta_1) g, \quad
    v_B \leftarrow \bar\beta_2 v_B + (1-\bar\beta_2) g^2

  This follows the authors' released code: the update uses the base from
  before this step, the base's bias correction counts global steps
  (:math:`n-1`), and the denominator takes :math:`|\cdot|` (the poster's
  pseudo-code prints :math:`t_k` for the base and omits the absolute value).

  Args:
    b1: decay of the first-moment deltas, in [0, 1).
    b2: decay of the second-moment deltas, in [0, 1).
    base_b1: decay of the shared first-moment base, in [0, 1).
    base_b2: decay of the shared second-moment base, in [0, 1).
    eps: added to the denominator, >= 0.
    num_objectives: K >= 1 objectives, each with its own deltas.
    storage: where the moments live, a :data:`~dualoptim_jax.StoragePolicy`
      from :func:`~dualoptim_jax.state_storage` (8 bits, float dtype, which
      leaves stay float, ...); default: float, the parameters' dtype. Maths
      runs in float32 (or float64 for float64 states).
    state_bits: sugar: 8 is ``storage=dj.state_storage(state_bits=8)``.
    careful_rounding: form the combined moments as
      :math:`(\beta v_\Delta + (1-\beta) g^2)/c + \hat v_B\,\beta(1-\beta^{t_k-1})/c`
      (:math:`c = 1-\beta^{t_k}`; likewise the first moment): the same update in
      exact arithmetic, without rounding :math:`g^2 - \hat v_B`, which in float32
      is noise when :math:`\hat v_B \gg g^2`. Default ``False``: the released
      rounding. See :func:`~dualoptim_jax.moments.combine_carefully`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update`` needs
    ``objective=`` (int or int32 scalar array). State:
    :class:`~dualoptim_jax.moments.SharedBaseState` with ``base = (m_B, v_B)``
    and ``deltas[k] = (m_Δk, v_Δk)``.

  References:
    Zhong et al., "DualOptim: Enhancing Efficacy and Stability in Machine
    Unlearning with Dual Optimizers", 2025.
  """
  for name, value in (("b1", b1), ("b2", b2), ("base_b1", base_b1), ("base_b2", base_b2)):
    check_decay(name, value)
  check_eps(eps)
  return shared_base_moments(
    adam_moments(b1, b2, base_b1, base_b2),
    adam_direction(eps),
    num_objectives=num_objectives,
    storage=resolve_storage(storage, state_bits),
    careful_rounding=careful_rounding,
  )


def scale_by_dualoptim(
  b1: float = 0.9,
  b2: float = 0.95,
  eps: float = 1e-8,
  *,
  num_objectives: int = 2,
  storage: StoragePolicy | None = None,
  state_bits: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales updates with DualOptim: a separate Adam state per objective.

  For the active objective :math:`k` with its own step count :math:`t_k`:

  .. math::

    m_k &\leftarrow \beta_1 m_k + (1-\beta_1) g, \quad
    v_k \leftarrow \beta_2 v_k + (1-\beta_2) g^2 \\
    u &= \frac{m_k / (1-\beta_1^{t_k})}{\sqrt{v_k / (1-\beta_2^{t_k})} + \epsilon}

  With the default storage this is exactly :func:`~dualoptim_jax.decoupled`
  around ``optax.scale_by_adam``. With a ``storage`` policy (e.g. 8 bits) it is
  the shared-base mechanism without a base (``use_base=False``), whose
  per-objective moments are the Adam moments, stored as the policy says.

  Args:
    b1: first-moment decay, in [0, 1).
    b2: second-moment decay, in [0, 1).
    eps: added to the denominator, >= 0.
    num_objectives: K >= 1.
    storage: a :data:`~dualoptim_jax.StoragePolicy` (default: optax's float
      states).
    state_bits: sugar: 8 is ``storage=dj.state_storage(state_bits=8)``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``. Its state is a
    :class:`~dualoptim_jax.decoupled.DecoupledState` holding K
    ``optax.ScaleByAdamState`` (default) or a
    :class:`~dualoptim_jax.SharedBaseState` with ``base=()`` and
    ``deltas[k] = (m_k, v_k)`` (with ``storage`` or ``state_bits=8``).
  """
  check_decay("b1", b1)
  check_decay("b2", b2)
  check_eps(eps)
  if storage is None and static_value("state_bits", state_bits) in (None, 32):
    return decoupled(optax.scale_by_adam(b1, b2, eps), num_objectives=num_objectives)
  return shared_base_moments(
    adam_moments(b1, b2, b1, b2),
    adam_direction(eps),
    num_objectives=num_objectives,
    storage=resolve_storage(storage, state_bits),
    use_base=False,
  )


def scale_by_adam_8bit(
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  eps_root: float = 0.0,
  mu_dtype: Any = None,
  *,
  storage: StoragePolicy | None = None,
) -> optax.GradientTransformationExtraArgs:
  """``optax.scale_by_adam`` with block-wise 8-bit moments (bitsandbytes-style).

  The single-objective, base-free instance of the shared-base mechanism. Like
  ``optax.scale_by_adam`` its ``update`` ignores ``objective=`` (a
  multi-objective loop may pass one, static or traced).

  Args:
    b1, b2, eps, eps_root: as ``optax.scale_by_adam``.
    mu_dtype: dtype of the moments kept float (default: the parameters').
    storage: a :data:`~dualoptim_jax.StoragePolicy` replacing the default
      ``dj.state_storage(state_bits=8, dtype=mu_dtype)`` (e.g. another block
      size, or ``keep_fp32``).
  """
  check_decay("b1", b1)
  check_decay("b2", b2)
  check_eps(eps)
  check_eps(eps_root)
  return shared_base_moments(
    adam_moments(b1, b2, b1, b2),
    adam_direction(eps, eps_root),
    num_objectives=1,
    use_base=False,
    storage=resolve_storage(storage, dtype=mu_dtype)
    if storage
    else state_storage(state_bits=8, dtype=mu_dtype),
  )


class ScaleByObjectiveLearningRateState(NamedTuple):
  """State of :func:`scale_by_objective_learning_rate`."""

  count: jax.Array  # int32 [], global steps (drives a schedule), saturating.


def check_lr_scales(lr_scales: Sequence[float] | None, num_objectives: int) -> tuple[float, ...]:
  """Validates per-objective learning-rate multipliers (default all 1)."""
  if lr_scales is None:
    return (1.0,) * num_objectives
  try:
    scales = tuple(float(s) for s in lr_scales)
  except (TypeError, ValueError):
    raise ValueError(
      f"lr_scales must be a sequence of {num_objectives} numbers, got {lr_scales!r}."
    ) from None
  if len(scales) != num_objectives:
    raise ValueError(
      f"lr_scales must have one entry per objective ({num_objectives}), got "
      f"{len(scales)}: {lr_scales!r}."
    )
  if not all(np.isfinite(s) and s >= 0 for s in scales):
    raise ValueError(f"lr_scales must be finite and >= 0, got {lr_scales!r}.")
  return scales


def scale_by_objective_learning_rate(
  learning_rate: optax.ScalarOrSchedule,
  *,
  lr_scales: Sequence[float] | None = None,
  num_objectives: int = 2,
) -> optax.GradientTransformationExtraArgs:
  r"""Scales updates by :math:`-\eta(n) \cdot s_k` for the active objective k.

  :math:`\eta` is a float or an optax schedule of the global step :math:`n`
  (counted over all objectives); :math:`s_k` = ``lr_scales[k]`` gives each
  objective its own learning rate (e.g. the paper's forget / retain rates).

  Args:
    learning_rate: a float or a schedule ``step -> lr``.
    lr_scales: K non-negative multipliers (default all 1).
    num_objectives: K >= 1.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` takes
    ``objective=`` (int or int32 scalar array; out of range gives NaN).
  """
  num_objectives = objective_lib.validate_num_objectives(num_objectives)
  scales = check_lr_scales(lr_scales, num_objectives)
  if not callable(learning_rate) and not is_traced(learning_rate):
    try:
      float(learning_rate)
    except (TypeError, ValueError):
      raise ValueError(
        f"learning_rate must be a number or a schedule, got {learning_rate!r}."
      ) from None

  def init_fn(params):
    del params
    return ScaleByObjectiveLearningRateState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, *, objective=None, **extra_args):
    del params, extra_args
    objective = objective_lib.check_objective(objective, num_objectives)
    lr = jnp.asarray(learning_rate(state.count) if callable(learning_rate) else learning_rate)
    count = jnp.asarray(optax.safe_increment(state.count))
    if objective_lib.is_static(objective):
      step_size = -lr * scales[objective]
    else:
      # Out of range: NaN updates and no step counted, like the scale_by_*.
      valid = (objective >= 0) & (objective < num_objectives)
      index = jnp.clip(objective, 0, num_objectives - 1)
      scale = jnp.where(valid, jnp.asarray(scales, jnp.float32)[index], jnp.nan)
      step_size = -lr * scale
      count = jnp.where(valid, count, state.count)
    updates = jax.tree.map(lambda g: (step_size * g).astype(g.dtype), updates)
    return updates, ScaleByObjectiveLearningRateState(count=count)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
