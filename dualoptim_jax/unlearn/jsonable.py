"""Plain JSON data of the unlearning package's values: the one conversion every file goes through.

results.json, checkpoint fingerprints and checkpointed loss histories are all written through
:func:`jsonable`, so they share one rule for non-finite floats: NaN and infinities become ``null``
(strict JSON has neither), and :func:`float_or_nan` reads a ``null`` back as NaN.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["jsonable", "float_or_nan"]


def jsonable(value: Any) -> Any:
  """A plain-JSON copy of ``value``.

  Mappings (keys as strings), lists and tuples recurse; dataclass instances become dicts of their
  fields; numpy arrays become lists and numpy scalars Python numbers; bools stay bools; a
  non-finite float becomes ``None``; anything else (a dtype, a path) becomes its ``str``.
  """
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
  if isinstance(value, Mapping):
    return {str(k): jsonable(v) for k, v in value.items()}
  if isinstance(value, np.ndarray):
    return jsonable(value.tolist())
  if isinstance(value, (list, tuple)):
    return [jsonable(v) for v in value]
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  if isinstance(value, (int, np.integer)):
    return int(value)
  if isinstance(value, (float, np.floating)):
    return float(value) if math.isfinite(value) else None
  if value is None or isinstance(value, str):
    return value
  return str(value)


def float_or_nan(value: Any) -> float:
  """The float of a JSON number, NaN for ``null`` (the inverse of :func:`jsonable`'s NaN rule)."""
  return math.nan if value is None else float(value)
