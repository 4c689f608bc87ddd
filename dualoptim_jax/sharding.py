"""Device meshes and shardings for parameters, optimizer states and batches.

FSDP in JAX is a choice of shardings; ``jax.jit`` does the rest. This module
makes three choices:

* **the mesh**: axes ``('data', 'fsdp')`` of :attr:`jax.sharding.AxisType.Auto`
  type (the forward pass leaves activation shardings to the compiler), from a
  spec string such as ``"data=2,fsdp=4"`` (:func:`make_mesh`);
* **parameters**: each parameter is split along the mesh axes its
  ``nnx.with_partitioning`` annotation names (:func:`param_shardings`), or, for
  a plain pytree, along ``'fsdp'`` on its largest evenly divisible dimension
  (:func:`fsdp_specs`);
* **optimizer states take their parameters' shardings**
  (:func:`state_shardings`): every sub-tree of the state that has the
  parameters' structure and shapes (Adam moments, DualOptim+ bases and deltas,
  one state per objective, ...) is sharded leaf by leaf like the parameters;
  an 8-bit :class:`~dualoptim_jax.quantize.QuantizedArray` stores its uint8
  ``codes`` like the parameter and its block scales ``absmax`` with the
  parameter's ``PartitionSpec`` on the leading axes; every other leaf (step
  counters, scalars) is replicated.

The optimizer maths is elementwise in the parameters (and block-wise along the
last axis for 8-bit states), so with these shardings the compiled optimizer
update is shard-local: no all-gather, each device updates the slice of the
state that belongs to its slice of the parameters.

Plain pytree example::

    mesh = make_mesh("data=2,fsdp=4")
    specs = fsdp_specs(params, mesh)                  # or your own PartitionSpecs
    p_shardings = param_shardings(params, mesh, specs)
    params = jax.device_put(params, p_shardings)
    opt_state = init_sharded(tx, params)              # created shard by shard, like params
    s_shardings = state_shardings(opt_state, params)  # the same, for any optax state
    step = jax.jit(train_step, out_shardings=(p_shardings, s_shardings))  # keep them so
    params, opt_state = step(params, opt_state, jax.device_put(batch, batch_sharding(mesh, len(batch))))

NNX model example (what :class:`~dualoptim_jax.unlearn.trainer.Unlearner` does with ``mesh=``,
through :class:`Placement`)::

    params = nnx.state(model, nnx.Param)
    params = jax.device_put(params, param_shardings(params, mesh))  # by annotation
    opt_state = init_sharded(tx, params)

Limits: a statistic whose shape differs from its parameter's (Adafactor's factored rows and
columns) is replicated; an 8-bit state sharded on its last axis stays shard-local only when each
shard holds whole blocks (shard length a multiple of ``block_size``, see
:mod:`dualoptim_jax.quantize`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from dualoptim_jax.quantize import QuantizedArray

__all__ = [
  "MESH_AXES",
  "parse_mesh_spec",
  "make_mesh",
  "fit_spec",
  "fsdp_specs",
  "param_shardings",
  "state_shardings",
  "init_sharded",
  "replicated",
  "batch_sharding",
  "process_batch",
  "host_value",
  "Placement",
]

MESH_AXES = ("data", "fsdp")

_ITEM = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(-?\w+)\s*$")


# ------------------------------------------------------------------------------
# The mesh.


def parse_mesh_spec(spec: str | Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Axis sizes of a mesh spec such as ``"data=2,fsdp=4"``, completed and checked.

  An axis that is left out, or given as ``-1``, takes the devices the others
  leave (at most one such axis; ``"fsdp=8"`` means ``data=1,fsdp=8``, the empty
  spec ``""`` means ``data=1,fsdp=<all>``). The sizes must multiply to
  ``num_devices``: a mesh uses every device it is given.

  Args:
    spec: ``"AXIS=SIZE,..."`` over the axes ``'data'`` and ``'fsdp'``, or a
      mapping of the same.
    num_devices: the number of devices the mesh must cover, >= 1.

  Returns:
    ``{"data": d, "fsdp": f}`` with ``d * f == num_devices``.

  Raises:
    ValueError: naming the bad item (syntax, unknown or repeated axis, a size
      that is not a positive int, sizes that do not fit the devices).
  """
  if isinstance(spec, str):
    items = {}
    for part in (p for p in spec.split(",") if p.strip()):
      m = _ITEM.match(part)
      if m is None:
        raise ValueError(
          f"mesh spec {spec!r}: expected AXIS=SIZE items separated by commas, like "
          f"'data=2,fsdp=4', got {part.strip()!r}"
        )
      name, value = m.groups()
      if name in items:
        raise ValueError(f"mesh spec {spec!r}: axis {name!r} is given twice")
      items[name] = value
  else:
    items = dict(spec)
  text = spec if isinstance(spec, str) else repr(dict(spec))
  sizes: dict[str, int] = {}
  for name, value in items.items():
    if name not in MESH_AXES:
      raise ValueError(f"mesh spec {text!r}: unknown axis {name!r}; the axes are 'data' and 'fsdp'")
    try:
      size = int(value)
      if isinstance(value, float) or str(value).strip() != str(size):
        raise ValueError
    except (TypeError, ValueError):
      raise ValueError(
        f"mesh spec {text!r}: size of {name!r} must be a positive int or -1, got {value!r}"
      ) from None
    if size == 0 or size < -1:
      raise ValueError(
        f"mesh spec {text!r}: size of {name!r} must be a positive int or -1, got {size}"
      )
    sizes[name] = size
  if sum(s == -1 for s in sizes.values()) > 1:
    raise ValueError(f"mesh spec {text!r}: at most one axis may be -1")
  free = [a for a in MESH_AXES if sizes.get(a, -1) == -1]
  if len(free) == len(MESH_AXES):  # nothing fixed: all devices on fsdp
    sizes = {"data": 1}
    free = ["fsdp"]
  fixed = math.prod(s for a, s in sizes.items() if a not in free)
  if free:
    if num_devices % fixed:
      raise ValueError(
        f"mesh spec {text!r}: {fixed} does not divide the {num_devices} devices, so "
        f"{free[0]!r} cannot take the rest"
      )
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    shown = ",".join(f"{a}={sizes[a]}" for a in MESH_AXES)
    raise ValueError(
      f"mesh spec {text!r}: {shown} uses {math.prod(sizes.values())} devices but "
      f"{num_devices} are available; the sizes must multiply to {num_devices} (e.g. "
      f"'data=1,fsdp={num_devices}')"
    )
  return {a: sizes[a] for a in MESH_AXES}


