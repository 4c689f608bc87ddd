r"""DualOptim+ for Lion, EMA-SGD, RMSprop and Adafactor: statistics + direction.

Each optimizer here is an instance of :func:`dualoptim_jax.moments.shared_base_moments`
(the Adam instance is :func:`dualoptim_jax.scale_by_dualoptim_plus`). An
instance names its stored statistics (:class:`~dualoptim_jax.moments.Moment`) and
its ``direction(current, previous, g)``, where ``current[i]`` is the combined
estimate :math:`M_i = \hat D_{i,k} + \hat B_i` after this step's delta EMA and
``previous[i]`` the same estimate before it. Everything else (shared base,
per-objective deltas, bias corrections, storage, static or traced objective) is
the mechanism's.

Deltas can push a combined estimate of a nonnegative statistic below zero, so
second-moment directions read :math:`|M|`, as the Adam instance does.

Their DualOptim counterparts (one plain optimizer state per objective) need no
code: ``dj.decoupled(optax.lion(...))``, ``dj.decoupled(optax.rmsprop(...))``,
``dj.decoupled(optax.adafactor(...))``, and for the EMA form of SGD used here
``dj.decoupled(optax.sgd(lr * (1 - momentum), momentum, nesterov))``.

References:
  Zhong et al., "DualOptim: Enhancing Efficacy and Stability in Machine
  Unlearning with Dual Optimizers", 2025.
  Chen et al., "Symbolic Discovery of Optimization Algorithms", 2023 (Lion).
  Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory
  Cost", 2018.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dualoptim_jax.hyperparams import check_decay, check_eps
from dualoptim_jax.moments import Direction, Moment, shared_base_moments
from dualoptim_jax.storage import StoragePolicy, resolve_storage


def _identity(g: jax.Array) -> jax.Array:
  return g


def _build(
  moments: tuple[Moment, ...],
  direction: Direction,
  num_objectives: int,
  storage: StoragePolicy | None,
  state_bits: int | None,
) -> optax.GradientTransformationExtraArgs:
  return shared_base_moments(
    moments,
    direction,
    num_objectives=num_objectives,
    storage=resolve_storage(storage, state_bits),
  )


# ---------------------------------------------------------------------------
# Lion


def lion_moments(b2: float, base_b2: float) -> tuple[Moment]:
  """Lion's one statistic: the gradient, tracked with ``b2``, no bias correction."""
  return (Moment(_identity, decay=b2, base_decay=base_b2, bias_correction=False),)


def lion_direction(b1: float) -> Direction:
  """``sign(b1 * m_prev + (1 - b1) * g)``: the estimate before this step's EMA."""

  def direction(current, previous, g):
    del current
    return jnp.sign(b1 * previous[0] + (1 - b1) * g)

  return direction


