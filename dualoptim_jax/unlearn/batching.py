"""Calling a model on many inputs in few batch shapes.

Each distinct batch shape is a compiled program, so rows are padded to a power of two (scoring,
where batches are full but for the last) or to a multiple of 8 (generation, where every
evaluation of a job decodes the same number of questions in one call).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["GENERATE_BATCH", "GENERATE_ROWS", "in_batches", "pad_rows"]

# Questions per greedy-decoding call. A decoding step costs less per row in a larger batch (a
# step of SmolLM2-135M on two CPU cores: 84 ms for 16 rows, 159 ms for 64), so an evaluation
# decodes the questions of all its sets together, this many at a time.
GENERATE_BATCH = 64
# A decoding call's rows are padded to a multiple of this (its batch shapes, its compiles).
GENERATE_ROWS = 8


def pad_rows(rows: list, multiple: int | None = None) -> list:
  """``rows`` with its first row repeated up to the next power of two, or with ``multiple`` up
  to the next multiple of it."""
  n = len(rows)
  size = (1 << (n - 1).bit_length()) if multiple is None else -(-n // multiple) * multiple
  return rows + [rows[0]] * (size - n)


def in_batches(
  fn: Callable[[Sequence[Any]], Sequence[Any]],
  inputs: Sequence[Any],
  batch_size: int,
  on_batch: Callable[[], Any] | None = None,
) -> list:
  """``fn`` over consecutive slices of ``batch_size`` inputs, its outputs concatenated;
  ``on_batch()`` after each call (a progress bar's update). Checks one output per input."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  out: list = []
  for start in range(0, len(inputs), batch_size):
    out.extend(fn(inputs[start : start + batch_size]))
    if on_batch is not None:
      on_batch()
  if len(out) != len(inputs):
    raise ValueError(
      f"{getattr(fn, '__name__', fn)} returned {len(out)} outputs for {len(inputs)} inputs"
    )
  return out
