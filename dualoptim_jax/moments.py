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

Reading order: :func:`delta_ema`, :func:`combine` and :func:`base_ema` are the
equations above, :func:`leaf_step` applies them to one leaf, and
``_SharedBase.static_update`` to a tree: that is the reference.
``_SharedBase.traced_update`` computes the same for a traced objective and owns
the XLA:CPU tricks that keep it in place (its docstring says which and why).
:func:`shared_base_moments` only validates and wires.

Storage: every stored moment leaf goes through a
:class:`~dualoptim_jax.storage.MomentCodec` chosen once per update per leaf from
its global shape (:mod:`dualoptim_jax.storage`: float by default; 8-bit
block-wise quantisation). The maths above never sees the storage format.
Leaves of one shape whose codecs ask for it (8-bit ones) are stacked and
updated by one loop, so the compiled step holds one copy of the codec per
group, not per leaf (``_Plan``).

References:
  Zhong et al., "DualOptim: Enhancing Efficacy and Stability in Machine
  Unlearning with Dual Optimizers", 2025.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dualoptim_jax import objective as objective_lib
from dualoptim_jax.hyperparams import check_decay, is_traced
from dualoptim_jax.storage import MomentCodec, StoragePolicy, float_storage, placed_spec

Array = jax.Array
# (current moment estimates, previous moment estimates, gradient) -> update.
Direction = Callable[[Sequence[Array], Sequence[Array], Array], Array]


class Moment(NamedTuple):
  """One stored statistic of the gradient.

  Attributes:
    statistic: ``s(g)``, applied per leaf; may change the shape (factored
      second moments).
    decay: EMA decay :math:`\\beta` of the per-objective deltas, in [0, 1).
    base_decay: EMA decay :math:`\\bar\\beta` of the shared base, in [0, 1).
    bias_correction: divide by ``1 - decay**steps`` (Adam-style) or not.
    nonnegative: ``s(g) >= 0`` always (so the base may be stored with an
      unsigned quantisation map; deltas are always signed).
  """

  statistic: Callable[[Array], Array]
  decay: float
  base_decay: float
  bias_correction: bool = True
  nonnegative: bool = False


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


# ------------------------------------------------------------------------------
# The equations, one moment of one leaf at a time.


class Corrections(NamedTuple):
  """Per-step scalars of one moment (computed once per step, applied as products).

  Attributes:
    base: :math:`1 / (1 - \\bar\\beta^{\\,n-1})`, 0 at :math:`n = 1`.
    delta: :math:`1 / (1 - \\beta^{\\,t_k})`, this step's delta correction.
    previous: :math:`1 / (1 - \\beta^{\\,t_k - 1})`, 0 at :math:`t_k = 1`.
    careful: :math:`\\beta (1 - \\beta^{\\,t_k - 1}) / (1 - \\beta^{\\,t_k})`, the base's
      weight in :func:`combine_carefully`.
  All 1 (``careful``: :math:`\\beta`) for a moment without bias correction.
  """

  base: Array
  delta: Array
  previous: Array
  careful: Array


def _increment(count: Array) -> Array:
  """``count + 1``, saturating at the int32 maximum (``optax.safe_increment``)."""
  return jnp.asarray(optax.safe_increment(count))


def _reciprocal_correction(beta: float, steps: Array, dtype: Any) -> Array:
  """``1 / (1 - beta**steps)``, and 0 for ``steps == 0``.

  At zero steps the EMA is still zero, so 0 is the right factor; the guarded
  division also keeps checkify's division-by-zero check quiet.
  """
  correction = 1 - jnp.asarray(beta, dtype) ** steps.astype(dtype)
  safe = jnp.where(steps > 0, correction, jnp.ones([], dtype))
  return jnp.where(steps > 0, 1 / safe, jnp.zeros([], dtype))