def make_mesh(
  spec: str | Mapping[str, int] | None = None,
  *,
  devices: Sequence[jax.Device] | None = None,
) -> Mesh:
  """A ``('data', 'fsdp')`` mesh of ``Auto`` axes over ``devices`` (default: all).

  Args:
    spec: see :func:`parse_mesh_spec`; ``None`` is ``data=1,fsdp=<all devices>``.
    devices: the devices to use (default ``jax.devices()``).

  Returns:
    A :class:`jax.sharding.Mesh` whose axis types are ``AxisType.Auto``, so
    the compiler propagates activation shardings (the Llama forward pass needs
    it; see :mod:`dualoptim_jax.models.llama`).

  Example:
    >>> mesh = make_mesh("data=1,fsdp=1", devices=jax.devices()[:1])
    >>> dict(mesh.shape)
    {'data': 1, 'fsdp': 1}
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = parse_mesh_spec("" if spec is None else spec, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  return jax.make_mesh(
    shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
  )


def replicated(mesh: Mesh) -> NamedSharding:
  """The fully replicated sharding on ``mesh``."""
  return NamedSharding(mesh, PartitionSpec())


# ------------------------------------------------------------------------------
# Parameters.


def _axis_size(mesh: Mesh, entry: Any) -> int:
  if entry is None:
    return 1
  names = entry if isinstance(entry, tuple) else (entry,)
  return math.prod(mesh.shape[n] for n in names)


def fit_spec(
  spec: PartitionSpec | Sequence[Any] | None, shape: Sequence[int], mesh: Mesh
) -> PartitionSpec:
  """``spec`` padded to ``len(shape)`` entries, replicating dimensions it cannot split.

  A dimension stays sharded only if the mesh axes named for it divide its
  size; otherwise that one dimension is replicated (e.g. a vocabulary of 1000
  on ``fsdp=8``). Axes missing from ``mesh`` raise.
  """
  entries = list(spec or ())
  if len(entries) > len(shape):
    raise ValueError(f"PartitionSpec {tuple(entries)} has more entries than shape {tuple(shape)}")
  entries += [None] * (len(shape) - len(entries))
  out = []
  for dim, entry in zip(shape, entries):
    names = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
    for n in names:
      if n not in mesh.shape:
        raise ValueError(
          f"PartitionSpec {tuple(entries)} names axis {n!r}, which the mesh "
          f"{dict(mesh.shape)} lacks"
        )
    out.append(entry if dim % _axis_size(mesh, entry) == 0 else None)
  return PartitionSpec(*out)


def fsdp_specs(params: Any, mesh: Mesh, *, axis: str = "fsdp", min_size: int = 1024) -> Any:
  """FSDP PartitionSpecs for a plain pytree: each leaf split on one dimension.

  A leaf with at least ``min_size`` elements is split along ``axis`` on its
  largest dimension that the axis size divides (the leading one on ties);
  smaller leaves, and leaves with no such dimension, are replicated.

  Returns:
    A tree of :class:`~jax.sharding.PartitionSpec` with ``params``' structure.
  """
  size = mesh.shape[axis]

  def spec(leaf):
    shape = np.shape(leaf)
    if math.prod(shape) < min_size or size == 1:
      return PartitionSpec()
    dims = [d for d in range(len(shape)) if shape[d] % size == 0]
    if not dims:
      return PartitionSpec()
    best = max(dims, key=lambda d: (shape[d], -d))
    return PartitionSpec(*[axis if d == best else None for d in range(len(shape))])

  return jax.tree.map(spec, params)


def _annotation(var: nnx.Variable) -> PartitionSpec:
  names = var.get_metadata().get("out_sharding")
  if names is None:  # older Flax spelling
    names = var.get_metadata().get("sharding_names")
  return PartitionSpec(*(names or ()))


def param_shardings(params: Any, mesh: Mesh, specs: Any = None) -> Any:
  """NamedShardings for a parameter tree on ``mesh``.

  Args:
    params: the parameters: an ``nnx.State`` of ``nnx.Param`` (its
      ``nnx.with_partitioning`` annotations give the specs), any pytree of
      arrays, or their ``jax.ShapeDtypeStruct`` shapes.
    mesh: the mesh.
    specs: optional PartitionSpecs, a tree with ``params``' structure (e.g.
      :func:`fsdp_specs`); by default NNX annotations, and replication for a leaf
      without one.

  Returns:
    A tree of :class:`~jax.sharding.NamedSharding` with ``params``' structure;
    each spec passed through :func:`fit_spec`.
  """
  if specs is not None:
    flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    leaves, treedef = jax.tree.flatten(params)
    if len(flat_specs) != len(leaves):
      raise ValueError(f"specs has {len(flat_specs)} leaves but params has {len(leaves)}")
    return treedef.unflatten(
      [NamedSharding(mesh, fit_spec(s, np.shape(x), mesh)) for s, x in zip(flat_specs, leaves)]
    )

  def one(node):
    if isinstance(node, nnx.Variable):
      return jax.tree.map(
        lambda x: NamedSharding(mesh, fit_spec(_annotation(node), np.shape(x), mesh)), node
      )
    return NamedSharding(mesh, fit_spec(None, np.shape(node), mesh))

  return jax.tree.map(one, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


# ------------------------------------------------------------------------------
# Optimizer states.


def _is_quantized(x: Any) -> bool:
  return isinstance(x, QuantizedArray)


def _absmax_sharding(param_sharding: NamedSharding, absmax_shape: Sequence[int]) -> NamedSharding:
  """The param's spec on the leading axes; its last-axis spec on the block axis if it divides.

  The blocks of a row are contiguous runs along the last axis, so when the
  last axis is split into shards that hold whole blocks, block ``j``'s scale
  lives where block ``j``'s codes do.
  """
  mesh = param_sharding.mesh
  spec = list(param_sharding.spec) + [None] * (len(absmax_shape) - len(param_sharding.spec))
  return NamedSharding(mesh, fit_spec(spec[: len(absmax_shape)], absmax_shape, mesh))


def _flat(tree: Any):
  return jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_quantized)


def state_shardings(state: Any, params: Any, param_shardings: Any = None) -> Any:
  """Shardings for an optimizer state, taken from its parameters.

  Works for any optax state (plain NamedTuples and tuples of them), not only
  this package's: the state is searched from the root for sub-trees that have
  the parameters' structure (same leaf paths, an 8-bit
  :class:`~dualoptim_jax.quantize.QuantizedArray` counting as one leaf) and
  the parameters' shapes. In such a sub-tree

  * a leaf of the parameter's shape takes the parameter's sharding;
  * a ``QuantizedArray`` takes it for ``codes`` (parameter-shaped) and, for
    ``absmax`` (``(*shape[:-1], n_blocks)``), the parameter's spec on the
    leading axes and on the block axis when the mesh divides the block count.

  Every leaf outside such a sub-tree (counters, scalars, a factored statistic
  of another shape) is replicated.

  Args:
    state: the optimizer state, or its shapes (``jax.eval_shape(tx.init, params)``).
    params: the parameters (arrays or ``ShapeDtypeStruct``).
    param_shardings: NamedShardings with ``params``' structure; default: the
      parameters' own ``.sharding`` (they must be laid out on a mesh already).

  Returns:
    A tree of NamedShardings with ``state``'s structure, for ``jax.device_put``
    or ``jax.jit(..., out_shardings=...)``.
  """
  param_flat, _ = jax.tree_util.tree_flatten_with_path(params)
  if param_shardings is None:
    shard_leaves = [getattr(x, "sharding", None) for _, x in param_flat]
  else:
    shard_leaves = jax.tree.leaves(param_shardings)
  if len(shard_leaves) != len(param_flat):
    raise ValueError(
      f"param_shardings has {len(shard_leaves)} leaves but params has {len(param_flat)}"
    )
  bad = [
    jax.tree_util.keystr(p)
    for (p, _), s in zip(param_flat, shard_leaves)
    if not isinstance(s, NamedSharding)
  ]
  if bad:
    raise ValueError(
      f"parameters need NamedShardings (lay them out on a mesh first, or pass "
      f"param_shardings); {bad[0]} has none"
    )
  if not shard_leaves:
    raise ValueError("params has no leaves, so there is no mesh to shard the state on")
  mesh = shard_leaves[0].mesh
  paths = [p for p, _ in param_flat]
  shapes = [tuple(np.shape(x)) for _, x in param_flat]
  repl = replicated(mesh)

  def matches(node) -> bool:
    flat, _ = _flat(node)
    if [p for p, _ in flat] != paths:
      return False
    for (_, leaf), shape in zip(flat, shapes):
      got = leaf.codes.shape if _is_quantized(leaf) else np.shape(leaf)
      if tuple(got) != shape:
        return False
    return True

  def param_like(node):
    flat, treedef = _flat(node)
    out = []
    for (_, leaf), sh in zip(flat, shard_leaves):
      if _is_quantized(leaf):
        out.append(QuantizedArray(codes=sh, absmax=_absmax_sharding(sh, np.shape(leaf.absmax))))
      else:
        out.append(sh)
    return treedef.unflatten(out)

  def visit(node):
    if node is None:
      return None
    if matches(node):
      return param_like(node)
    children, treedef = jax.tree_util.tree_flatten(node, is_leaf=lambda x: x is not node)
    if treedef.num_nodes == 1 and treedef.num_leaves == 1:  # node is a leaf
      return repl
    return treedef.unflatten([visit(c) for c in children])

  return visit(state)


def init_sharded(tx: Any, params: Any, param_shardings: Any = None) -> Any:
  """``tx.init(params)`` with every state leaf created on its shard (no gather, no copy).

  ``params`` must already be laid out (or ``param_shardings`` given); see
  :func:`state_shardings` for the shardings chosen.
  """
  shapes = jax.eval_shape(tx.init, params)
  shardings = state_shardings(shapes, params, param_shardings)
  return jax.jit(tx.init, out_shardings=shardings)(params)


# ------------------------------------------------------------------------------
# Batches.


def batch_sharding(mesh: Mesh, batch_size: int) -> NamedSharding:
  """Batch rows split over as many mesh axes as divide ``batch_size``.

  Every device holds a slice of the batch (FSDP is data parallel across both
  axes): ``P(('data', 'fsdp'))`` when the device count divides the batch,
  else ``P('data')`` when the data axis does, else replicated.
  """
  axes = list(mesh.axis_names)
  while axes and batch_size % math.prod(mesh.shape[a] for a in axes):
    axes.pop()
  if not axes or math.prod(mesh.shape[a] for a in axes) == 1:
    return replicated(mesh)
  return NamedSharding(mesh, PartitionSpec(tuple(axes)))


def process_batch(x: Any, sharding: NamedSharding) -> jax.Array:
  """A global host array ``x`` (the same in every process) as a global ``jax.Array``, built
  from this process's rows only (``jax.make_array_from_process_local_data``).

  In a multi-process job every process draws the same global batch (so the data order does not
  depend on the process count) and puts on its devices only the rows they hold; in one process
  this is ``jax.device_put(x, sharding)``.
  """
  x = np.asarray(x)
  if jax.process_count() == 1 or x.ndim == 0:
    return jax.device_put(x, sharding)
  index = sharding.addressable_devices_indices_map(x.shape).values()
  rows = sorted({(r.start or 0, x.shape[0] if r.stop is None else r.stop) for r, *_ in index})
  if all(a[1] == b[0] for a, b in zip(rows, rows[1:])):  # this process holds one block of rows
    return jax.make_array_from_process_local_data(sharding, x[rows[0][0] : rows[-1][1]], x.shape)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def host_value(x: Any) -> np.ndarray:
  """The whole value of an array as NumPy, in every process.

  An array spanning other processes' devices (not fully addressable, not replicated) is
  gathered from all of them (``multihost_utils.process_allgather``), a collective: every
  process must call this for the same arrays in the same order.
  """
  if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # noqa: PLC0415

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# ------------------------------------------------------------------------------
# What a training loop needs, on one device or on a mesh.


def _global_put(tree: Any, shardings: Any) -> Any:
  """``jax.device_put`` that also places arrays held on one local device onto shardings that
  span other processes (JAX refuses those): they go through the host, where every process holds
  the same value (e.g. a model loaded from a file by each process)."""
  if jax.process_count() > 1:
    local = lambda x: isinstance(x, jax.Array) and x.is_fully_addressable  # noqa: E731
    tree = jax.tree.map(lambda x: np.asarray(x) if local(x) else x, tree)
  return jax.device_put(tree, shardings)


def _own_copy(tree: Any, shardings: Any) -> Any:
  """``tree`` on ``shardings`` in fresh buffers (safe to donate).

  ``device_put(..., may_alias=False)`` still aliases the source buffer in the
  device-0 shard of a replicated array (jax 0.10), so copy after placing.
  """
  return jax.tree.map(jnp.copy, _global_put(tree, shardings))


class Placement:
  """Lays out a training run's arrays: identity without a mesh, FSDP with one.

  The trainer calls the same four methods on one device (``mesh=None``: arrays
  stay where JAX puts them, nothing is copied or constrained) and on a mesh.

  Args:
    mesh: from :func:`make_mesh`, or None.
  """

  def __init__(self, mesh: Mesh | None = None):
    self.mesh = mesh
    self.param_shardings: Any = None
    self.state_shardings: Any = None

  # Equal layouts compare equal, so a cache of compiled steps keyed by the placement (the
  # trainer's) is shared by runs on the same mesh with the same model and optimizer.
  def _key(self) -> tuple:
    def flat(tree):
      leaves, treedef = jax.tree.flatten(tree)
      return str(treedef), tuple(leaves)

    return self.mesh, flat(self.param_shardings), flat(self.state_shardings)

  def __eq__(self, other: object) -> bool:
    return isinstance(other, Placement) and self._key() == other._key()

  def __hash__(self) -> int:
    return hash(self._key())

  def params(self, params: Any) -> Any:
    """A copy of ``params`` laid out by their annotations (remembered for the state)."""
    if self.mesh is None:
      return jax.tree.map(jnp.copy, params)  # own buffers: every step donates them
    self.param_shardings = param_shardings(params, self.mesh)
    return _own_copy(params, self.param_shardings)

  def like_params(self, tree: Any) -> Any:
    """Another param-shaped tree (a frozen reference model) laid out like the params."""
    if self.mesh is None or tree is None:
      return tree
    return _global_put(tree, self.param_shardings)

  def put(self, tree: Any, kind: str) -> Any:
    """A copy of a ``"params"`` or ``"opt_state"`` tree (e.g. restored) in this run's layout."""
    if self.mesh is None:
      return jax.tree.map(jnp.copy, tree)
    shardings = {"params": self.param_shardings, "opt_state": self.state_shardings}[kind]
    return _own_copy(tree, shardings)

  def replicate(self, tree: Any) -> Any:
    if self.mesh is None:
      return tree
    return _global_put(tree, replicated(self.mesh))

  def init(self, tx: Any, params: Any) -> Any:
    """``tx.init(params)``, sharded like the params on a mesh."""
    if self.mesh is None:
      return tx.init(params)
    shapes = jax.eval_shape(tx.init, params)
    self.state_shardings = state_shardings(shapes, params, self.param_shardings)
    return jax.jit(tx.init, out_shardings=self.state_shardings)(params)

  def constrain(self, params: Any, opt_state: Any) -> tuple[Any, Any]:
    """Inside a jitted step: keep the new params and state on their shardings."""
    if self.mesh is None:
      return params, opt_state
    return (
      jax.lax.with_sharding_constraint(params, self.param_shardings),
      jax.lax.with_sharding_constraint(opt_state, self.state_shardings),
    )

  def batch(self, batch: Any) -> Any:
    """Host batch(es) -> device arrays, rows split over the mesh."""
    if self.mesh is None:
      return batch

    def put(x):
      x = np.asarray(x)
      if x.ndim == 0:
        return jax.device_put(x, replicated(self.mesh))
      return process_batch(x, batch_sharding(self.mesh, x.shape[0]))

    return jax.tree.map(put, batch)
