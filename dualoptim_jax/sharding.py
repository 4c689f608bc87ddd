"""Device meshes and shardings for parameters, optimizer states and batches.

FSDP in JAX is a choice of shardings; ``jax.jit`` does the rest. This module
makes two choices (the job's mesh, from a spec string such as
``"data=2,fsdp=4"``, and a training run's :class:`Placement` are in
:mod:`dualoptim_jax.unlearn.placement`):

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

    mesh = jax.make_mesh((2, 4), ("data", "fsdp"))
    specs = fsdp_specs(params, mesh)                  # or your own PartitionSpecs
    p_shardings = param_shardings(params, mesh, specs)
    params = jax.device_put(params, p_shardings)
    opt_state = tx.init(params)                       # every leaf on its param's shards, as optax
    s_shardings = state_shardings(opt_state, params)  # the same, for any optax state
    step = jax.jit(train_step, out_shardings=(p_shardings, s_shardings))  # keep them so
    params, opt_state = step(params, opt_state, jax.device_put(batch, batch_sharding(mesh, len(batch))))

NNX model example (what :class:`~dualoptim_jax.unlearn.trainer.Unlearner` does with ``mesh=``,
through :class:`~dualoptim_jax.unlearn.placement.Placement`)::

    params = nnx.state(model, nnx.Param)
    params = jax.device_put(params, param_shardings(params, mesh))  # by annotation
    opt_state = tx.init(params)

Limits: a statistic whose shape differs from its parameter's (Adafactor's factored rows and
columns) is replicated; an 8-bit state sharded on its last axis stays shard-local only when each
shard holds whole blocks (shard length a multiple of ``block_size``, see
:mod:`dualoptim_jax.quantize`).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any, cast

import jax
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from dualoptim_jax.hyperparams import is_traced
from dualoptim_jax.quantize import QuantizedArray
from dualoptim_jax.storage import absmax_sharding

__all__ = [
  "fit_spec",
  "fsdp_specs",
  "param_shardings",
  "state_shardings",
  "replicated",
  "batch_sharding",
  "process_batch",
  "host_value",
  "committed",
]


# ------------------------------------------------------------------------------
# Meshes.


def replicated(mesh: Mesh) -> NamedSharding:
  """The fully replicated sharding on ``mesh``."""
  return NamedSharding(mesh, PartitionSpec())


# ------------------------------------------------------------------------------
# Parameters.


def _axis_size(mesh: Mesh | AbstractMesh, entry: Any) -> int:
  if entry is None:
    return 1
  names = entry if isinstance(entry, tuple) else (entry,)
  return math.prod(mesh.shape[n] for n in names)


def fit_spec(
  spec: PartitionSpec | Sequence[Any] | None, shape: Sequence[int], mesh: Mesh | AbstractMesh
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


def fsdp_specs(
  params: Any, mesh: Mesh | AbstractMesh, *, axis: str = "fsdp", min_size: int = 1024
) -> Any:
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


def _annotation(var: Any) -> PartitionSpec:
  names = var.get_metadata().get("out_sharding")
  if names is None:  # older Flax spelling
    names = var.get_metadata().get("sharding_names")
  return PartitionSpec(*(names or ()))


def param_shardings(params: Any, mesh: Mesh | AbstractMesh, specs: Any = None) -> Any:
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

  # Flax is optional (extra [unlearn]): a tree can only hold nnx.Variables if
  # Flax is already imported, so the core never imports it.
  variable = getattr(sys.modules.get("flax.nnx"), "Variable", None)
  is_variable = lambda x: variable is not None and isinstance(x, variable)

  def one(node):
    if is_variable(node):
      return jax.tree.map(
        lambda x: NamedSharding(mesh, fit_spec(_annotation(node), np.shape(x), mesh)), node
      )
    return NamedSharding(mesh, fit_spec(None, np.shape(node), mesh))

  return jax.tree.map(one, params, is_leaf=is_variable)


# ------------------------------------------------------------------------------
# Optimizer states.


def _is_quantized(x: Any) -> bool:
  return isinstance(x, QuantizedArray)


def _flat(tree: Any):
  return jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_quantized)


def _laid_out(params: Any, param_shardings: Any) -> tuple[list, list[NamedSharding], Mesh]:
  """``params``' flat leaves with paths, their NamedShardings, and the mesh (checked)."""
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
  mesh = cast(Mesh, cast(NamedSharding, shard_leaves[0]).mesh)  # checked above
  return param_flat, cast(list[NamedSharding], shard_leaves), mesh


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
  param_flat, shard_leaves, mesh = _laid_out(params, param_shardings)
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
        absmax = absmax_sharding(sh, tuple(np.shape(leaf.absmax)))
        out.append(QuantizedArray(codes=cast(Any, sh), absmax=cast(Any, absmax)))
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


# ------------------------------------------------------------------------------
# Several processes.


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
  slices = [idx[0] for idx in index if idx]  # each local device's rows
  rows = sorted({(r.start or 0, x.shape[0] if r.stop is None else r.stop) for r in slices})
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


def committed(tree: Any) -> Any:
  """``tree`` with every uncommitted array committed to the device it is on (no copy).

  ``jax.jit`` compiles a different program for a committed argument (an orbax restore, a sharded
  array) than for an uncommitted one (a fresh ``jnp`` array, a jitted output of uncommitted
  inputs), and keys JAX's persistent compilation cache differently. Functions that take a model's
  arrays from either origin pass them through here, so one program serves both.
  """

  def one(x: Any) -> Any:
    if isinstance(x, jax.Array) and not is_traced(x) and not x.committed:
      return jax.device_put(x, x.sharding)
    return x

  return jax.tree.map(one, tree)