def corrections(m: Moment, dtype: Any, n_prev: Array, t_prev: Array) -> Corrections:
  """The :class:`Corrections` of moment ``m`` after ``n_prev`` global / ``t_prev`` own steps."""
  beta = jnp.asarray(m.decay, dtype)
  if not m.bias_correction:
    one = jnp.ones([], dtype)
    return Corrections(one, one, one, beta)
  delta = _reciprocal_correction(m.decay, _increment(t_prev), dtype)
  careful = beta * (1 - beta ** t_prev.astype(dtype)) * delta
  return Corrections(
    base=_reciprocal_correction(m.base_decay, n_prev, dtype),
    delta=delta,
    previous=_reciprocal_correction(m.decay, t_prev, dtype),
    careful=careful,
  )


def delta_ema(m: Moment, d: Array, s: Array, b_hat: Array | None) -> Array:
  r""":math:`D \leftarrow \beta D + (1 - \beta)(s - \hat B)` (:math:`\hat B = 0`: ``None``)."""
  return m.decay * d + (1 - m.decay) * (s if b_hat is None else s - b_hat)


def combine(d: Array, b_hat: Array | None, scale: Array) -> Array:
  r""":math:`M = D / (1 - \beta^{t}) + \hat B`, ``scale`` the reciprocal correction."""
  return d * scale if b_hat is None else d * scale + b_hat


def combine_carefully(m: Moment, d_old: Array, s: Array, b_hat: Array, c: Corrections) -> Array:
  r"""The same :math:`M` as :func:`combine` after :func:`delta_ema`, rounded carefully.

  Substituting the delta EMA into :math:`M = D_{\text{new}}/c + \hat B`
  (:math:`c = 1 - \beta^{t}`) and collecting :math:`\hat B`:

  .. math::

    M = \frac{\beta D_{\text{old}} + (1-\beta)\, s}{c}
        + \hat B\, \frac{\beta (1 - \beta^{\,t-1})}{c},

  exact in exact arithmetic. The released form first rounds
  :math:`s - \hat B` and then adds :math:`\hat B` back: when
  :math:`\hat B \gg s` (a second moment whose base is far above this
  objective's :math:`g^2`) the result is rounding noise of the size of
  :math:`\hat B`'s last bit. Here the base enters with weight
  :math:`\beta(1-\beta^{t-1})/c`, exactly 0 at :math:`t = 1`, and :math:`s` is
  never subtracted from it. Without bias correction :math:`c = 1` and the weight
  is :math:`\beta`.
  """
  return (m.decay * d_old + (1 - m.decay) * s) * c.delta + b_hat * c.careful


def base_ema(m: Moment, b: Array, s: Array) -> Array:
  r""":math:`B \leftarrow \bar\beta B + (1 - \bar\beta)\, s`."""
  return m.base_decay * b + (1 - m.base_decay) * s


def leaf_step(
  moments: Sequence[Moment],
  direction: Direction,
  g: Array,
  b_hats: Sequence[Array | None],
  d_olds: Sequence[Array],
  scales: Sequence[Corrections],
  *,
  careful_rounding: bool = False,
  d_stored: Sequence[Array | None] | None = None,
) -> tuple[Array, list[Array]]:
  """One leaf, one objective: the module docstring's equations in order.

  Args:
    moments, direction: the optimizer.
    g: the gradient leaf, in the compute dtype.
    b_hats: per moment, the bias-corrected base :math:`\\hat B_i` before this
      step (``None`` without a base).
    d_olds: per moment, the objective's delta :math:`D_{i,k}` before this step.
    scales: per moment, this step's :class:`Corrections`.
    careful_rounding: form :math:`M` with :func:`combine_carefully`.
    d_stored: per moment, the new delta as it was stored, to use in :math:`M`
      instead of recomputing it (``None`` entries: recompute); see
      ``traced_update``.

  Returns:
    ``(update, new deltas)``; the new deltas are unrounded (to be encoded).
  """
  s = [m.statistic(g) for m in moments]
  d_new = [delta_ema(m, d, si, b) for m, d, si, b in zip(moments, d_olds, s, b_hats)]
  used = d_new if d_stored is None else [x if x is not None else y for x, y in zip(d_stored, d_new)]
  current, previous = [], []
  for m, si, d, dn, b, c in zip(moments, s, d_olds, used, b_hats, scales):
    if careful_rounding and b is not None:
      current.append(combine_carefully(m, d, si, b, c))
    else:
      current.append(combine(dn, b, c.delta))
    previous.append(combine(d, b, c.previous))
  return direction(current, previous, g), d_new