def scale_by_dualoptim_plus_lion(
  b1: float = 0.9,
  b2: float = 0.99,
  base_b2: float = 0.99,
  *,
  num_objectives: int = 2,
  storage: StoragePolicy | None = None,
  state_bits: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales updates with DualOptim+ in Lion form.

  One momentum, no bias correction (as ``optax.scale_by_lion``). For the active
  objective :math:`k` with shared base :math:`B` and delta :math:`D_k`:

  .. math::

    m^{\text{prev}} &= D_k + B \\
    u &= \operatorname{sign}\big(\beta_1 m^{\text{prev}} + (1-\beta_1) g\big) \\
    D_k &\leftarrow \beta_2 D_k + (1-\beta_2)(g - B), \quad
    B \leftarrow \bar\beta_2 B + (1-\bar\beta_2) g

  :math:`m^{\text{prev}}` is the objective's momentum estimate before this
  step, which ``optax.scale_by_lion`` interpolates with :math:`g` in the same
  way.

  Args:
    b1: interpolation between momentum and gradient in the update, in [0, 1).
    b2: decay of the momentum deltas, in [0, 1).
    base_b2: decay of the shared momentum base, in [0, 1).
    num_objectives: K >= 1 objectives, each with its own delta.
    storage: where the moments live, a :data:`~dualoptim_jax.StoragePolicy`
      from :func:`~dualoptim_jax.state_storage` (default: float, the
      parameters' dtype).
    state_bits: sugar: 8 is ``storage=dj.state_storage(state_bits=8)``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs
    ``objective=``; state :class:`~dualoptim_jax.moments.SharedBaseState` with
    ``base = (B,)`` and ``deltas[k] = (D_k,)``.

  References:
    Chen et al., "Symbolic Discovery of Optimization Algorithms", 2023.
  """
  for name, value in (("b1", b1), ("b2", b2), ("base_b2", base_b2)):
    check_decay(name, value)
  return _build(
    lion_moments(b2, base_b2),
    lion_direction(b1),
    num_objectives,
    storage,
    state_bits,
  )


# ---------------------------------------------------------------------------
# SGD with momentum (EMA form)


def sgd_moments(momentum: float, base_momentum: float) -> tuple[Moment]:
  """The gradient, tracked as an EMA with ``momentum``, no bias correction."""
  return (
    Moment(
      _identity,
      decay=momentum,
      base_decay=base_momentum,
      bias_correction=False,
    ),
  )


def sgd_direction(momentum: float, nesterov: bool) -> Direction:
  """``m``, or with Nesterov ``momentum * m + (1 - momentum) * g``."""

  def direction(current, previous, g):
    del previous
    if nesterov:
      return momentum * current[0] + (1 - momentum) * g
    return current[0]

  return direction


def scale_by_dualoptim_plus_sgd(
  momentum: float = 0.9,
  nesterov: bool = False,
  base_momentum: float = 0.9,
  *,
  num_objectives: int = 2,
  storage: StoragePolicy | None = None,
  state_bits: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales updates with DualOptim+ in SGD-with-momentum form (EMA form).

  The momentum is an exponential moving average of the gradient,
  :math:`m \leftarrow \mu m + (1-\mu) g`, with no bias correction. For the
  active objective :math:`k`:

  .. math::

    D_k &\leftarrow \mu D_k + (1-\mu)(g - B), \quad m = D_k + B \\
    u &= m \quad\text{or, with Nesterov,}\quad u = \mu m + (1-\mu) g \\
    B &\leftarrow \bar\mu B + (1-\bar\mu) g

  Why the EMA form: the shared base and the deltas are EMAs, so the
  statistics must be; ``optax.trace`` (:math:`t \leftarrow g + \mu t`) is
  :math:`1/(1-\mu)` times the EMA, so plain EMA-SGD with learning rate
  :math:`\eta` is exactly ``optax.sgd(η (1 - μ), μ, nesterov)``. Why no bias
  correction: ``optax.trace`` has none either, so the above equivalence holds
  from the first step and a learning-rate warm-up absorbs the early damping.

  Args:
    momentum: decay of the momentum deltas, in [0, 1).
    nesterov: use the Nesterov look-ahead.
    base_momentum: decay of the shared momentum base, in [0, 1).
    num_objectives: K >= 1.
    storage: where the moments live, a :data:`~dualoptim_jax.StoragePolicy`
      from :func:`~dualoptim_jax.state_storage` (default: float, the
      parameters' dtype).
    state_bits: sugar: 8 is ``storage=dj.state_storage(state_bits=8)``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` needing ``objective=``; state
    :class:`~dualoptim_jax.moments.SharedBaseState` with one moment.
  """
  check_decay("momentum", momentum)
  check_decay("base_momentum", base_momentum)
  if not isinstance(nesterov, bool):
    raise ValueError(f"nesterov must be a bool, got {nesterov!r}.")
  return _build(
    sgd_moments(momentum, base_momentum),
    sgd_direction(momentum, nesterov),
    num_objectives,
    storage,
    state_bits,
  )


# ---------------------------------------------------------------------------
# RMSprop


def rmsprop_moments(
  decay: float, base_decay: float, bias_correction: bool = False
) -> tuple[Moment]:
  """RMSprop's one statistic: the squared gradient."""
  return (
    Moment(
      jnp.square,
      decay=decay,
      base_decay=base_decay,
      bias_correction=bias_correction,
      nonnegative=True,
    ),
  )


def rmsprop_direction(eps: float, eps_in_sqrt: bool) -> Direction:
  """``g / sqrt(|v| + eps)`` (eps in the root) or ``g / (sqrt(|v|) + eps)``."""

  def direction(current, previous, g):
    del previous
    v = jnp.abs(current[0])
    if eps_in_sqrt:
      return g * jax.lax.rsqrt(v + eps)
    return g / (jnp.sqrt(v) + eps)

  return direction


def scale_by_dualoptim_plus_rmsprop(
  decay: float = 0.9,
  eps: float = 1e-8,
  base_decay: float = 0.9,
  *,
  eps_in_sqrt: bool = True,
  bias_correction: bool = False,
  num_objectives: int = 2,
  storage: StoragePolicy | None = None,
  state_bits: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales updates with DualOptim+ in RMSprop form (``optax.scale_by_rms``).

  For the active objective :math:`k` (hats: bias corrections, only with
  ``bias_correction=True``; the base's counts global steps as in the core):

  .. math::

    D_k &\leftarrow \rho D_k + (1-\rho)(g^2 - \hat B), \quad
    v = \hat D_k + \hat B \\
    u &= g / \sqrt{|v| + \epsilon} \quad (\texttt{eps\_in\_sqrt}) \quad\text{or}\quad
    u = g / (\sqrt{|v|} + \epsilon) \\
    B &\leftarrow \bar\rho B + (1-\bar\rho) g^2

  As in ``optax.rmsprop``'s defaults the second moment starts at 0 and is not
  bias corrected. Not provided: ``initial_scale != 0``, ``centered`` and the
  ``momentum`` trace (chain ``optax.trace`` after the alias for the latter).

  Args:
    decay: decay of the second-moment deltas, in [0, 1).
    eps: regulariser, >= 0.
    base_decay: decay of the shared second-moment base, in [0, 1).
    eps_in_sqrt: put ``eps`` inside the square root (optax's default).
    bias_correction: Adam-style bias correction of base and deltas.
    num_objectives: K >= 1.
    storage: where the moments live, a :data:`~dualoptim_jax.StoragePolicy`
      from :func:`~dualoptim_jax.state_storage` (default: float, the
      parameters' dtype).
    state_bits: sugar: 8 is ``storage=dj.state_storage(state_bits=8)``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` needing ``objective=``.
  """
  check_decay("decay", decay)
  check_decay("base_decay", base_decay)
  check_eps(eps)
  return _build(
    rmsprop_moments(decay, base_decay, bias_correction),
    rmsprop_direction(eps, eps_in_sqrt),
    num_objectives,
    storage,
    state_bits,
  )


# ---------------------------------------------------------------------------
# Adafactor (factored second moments)


def factored_dims(
  shape: tuple[int, ...], factored: bool, min_dim_size_to_factor: int
) -> tuple[int, int] | None:
  """``(d1, d0)``: the second-largest and largest axes, or None (not factored).

  Same rule as ``optax.scale_by_factored_rms``: factor only when the two
  largest axes both have at least ``min_dim_size_to_factor`` elements.
  """
  if not factored or len(shape) < 2:
    return None
  order = np.argsort(shape)
  if shape[order[-2]] < min_dim_size_to_factor:
    return None
  return int(order[-2]), int(order[-1])


def adafactor_moments(
  b2: float,
  base_b2: float,
  eps: float,
  factored: bool,
  min_dim_size_to_factor: int,
) -> tuple[Moment, Moment]:
  """Row and column means of ``g^2 + eps``; unfactored leaves keep the full one.

  Moment 0 is the row statistic (mean over the largest axis ``d0``) or, for an
  unfactored leaf, ``g^2 + eps`` itself; moment 1 is the column statistic (mean
  over ``d1``) or a one-element placeholder (as optax stores).
  """

  def dims(g):
    return factored_dims(g.shape, factored, min_dim_size_to_factor)

  def row(g):
    sq = jnp.square(g) + eps
    d = dims(g)
    return sq if d is None else jnp.mean(sq, axis=d[1])

  def col(g):
    d = dims(g)
    if d is None:
      return jnp.zeros((1,), g.dtype)
    return jnp.mean(jnp.square(g) + eps, axis=d[0])

  return (
    Moment(row, decay=b2, base_decay=base_b2, nonnegative=True),
    Moment(col, decay=b2, base_decay=base_b2, nonnegative=True),
  )


def adafactor_direction(eps: float, factored: bool, min_dim_size_to_factor: int) -> Direction:
  r"""``g / sqrt(v̂)`` with :math:`\hat v = R \otimes C / \operatorname{mean}(R)`.

  ``R`` and ``C`` are read as ``max(|M|, eps)``: a plain EMA of ``g^2 + eps``
  is never below ``eps``, so the floor only matters when deltas cancel the
  base, where it keeps the update finite.
  """

  def direction(current, previous, g):
    del previous
    r, c = (jnp.maximum(jnp.abs(x), eps) for x in current)
    d = factored_dims(g.shape, factored, min_dim_size_to_factor)
    if d is None:
      return g * jax.lax.rsqrt(r)
    d1, d0 = d
    # r lost axis d0, so d1 moved down by one if it came after d0.
    r_axis = d1 - 1 if d1 > d0 else d1
    row_factor = jax.lax.rsqrt(r / jnp.mean(r, axis=r_axis, keepdims=True))
    col_factor = jax.lax.rsqrt(c)
    return g * jnp.expand_dims(row_factor, d0) * jnp.expand_dims(col_factor, d1)

  return direction


def scale_by_dualoptim_plus_adafactor(
  b2: float = 0.999,
  base_b2: float = 0.999,
  eps: float = 1e-30,
  *,
  factored: bool = True,
  min_dim_size_to_factor: int = 128,
  num_objectives: int = 2,
  storage: StoragePolicy | None = None,
  state_bits: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales updates with DualOptim+ over Adafactor's factored second moments.

  For a leaf whose two largest axes (``d1`` < ``d0`` in size order) both have
  at least ``min_dim_size_to_factor`` elements, the statistics are the row and
  column means of :math:`g^2 + \epsilon_1` (Shazeer & Stern, 2018, Alg. 4);
  other leaves keep the full :math:`g^2 + \epsilon_1`. Each statistic gets a
  shared base and per-objective deltas, bias corrected as in the Adam instance
  (base by global steps :math:`n-1`, delta by the objective's steps
  :math:`t_k`). With combined estimates :math:`R = \hat D^{R}_k + \hat B^{R}`,
  :math:`C = \hat D^{C}_k + \hat B^{C}` (read as :math:`\max(|\cdot|,\epsilon_1)`):

  .. math::

    \hat v_{ij} = R_i C_j / \operatorname{mean}(R), \qquad
    u = g / \sqrt{\hat v} \quad (\text{unfactored: } u = g / \sqrt{V})

  Differences from ``optax.scale_by_factored_rms``: the decay is a constant
  ``b2`` with Adam-style bias correction instead of the schedule
  :math:`1 - t^{-0.8}` (the mechanism's EMAs need a constant decay; both are
  unbiased from the first step, and Zhai et al. 2021 also cap the decay).
  Update clipping and the relative step size are not part of this transform:
  :func:`dualoptim_jax.dualoptim_plus_adafactor` chains optax's
  ``clip_by_block_rms`` and ``scale_by_param_block_rms`` as ``optax.adafactor``
  does.

  Args:
    b2: decay of the second-moment deltas, in [0, 1).
    base_b2: decay of the shared second-moment bases, in [0, 1).
    eps: :math:`\epsilon_1`, added to :math:`g^2`, >= 0.
    factored: factor leaves with two large axes (else full second moments).
    min_dim_size_to_factor: the smallest size of both factored axes, >= 1.
    num_objectives: K >= 1.
    storage: where the moments live, a :data:`~dualoptim_jax.StoragePolicy`
      from :func:`~dualoptim_jax.state_storage` (default: float, the
      parameters' dtype).
      A policy sees each factored moment's own (smaller) shape.
    state_bits: sugar: 8 is ``storage=dj.state_storage(state_bits=8)``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` needing ``objective=``; state
    :class:`~dualoptim_jax.moments.SharedBaseState` with ``base = (R, C)``.

  References:
    Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory
    Cost", 2018.
  """
  check_decay("b2", b2)
  check_decay("base_b2", base_b2)
  check_eps(eps)
  if (
    isinstance(min_dim_size_to_factor, bool)
    or not isinstance(min_dim_size_to_factor, numbers.Integral)
    or min_dim_size_to_factor < 1
  ):
    raise ValueError(f"min_dim_size_to_factor must be an int >= 1, got {min_dim_size_to_factor!r}.")
  return _build(
    adafactor_moments(b2, base_b2, eps, factored, min_dim_size_to_factor),
    adafactor_direction(eps, factored, min_dim_size_to_factor),
    num_objectives,
    storage,
    state_bits,
  )
