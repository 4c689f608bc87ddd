"""Names of parameters and state leaves: the one way the unlearning package names a key path.

Checkpoints store arrays under these names, errors quote them, and the recipe's weight-decay mask
(:func:`dualoptim_jax.unlearn.trainer.decays`) reads them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

__all__ = ["path_name", "named_leaves"]


def _key_name(key: Any) -> str | None:
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.GetAttrKey):
    # The array inside an nnx.Variable is its ``value``: leave it out of the name.
    return None if key.name == "value" else key.name
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return str(key.key)
  return str(key)


def path_name(path: Sequence[Any]) -> str:
  """``"layers.0.mlp.up_proj.kernel"``: a key path's keys joined with dots (dict keys, sequence
  indices, NamedTuple fields), without the ``value`` of an ``nnx.Variable``."""
  return ".".join(n for n in map(_key_name, path) if n is not None)


def named_leaves(tree: Any) -> dict[str, Any]:
  """``{"layers.0.mlp.up_proj.kernel": leaf, ...}``: a pytree's leaves by readable, unique name.

  Names join the path's keys with dots (dict keys, sequence indices, NamedTuple fields) and
  leave out the ``value`` of an ``nnx.Variable``; a lone leaf is named ``""``.
  """
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  out: dict[str, Any] = {}
  for path, leaf in flat:
    name = path_name(path)
    if name in out:
      raise ValueError(
        f"two leaves of the tree are both named {name!r}; cannot checkpoint it by name"
      )
    out[name] = leaf
  return out