# ------------------------------------------------------------------------------
# The state's layout: one storage decision per leaf and moment, made once per call.


def _compute_dtype(dtype: Any) -> Any:
  # float64 only when the state itself is float64 (x64 mode); otherwise float32,
  # also for bfloat16 storage, whose precision is far too low for the EMAs.
  return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


class _Leaf(NamedTuple):
  """Per parameter leaf: its moments' shapes and codecs."""

  dtype: Any  # compute dtype
  specs: tuple[jax.ShapeDtypeStruct, ...]  # per moment: global shape, param dtype
  base: tuple[MomentCodec, ...]
  delta: tuple[MomentCodec, ...]
  lossless: tuple[bool, ...]  # delta stored unrounded, in the compute dtype


class _Plan(NamedTuple):
  """The state's layout: per parameter leaf its :class:`_Leaf`, and the units an update runs on.

  A *unit* is one leaf, or a group of same-shaped leaves whose codecs all ask
  to be stacked (:attr:`~dualoptim_jax.storage.MomentCodec.stack`): the group
  is stacked along a new leading axis and its per-leaf computation is the body
  of one loop over it (:meth:`run`). The maths per leaf is unchanged; the
  compiled program has one copy of the (long) codec per unit instead of per
  leaf.
  """

  treedef: Any
  leaves: list[_Leaf]  # per parameter leaf
  groups: list[tuple[int, ...]]  # per unit: the indices of its leaves

  @property
  def units(self) -> list[_Leaf]:
    """Per unit: the description its leaves share."""
    return [self.leaves[g[0]] for g in self.groups]

  def flat(self, tree: Any) -> list[Any]:
    """Per unit: its leaf of ``tree``, or its leaves stacked."""
    xs = self.treedef.flatten_up_to(tree)
    return [xs[g[0]] if len(g) == 1 else _stack([xs[i] for i in g]) for g in self.groups]

  def unflat(self, values: Sequence[Any]) -> Any:
    """Inverse of :meth:`flat`."""
    out: list[Any] = [None] * len(self.leaves)
    for g, v in zip(self.groups, values):
      if len(g) == 1:
        out[g[0]] = v
      else:
        for m, i in enumerate(g):
          out[i] = jax.tree.map(lambda a, m=m: a[m], v)
    return self.treedef.unflatten(out)

  def run(self, j: int, fn: Callable, *args: Any) -> Any:
    """``fn(*args)`` of one leaf, for unit ``j``: a loop over its leaves if it is a group.

    A loop, not ``jax.vmap``: XLA fuses a vmapped computation into each leaf's
    slice of its result, which compiles the codec once per leaf again; a
    loop's body is compiled once and its results are only copied out.
    """
    if len(self.groups[j]) == 1:
      return fn(*args)
    return jax.lax.map(lambda a: fn(*a), args)

  def split(self, trees: Sequence[Any]) -> list[list[Any]]:
    """Per unit, per moment: the stored values of ``trees`` (one tree per moment)."""
    flat = [self.flat(t) for t in trees]
    return [[f[j] for f in flat] for j in range(len(self.groups))]

  def join(self, per_unit: list[list[Any]], num_moments: int) -> tuple[Any, ...]:
    """Inverse of :meth:`split`."""
    return tuple(self.unflat([x[i] for x in per_unit]) for i in range(num_moments))


def _decode(codecs: Sequence[MomentCodec], stored: Sequence[Any], dtype: Any) -> list[Array]:
  return [c.decode(x).astype(dtype) for c, x in zip(codecs, stored)]


def _per_unit(plan: _Plan, trees: tuple) -> list[tuple]:
  """Per unit: per tree of ``trees`` (one per objective), its per-moment values."""
  split = [plan.split(t) for t in trees]
  return [tuple(s[j] for s in split) for j in range(len(plan.groups))]


def _stack(values: list[Any]) -> Any:
  return jax.tree.map(lambda *xs: jnp.stack(xs), *values)


