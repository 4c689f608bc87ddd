"""Where a training run's arrays live: the job's mesh and the :class:`Placement` of its arrays.

Moved from :mod:`dualoptim_jax.sharding` (which keeps the optimizer-level shardings:
parameter and state shardings, batch sharding): the mesh is parsed from the CLI's
``--mesh`` spec, and a :class:`Placement` lays out one run's parameters, optimizer
state and batches.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh

from dualoptim_jax.sharding import (
  batch_sharding,
  param_shardings,
  process_batch,
  replicated,
  state_shardings,
)

__all__ = ["MESH_AXES", "parse_mesh_spec", "make_mesh", "Placement"]

MESH_AXES = ("data", "fsdp")

_ITEM = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(-?\w+)\s*$")


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
  devices: Sequence[Any] | None = None,
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
    mesh = self.mesh
    if mesh is None:
      return batch

    def put(x):
      x = np.asarray(x)
      if x.ndim == 0:
        return jax.device_put(x, replicated(mesh))
      return process_batch(x, batch_sharding(mesh, x.shape[0]))

    return jax.tree.map(put, batch)
