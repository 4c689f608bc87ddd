r"""Shared base + decoupled deltas over any exponential-moving-average statistics.

This is the DualOptim+ mechanism (Zhong et al., 2025), written once for every
optimizer whose state is a set of EMAs of gradient statistics. An optimizer is
described by

* its **moments**: statistics :math:`s_i(g)` (e.g. :math:`g` and :math:`g^2` for
  Adam) with a delta decay :math:`\beta_i` and a base decay :math:`\bar\beta_i`;
* its **direction**: how an update is formed from the moment estimates.

For the active objective :math:`k`, global step :math:`n` (1-based) and the
objective's own step :math:`t_k`, each moment keeps a *shared base*
:math:`B_i` (an EMA of :math:`s_i(g)` over every step, all objectives) and one
*decoupled delta* :math:`D_{i,k}` per objective:

.. math::

  \hat B_i &= B_i / (1 - \bar\beta_i^{\,n-1}) \qquad (\hat B_i = 0 \text{ at } n = 1) \\
  D_{i,k} &\leftarrow \beta_i D_{i,k} + (1 - \beta_i)\,(s_i(g) - \hat B_i) \\
  M_i &= D_{i,k} / (1 - \beta_i^{\,t_k}) + \hat B_i \\
  u &= \mathrm{direction}(M, M^{\text{prev}}, g) \\
  B_i &\leftarrow \bar\beta_i B_i + (1 - \bar\beta_i)\, s_i(g)

The update uses the base from *before* this step, and the base's bias
correction counts global steps, as in the authors' released code. Moments with
``bias_correction=False`` (Lion, EMA-SGD, RMSprop) use :math:`\hat B = B` and
:math:`M_i = D_{i,k} + \hat B_i`. :math:`M^{\text{prev}}` is the same estimate
formed from the deltas before this step's EMA (Lion interpolates it with the
gradient).

Only the active objective's deltas are read or written. Scalars of the bias
corrections are computed once per step and applied as multiplications (on
XLA:CPU a division per element is measurably slower).

Storage: every stored moment leaf goes through a :class:`MomentCodec` chosen per
leaf from its global shape (float32/``mu_dtype`` by default; 8-bit block-wise
quantisation, see :mod:`dualoptim_jax.quantize`). The maths above never sees the
storage format.

References:
  Zhong et al., "DualOptim: Enhancing Efficacy and Stability in Machine
  Unlearning with Dual Optimizers", 2025.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.core import Tracer
from optax._src import numerics

from dualoptim_jax import objective as objective_lib

Array = jax.Array
# (current moment estimates, previous moment estimates, gradient) -> update.
Direction = Callable[[Sequence[Array], Sequence[Array], Array], Array]


class Moment(NamedTuple):
  """One stored statistic of the gradient.

  Attributes:
    statistic: ``s(g)``, applied per leaf; may change the shape (factored
      second moments).
    decay: EMA decay of the per-objective deltas, in [0, 1).
    base_decay: EMA decay of the shared base, in [0, 1).
    bias_correction: divide by ``1 - decay**steps`` (Adam-style) or not.
    nonnegative: ``s(g) >= 0`` always (so the base may be stored with an
      unsigned quantisation map; deltas are always signed).
  """

  statistic: Callable[[Array], Array]
  decay: float
  base_decay: float
  bias_correction: bool = True
  nonnegative: bool = False


class MomentCodec(NamedTuple):
  """How one moment leaf is stored: ``encode`` float -> stored, ``decode`` back."""

  init: Callable[[jax.ShapeDtypeStruct], Any]
  encode: Callable[[Array], Any]
  decode: Callable[[Any], Array]


# (path of the parameter, the stored moment's global shape and the parameter's
#  dtype, moment index, is_base, whether the stored value is never negative)
#  -> codec. Decided from global shapes only, so
# every shard of a sharded parameter makes the same choice.
StoragePolicy = Callable[[tuple, jax.ShapeDtypeStruct, int, bool, bool], MomentCodec]


def float_codec(dtype: Any) -> MomentCodec:
  """Stores a moment as a plain array of ``dtype``."""
  return MomentCodec(
    init=lambda spec: jnp.zeros(spec.shape, dtype),
    encode=lambda x: x.astype(dtype),
    decode=lambda x: x,
  )


def float_storage(dtype: Any = None) -> StoragePolicy:
  """Every moment as a plain array (``dtype=None``: the parameter's dtype)."""

  def policy(path, param, index, is_base, nonnegative):
    del path, index, is_base, nonnegative
    return float_codec(dtype or param.dtype)

  return policy


class SharedBaseState(NamedTuple):
  """State of :func:`shared_base_moments`.

  Attributes:
    count: int32 ``[]``, global steps taken (all objectives), saturating.
    counts: int32 ``[K]``, steps taken by each objective, saturating.
    base: one param-shaped tree per moment: the shared base :math:`B_i`.
    deltas: ``deltas[k][i]``, a param-shaped tree: the delta :math:`D_{i,k}`
      of moment ``i`` for objective ``k``. Kept as a tuple of K trees (not a
      stacked K axis) so parameter sharding annotations apply unchanged.
  """

  count: Array
  counts: Array
  base: tuple[Any, ...]
  deltas: tuple[tuple[Any, ...], ...]


def is_traced(value: Any) -> bool:
  """True for a traced hyperparameter (e.g. under ``optax.inject_hyperparams``)."""
  return isinstance(value, jax.core.Tracer)


def check_decay(name: str, value: Any) -> float:
  """Raises unless ``0 <= value < 1`` (traced values are checked by the caller)."""
  if is_traced(value):
    return value
  try:
    ok = 0.0 <= float(value) < 1.0
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise ValueError(f"{name} must be in [0, 1), got {value!r}.")
  return value


def _compute_dtype(dtype: Any) -> Any:
  # float64 only when the state itself is float64 (x64 mode); otherwise float32,
  # also for bfloat16 storage, whose precision is far too low for the EMAs.
  return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def _power(beta: float, steps: Array, dtype: Any) -> Array:
  return jnp.asarray(beta, dtype) ** steps.astype(dtype)


def _reciprocal_correction(beta: float, steps: Array, dtype: Any) -> Array:
  """``1 / (1 - beta**steps)``, and 0 for ``steps == 0``.

  At zero steps the EMA is still zero, so 0 is the right factor; the guarded
  division also keeps checkify's division-by-zero check quiet.
  """
  correction = 1 - _power(beta, steps, dtype)
  safe = jnp.where(steps > 0, correction, jnp.ones([], dtype))
  return jnp.where(steps > 0, 1 / safe, jnp.zeros([], dtype))


class _Init(NamedTuple):
  init: Callable[[Any], Any]


def _on_a_mesh(params: Any) -> bool:
  """Whether ``params`` are concrete arrays laid out on a mesh of more than one device."""
  return any(
    isinstance(x, jax.Array)
    and not isinstance(x, Tracer)
    and isinstance(x.sharding, jax.sharding.NamedSharding)
    and x.sharding.mesh.size > 1
    for x in jax.tree.leaves(params)
  )


def _spec(leaf: Any) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(jnp.shape(leaf), jnp.result_type(leaf))


def _leaf_paths(tree: Any) -> list[tuple]:
  return [path for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def shared_base_moments(
  moments: Sequence[Moment],
  direction: Direction,
  *,
  num_objectives: int = 2,
  storage: StoragePolicy | None = None,
  use_base: bool = True,
) -> optax.GradientTransformationExtraArgs:
  r"""Builds a DualOptim+ transform from moments and a direction.

  Args:
    moments: the stored statistics of the optimizer.
    direction: ``direction(current, previous, g) -> update`` per leaf, where
      ``current[i]`` / ``previous[i]`` are the combined estimates
      :math:`M_i` after / before this step's delta EMA (see module doc).
    num_objectives: K >= 1, the number of objectives.
    storage: how each moment leaf is stored (default: the parameter's dtype).
    use_base: ``False`` drops the shared base (:math:`\hat B = 0`): each
      objective then runs the plain optimizer on its own state (DualOptim), and
      with K = 1 this is the plain optimizer itself (used for 8-bit Adam).

  Returns:
    A transform whose ``update(updates, state, params=None, *, objective)``
    takes the active objective as an int (specialised at trace time) or an
    int32 scalar array (one program for all objectives).
  """
  moments = tuple(moments)
  if not moments:
    raise ValueError("moments must name at least one statistic, got none.")
  for i, m in enumerate(moments):
    check_decay(f"moments[{i}].decay", m.decay)
    check_decay(f"moments[{i}].base_decay", m.base_decay)
  num_objectives = objective_lib.validate_num_objectives(num_objectives)
  storage = storage or float_storage()

  def codecs_for(tree):
    """Per leaf: (codec of the base, codec of the deltas) for every moment.

    Chosen from the stored moment's global shape (a factored moment is smaller
    than its parameter). A delta is a difference of statistics, so it can be
    negative, unless there is no base and it is the plain EMA of ``s(g)``.
    """
    leaves, _ = jax.tree.flatten(tree)
    paths = _leaf_paths(tree)
    out = []
    for path, leaf in zip(paths, leaves):
      per_moment = []
      for i, m in enumerate(moments):
        spec = jax.eval_shape(m.statistic, _spec(leaf))
        spec = jax.ShapeDtypeStruct(spec.shape, jnp.result_type(leaf))
        per_moment.append(
          (
            storage(path, spec, i, True, m.nonnegative),
            storage(path, spec, i, False, m.nonnegative and not use_base),
          )
        )
      out.append(per_moment)
    return out

  def init_fn(params):
    if _on_a_mesh(params):
      # Eager init of sharded parameters: create every leaf on its shard (a jitted init with the
      # parameters' shardings) rather than whole on one device, which would not fit at scale
      # and would be process-local in a multi-process job.
      from dualoptim_jax.sharding import init_sharded  # noqa: PLC0415 (sharding needs flax)

      return init_sharded(_Init(init_fn), params)
    leaves, treedef = jax.tree.flatten(params)
    codecs = codecs_for(params)

    def moment_tree(i, which):
      out = []
      for leaf, leaf_codecs in zip(leaves, codecs):
        spec = jax.eval_shape(moments[i].statistic, _spec(leaf))
        out.append(leaf_codecs[i][which].init(spec))
      return treedef.unflatten(out)

    base = tuple(moment_tree(i, 0) for i in range(len(moments))) if use_base else ()
    deltas = tuple(
      tuple(moment_tree(i, 1) for i in range(len(moments))) for _ in range(num_objectives)
    )
    return SharedBaseState(
      count=jnp.zeros([], jnp.int32),
      counts=jnp.zeros([num_objectives], jnp.int32),
      base=base,
      deltas=deltas,
    )

  def scales(m: Moment, dtype, n_prev, t_prev) -> tuple[Array, Array, Array]:
    """Reciprocal bias corrections (base, delta, previous delta)."""
    if not m.bias_correction:
      one = jnp.ones([], dtype)
      return one, one, one
    return (
      _reciprocal_correction(m.base_decay, n_prev, dtype),
      _reciprocal_correction(m.decay, numerics.safe_increment(t_prev), dtype),
      _reciprocal_correction(m.decay, t_prev, dtype),
    )

  def objective_step(updates, base, n_prev, t_prev, old, new=None):
    """The updates and one objective's new stored deltas.

    Args:
      updates: the gradients.
      base: the stored base (``()`` without one).
      n_prev, t_prev: global and objective steps before this one.
      old: ``old(i, j, dtype)``, the objective's delta of moment ``i`` for leaf
        ``j`` before this step, decoded.
      new: ``new(i, j, dtype, d_new)``, the delta after this step as the
        direction uses it (default: ``d_new``, this step's unrounded EMA).
    """
    leaves, treedef = jax.tree.flatten(updates)
    codecs = codecs_for(updates)
    base_leaves = [treedef.flatten_up_to(b) for b in base]
    scale_cache = {}
    new_updates, new_delta = [], [[] for _ in moments]
    for j, g in enumerate(leaves):
      dtype = _compute_dtype(g.dtype)
      gc = g.astype(dtype)
      current, previous = [], []
      for i, m in enumerate(moments):
        base_codec, delta_codec = codecs[j][i]
        key = (i, jnp.dtype(dtype))
        if key not in scale_cache:
          scale_cache[key] = scales(m, dtype, n_prev, t_prev)
        base_scale, delta_scale, prev_scale = scale_cache[key]
        d = old(i, j, dtype)
        s = m.statistic(gc)
        if use_base:
          b_hat = base_codec.decode(base_leaves[i][j]).astype(dtype) * base_scale
          d_new = m.decay * d + (1 - m.decay) * (s - b_hat)
          d_used = d_new if new is None else new(i, j, dtype, d_new)
          current.append(d_used * delta_scale + b_hat)
          previous.append(d * prev_scale + b_hat)
        else:
          d_new = m.decay * d + (1 - m.decay) * s
          d_used = d_new if new is None else new(i, j, dtype, d_new)
          current.append(d_used * delta_scale)
          previous.append(d * prev_scale)
        new_delta[i].append(delta_codec.encode(d_new))
      new_updates.append(direction(current, previous, gc).astype(g.dtype))
    return (
      treedef.unflatten(new_updates),
      tuple(treedef.unflatten(x) for x in new_delta),
    )

  def base_step(updates, base, keep=None):
    """The shared base after this step (independent of the objective).

    ``keep``: a traced bool; where True the stored base is returned unchanged.
    """
    leaves, treedef = jax.tree.flatten(updates)
    codecs = codecs_for(updates)
    new_base = []
    for i, m in enumerate(moments):
      out = []
      for j, (g, stored) in enumerate(zip(leaves, treedef.flatten_up_to(base[i]))):
        dtype = _compute_dtype(g.dtype)
        codec = codecs[j][i][0]
        b = codec.decode(stored).astype(dtype)
        b_new = m.base_decay * b + (1 - m.base_decay) * m.statistic(g.astype(dtype))
        encoded = codec.encode(b_new)
        if keep is not None:
          encoded = jax.tree.map(lambda x, y: jnp.where(keep, y, x), encoded, stored)
        out.append(encoded)
      new_base.append(treedef.unflatten(out))
    return tuple(new_base)

  def decoder(updates, stored_deltas):
    """``(i, j, dtype) -> decoded stored delta`` of moment i, leaf j, one objective."""
    leaves, treedef = jax.tree.flatten(updates)
    codecs = codecs_for(updates)
    flat = [treedef.flatten_up_to(d) for d in stored_deltas]
    return lambda i, j, dtype: codecs[j][i][1].decode(flat[i][j]).astype(dtype)

  def lossless(updates):
    """``(i, j) -> whether`` moment i's deltas of leaf j are stored unrounded."""
    leaves, _ = jax.tree.flatten(updates)
    codecs = codecs_for(updates)

    def check(i, j):
      spec = jax.eval_shape(moments[i].statistic, _spec(leaves[j]))
      stored = jax.eval_shape(codecs[j][i][1].init, spec)
      return isinstance(stored, jax.ShapeDtypeStruct) and stored.dtype == _compute_dtype(
        leaves[j].dtype
      )

    return check

  def static_update(k: int, updates, state):
    new_updates, delta = objective_step(
      updates, state.base, state.count, state.counts[k], decoder(updates, state.deltas[k])
    )
    base = base_step(updates, state.base) if use_base else state.base
    return new_updates, SharedBaseState(
      count=numerics.safe_increment(state.count),
      counts=state.counts.at[k].set(numerics.safe_increment(state.counts[k])),
      base=base,
      deltas=tuple(delta if kk == k else d for kk, d in enumerate(state.deltas)),
    )

  def traced_update(objective, updates, state):
    """One program for every objective, with no conditional around the updates.

    Each objective's deltas take this step's EMA in their own ``lax.cond``
    (:func:`~dualoptim_jax.objective.update_in_place`; only the active one
    fires, in place). The direction and the base EMAs run unconditionally: the
    direction reads the active objective's deltas through elementwise selects,
    so it fuses with what follows (weight decay, learning rate,
    ``optax.apply_updates``) and the updates are never written to memory. On
    XLA:CPU an update that leaves a conditional (``lax.switch``, or a result
    threaded through the per-objective conditionals) is a fresh buffer written,
    page-faulted and read back in every call: 1.8-3.5x the static program,
    against 0.9-1.1x this way (``benchmarks/README.md``). An objective outside
    [0, K) updates no state and gives NaN updates.
    """
    valid = objective_lib.is_valid(objective, num_objectives)
    k = jnp.clip(objective, 0, num_objectives - 1)
    n_prev, t_prev = state.count, state.counts[k]
    deltas, ready = objective_lib.update_in_place(
      objective,
      state.deltas,
      lambda kk, delta: objective_step(
        updates, state.base, n_prev, state.counts[kk], decoder(updates, delta)
      )[1],
    )
    olds = [decoder(updates, d) for d in state.deltas]
    news = [decoder(updates, d) for d in deltas]
    is_lossless = lossless(updates)

    def new(i, j, dtype, d_new):
      if not is_lossless(i, j):  # rounded when stored: use this step's EMA as is
        return d_new
      return objective_lib.select(objective, [f(i, j, dtype) for f in news])

    new_updates, _ = objective_step(
      updates,
      state.base,
      n_prev,
      t_prev,
      lambda i, j, dtype: objective_lib.select(objective, [f(i, j, dtype) for f in olds]),
      new,
    )
    new_updates = jax.tree.map(lambda u: jnp.where(valid, u, jnp.nan), new_updates)
    base = state.base
    if use_base:
      # The base is overwritten in place, so its EMA must run after the
      # conditionals that read it; selecting on their ``ready`` makes that a
      # data dependence (else XLA:CPU writes the EMA to a temporary and copies).
      base = base_step(updates, state.base, keep=~valid | (ready != 1))
    counts = state.counts.at[k].set(numerics.safe_increment(t_prev))
    return new_updates, SharedBaseState(
      count=jnp.where(valid, numerics.safe_increment(n_prev), n_prev),
      counts=jnp.where(valid, counts, state.counts),
      base=base,
      deltas=deltas,
    )

  def update_fn(updates, state, params=None, *, objective=None, **extra_args):
    del params, extra_args
    objective = objective_lib.check_objective(objective, num_objectives)
    if objective_lib.is_static(objective):
      return static_update(objective, updates, state)
    return traced_update(objective, updates, state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