def _groups(leaves: list[_Leaf], traced: bool) -> list[tuple[int, ...]]:
  """Leaves with equal descriptions and stackable codecs, together; the rest alone.

  Only under a trace: run eagerly, a loop would be traced and compiled again
  at every update, where single operations are cached. Only on a single
  device: with grouping, a job of two processes over an FSDP mesh that
  resumed from checkpoints with a warm compilation cache failed in its 8-bit
  step with a collective mismatch between the processes
  (tests/test_multiprocess.py; not yet understood), and a grouped program
  rounds differently from an ungrouped one, so a mesh of any size keeps one
  unit per leaf and a run gives the same result on 1 or 2 processes.
  """
  groups: dict[Any, list[int]] = {}
  for i, leaf in enumerate(leaves):
    key: Any = ("alone", i)
    if traced and jax.device_count() == 1 and all(c.stack for c in leaf.base + leaf.delta):
      try:
        hash(leaf)
        key = leaf
      except TypeError:
        pass
    groups.setdefault(key, []).append(i)
  return [tuple(g) for g in groups.values()]


def _make_plan(
  moments: Sequence[Moment], storage: StoragePolicy, use_base: bool, tree: Any
) -> _Plan:
  """Codecs per leaf and moment, chosen from the stored moment's *global* shape.

  A delta is a difference of statistics, so it can be negative, unless there is
  no base and it is the plain EMA of ``s(g)``.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  leaves = []
  for path, leaf in flat:
    dtype = _compute_dtype(jnp.result_type(leaf))
    param = jax.ShapeDtypeStruct(jnp.shape(leaf), jnp.result_type(leaf))
    specs = tuple(
      jax.ShapeDtypeStruct(jax.eval_shape(m.statistic, param).shape, param.dtype) for m in moments
    )
    base = tuple(
      storage(path, sp, i, True, m.nonnegative) for i, (m, sp) in enumerate(zip(moments, specs))
    )
    delta = tuple(
      storage(path, sp, i, False, m.nonnegative and not use_base)
      for i, (m, sp) in enumerate(zip(moments, specs))
    )
    stored = [jax.eval_shape(c.init, sp) for c, sp in zip(delta, specs)]
    lossless = tuple(isinstance(x, jax.ShapeDtypeStruct) and x.dtype == dtype for x in stored)
    leaves.append(_Leaf(dtype, specs, base, delta, lossless))
  traced = any(is_traced(x) for _, x in flat)
  return _Plan(treedef, leaves, _groups(leaves, traced))


# ------------------------------------------------------------------------------
# Trees: init, the static update (the reference) and the traced one.


@dataclasses.dataclass(frozen=True)
class _SharedBase:
  """The mechanism's init and update for one validated configuration."""

  moments: tuple[Moment, ...]
  direction: Direction
  num_objectives: int
  storage: StoragePolicy
  use_base: bool
  careful_rounding: bool

  def init(self, params: Any) -> SharedBaseState:
    """Zero moments, each created on its parameter's sharding (see :func:`placed_spec`)."""
    plan = _make_plan(self.moments, self.storage, self.use_base, params)
    params_flat = plan.treedef.flatten_up_to(params)

    def zeros(which: str) -> list[list[Any]]:
      return [
        [getattr(leaf, which)[i].init(placed_spec(p, sp.shape)) for i, sp in enumerate(leaf.specs)]
        for leaf, p in zip(plan.leaves, params_flat)
      ]

    def join(per_leaf: list[list[Any]]) -> tuple[Any, ...]:
      return tuple(plan.treedef.unflatten([x[i] for x in per_leaf]) for i in range(n))

    k, n = self.num_objectives, len(self.moments)
    return SharedBaseState(
      count=jnp.zeros([], jnp.int32),
      counts=jnp.zeros([k], jnp.int32),
      base=join(zeros("base")) if self.use_base else (),
      deltas=tuple(join(zeros("delta")) for _ in range(k)),
    )

  def step(
    self,
    plan: _Plan,
    grads: Any,
    base: tuple,
    olds: tuple,
    n_prev: Array,
    t_prev: Array,
    objective: Any = 0,
    news: tuple | None = None,
  ) -> tuple[Any, tuple[Any, ...]]:
    """``(updates, the active objective's new stored deltas)``.

    ``olds``: stored delta trees, one per objective, of which ``objective``'s
    (a static int, or traced) is read. ``news``: the same after this step's
    EMA, or ``None``; where a delta is stored unrounded its new value is read
    from there instead of recomputed (see :func:`leaf_step`).
    """
    cache: dict[tuple[int, Any], Corrections] = {}
    updates, new_deltas = [], []
    per_unit = zip(
      plan.units,
      plan.flat(grads),
      plan.split(base) if self.use_base else [None] * len(plan.groups),
      _per_unit(plan, olds),
      _per_unit(plan, news) if news is not None else [None] * len(plan.groups),
    )
    for j, (leaf, *args) in enumerate(per_unit):
      scales = []
      for i, m in enumerate(self.moments):
        if (i, leaf.dtype) not in cache:
          cache[i, leaf.dtype] = corrections(m, leaf.dtype, n_prev, t_prev)
        scales.append(cache[i, leaf.dtype])

      def one_leaf(g, base, olds, news, leaf=leaf, scales=scales):
        decoded = lambda xs: _decode(leaf.delta, xs, leaf.dtype)
        pick = lambda trees: [objective_lib.select(objective, list(v)) for v in zip(*trees)]
        b = [None] * len(scales)
        if base is not None:
          b = [x * c.base for x, c in zip(_decode(leaf.base, base, leaf.dtype), scales)]
        d_stored = None
        if news is not None:
          d_new = pick([decoded(xs) for xs in news])
          d_stored = [x if ok else None for x, ok in zip(d_new, leaf.lossless)]
        u, d_new = leaf_step(
          self.moments,
          self.direction,
          g.astype(leaf.dtype),
          b,
          pick([decoded(xs) for xs in olds]),
          scales,
          careful_rounding=self.careful_rounding,
          d_stored=d_stored,
        )
        return u.astype(g.dtype), [c.encode(x) for c, x in zip(leaf.delta, d_new)]

      u, encoded = plan.run(j, one_leaf, *args)
      updates.append(u)
      new_deltas.append(encoded)
    return plan.unflat(updates), plan.join(new_deltas, len(self.moments))

  def base_step(self, plan: _Plan, grads: Any, base: tuple, keep: Array | None = None) -> tuple:
    """The shared base after this step (independent of the objective).

    ``keep``: a traced bool; where True the stored base is returned unchanged.
    """
    new_base = []
    for j, (leaf, g, stored) in enumerate(zip(plan.units, plan.flat(grads), plan.split(base))):

      def one_leaf(g, stored, leaf=leaf):
        gc = g.astype(leaf.dtype)
        out = []
        for m, codec, x in zip(self.moments, leaf.base, stored):
          encoded = codec.encode(base_ema(m, codec.decode(x).astype(leaf.dtype), m.statistic(gc)))
          if keep is not None:
            kept = lambda new, old, keep=keep: jnp.where(keep, old, new)
            encoded = jax.tree.map(kept, encoded, x)
          out.append(encoded)
        return out

      new_base.append(plan.run(j, one_leaf, g, stored))
    return plan.join(new_base, len(self.moments))

  def static_update(self, k: int, grads: Any, state: SharedBaseState):
    """The readable reference: objective ``k``'s deltas, then the base; one program per k."""
    plan = _make_plan(self.moments, self.storage, self.use_base, grads)
    updates, delta = self.step(
      plan, grads, state.base, (state.deltas[k],), state.count, state.counts[k]
    )
    return updates, SharedBaseState(
      count=_increment(state.count),
      counts=state.counts.at[k].set(_increment(state.counts[k])),
      base=self.base_step(plan, grads, state.base) if self.use_base else state.base,
      deltas=tuple(delta if kk == k else d for kk, d in enumerate(state.deltas)),
    )

  def traced_update(self, objective: Array, grads: Any, state: SharedBaseState):
    """One program for every objective, with no conditional around the updates.

    The maths is :meth:`static_update`'s; what differs is how XLA:CPU is led to
    run it in place (measured in ``benchmarks/README.md``):

    1. Each objective's deltas take this step's EMA in their own ``lax.cond``
       (:func:`~dualoptim_jax.objective.update_in_place`): only the active one
       fires, and since nothing but its deltas leaves the conditional, XLA
       updates them in place and materialises nothing else.
    2. The direction runs outside the conditionals, unconditionally: it reads
       the active objective's old deltas (and, where they are stored unrounded,
       the new ones the conditionals wrote) through elementwise selects, so it
       fuses with what follows (weight decay, learning rate,
       ``optax.apply_updates``) and the updates are never written to memory.
       An update that leaves a conditional (``lax.switch``, or a result threaded
       through the conditionals) is a fresh buffer written, page-faulted and
       read back in every call: 1.8-3.5x the static program, against 0.9-1.1x.
       A rounded (8-bit) delta is recomputed instead: the direction must see
       the unrounded EMA, as in the static update.
    3. The base is overwritten in place, so its EMA must run after the
       conditionals that read it; selecting on their ``ready`` output makes that
       a data dependence (else XLA:CPU writes the EMA to a temporary and copies).

    An objective outside [0, K) updates no state and gives NaN updates.
    """
    plan = _make_plan(self.moments, self.storage, self.use_base, grads)
    valid = objective_lib.is_valid(objective, self.num_objectives)
    k = jnp.clip(objective, 0, self.num_objectives - 1)
    n_prev, t_prev = state.count, state.counts[k]

    def active_deltas(kk: int, stored: tuple) -> tuple:
      return self.step(plan, grads, state.base, (stored,), n_prev, state.counts[kk])[1]

    deltas, ready = objective_lib.update_in_place(objective, state.deltas, active_deltas)
    updates, _ = self.step(plan, grads, state.base, state.deltas, n_prev, t_prev, objective, deltas)
    updates = jax.tree.map(lambda u: jnp.where(valid, u, jnp.nan), updates)
    base = state.base
    if self.use_base:
      base = self.base_step(plan, grads, state.base, keep=~valid | (ready != 1))
    counts = state.counts.at[k].set(_increment(t_prev))
    return updates, SharedBaseState(
      count=jnp.where(valid, _increment(n_prev), n_prev),
      counts=jnp.where(valid, counts, state.counts),
      base=base,
      deltas=deltas,
    )

  def update(self, updates, state, params=None, *, objective=None, **extra_args):
    del params, extra_args
    objective = objective_lib.check_objective(objective, self.num_objectives)
    if objective_lib.is_static(objective):
      return self.static_update(objective, updates, state)
    return self.traced_update(jnp.asarray(objective), updates, state)


def shared_base_moments(
  moments: Sequence[Moment],
  direction: Direction,
  *,
  num_objectives: int = 2,
  storage: StoragePolicy | None = None,
  use_base: bool = True,
  careful_rounding: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Builds a DualOptim+ transform from moments and a direction.

  Args:
    moments: the stored statistics of the optimizer.
    direction: ``direction(current, previous, g) -> update`` per leaf, where
      ``current[i]`` / ``previous[i]`` are the combined estimates
      :math:`M_i` after / before this step's delta EMA (see module doc).
    num_objectives: K >= 1, the number of objectives. With K = 1 ``objective=``
      is ignored (as ``optax`` transforms ignore it).
    storage: how each moment leaf is stored (default: the parameter's dtype);
      see :func:`~dualoptim_jax.state_storage`.
    use_base: ``False`` drops the shared base (:math:`\hat B = 0`): each
      objective then runs the plain optimizer on its own state (DualOptim), and
      with K = 1 this is the plain optimizer itself (used for 8-bit Adam).
    careful_rounding: form every :math:`M_i` as
      :func:`combine_carefully` does (the same maths, without rounding
      :math:`s - \hat B`); default ``False``, the released rounding.

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
  if not isinstance(careful_rounding, bool):
    raise ValueError(f"careful_rounding must be a bool, got {careful_rounding!r}.")
  mechanism = _SharedBase(
    moments=moments,
    direction=direction,
    num_objectives=objective_lib.validate_num_objectives(num_objectives),
    storage=storage or float_storage(),
    use_base=bool(use_base),
    careful_rounding=careful_rounding,
  )
  return optax.GradientTransformationExtraArgs(mechanism.init, mechanism.update)
