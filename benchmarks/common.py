"""Shared pieces of the benchmark scripts: optimizers, layouts, timing, HLO counts, JSON.

Every benchmark measures *ratios in one process*: the variants run interleaved
(round-robin, one call of each per round) so that load from other processes on a
shared machine hits all of them alike, and the figure is the median over rounds.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import dualoptim_jax as dj

# The compiler option that removes XLA:CPU's defensive copies of donated state
# (issue 2, "Facts measured here").
REGION_ANALYSIS = {"xla_cpu_copy_insertion_use_region_analysis": True}
COMPILER_OPTIONS: dict[str, dict[str, Any] | None] = {
  "default": None,
  "region": REGION_ANALYSIS,
}

LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.01


# ------------------------------------------------------------------------------------------------
# Optimizers.


@dataclasses.dataclass(frozen=True)
class OptimizerCase:
  """One optimizer under test.

  Attributes:
    name: label in tables and JSON (``optax.adamw``, ``dualoptim_plus_8bit``, ...).
    make: builds the transform.
    multi_objective: ``update`` takes ``objective=`` (else it must not be passed).
  """

  name: str
  make: Callable[[], optax.GradientTransformationExtraArgs]
  multi_objective: bool


def optimizer_cases(
  *, learning_rate: float = LEARNING_RATE, weight_decay: float = WEIGHT_DECAY
) -> tuple[list[OptimizerCase], list[str]]:
  """The optimizers this build provides, and notes on the ones it lacks.

  All use decoupled weight decay (so every update reads the parameters, as
  ``optax.adamw`` with a non-zero decay does) and K = 2 objectives.
  """
  wd = weight_decay
  cases = [
    OptimizerCase(
      "optax.adamw",
      lambda: optax.with_extra_args_support(optax.adamw(learning_rate, weight_decay=wd)),
      False,
    ),
    OptimizerCase("dualoptim", lambda: dj.dualoptim(learning_rate, weight_decay=wd), True),
    OptimizerCase(
      "dualoptim_plus", lambda: dj.dualoptim_plus(learning_rate, weight_decay=wd), True
    ),
    OptimizerCase(
      "adamw_8bit",
      lambda: optax.with_extra_args_support(dj.adamw_8bit(learning_rate, weight_decay=wd)),
      False,
    ),
    OptimizerCase(
      "dualoptim_8bit", lambda: dj.dualoptim(learning_rate, weight_decay=wd, state_bits=8), True
    ),
    OptimizerCase(
      "dualoptim_plus_8bit",
      lambda: dj.dualoptim_plus(learning_rate, weight_decay=wd, state_bits=8),
      True,
    ),
  ]
  return cases, []


def select_cases(cases: list[OptimizerCase], names: str | None) -> list[OptimizerCase]:
  """Keeps the cases named in a comma-separated list (all when ``names`` is falsy)."""
  if not names:
    return cases
  wanted = [n.strip() for n in names.split(",") if n.strip()]
  known = {c.name for c in cases}
  unknown = [n for n in wanted if n not in known]
  if unknown:
    raise SystemExit(f"unknown optimizer(s) {unknown}; available: {sorted(known)}")
  return [c for c in cases if c.name in wanted]


def objective_kwargs(mode: str, k: int | None, traced_k: tuple) -> dict[str, Any]:
  """``tx.update`` keywords for objective mode ``static`` (k), ``traced`` (traced_k[0]) or ``-``."""
  if mode == "static":
    return dict(objective=k)
  if mode == "traced":
    return dict(objective=traced_k[0])
  return {}


def state_nbytes(tree: Any) -> int:
  """Bytes of a pytree's arrays (``dualoptim_jax.quantize.state_nbytes`` when present)."""
  try:
    from dualoptim_jax.quantize import state_nbytes as nbytes
  except ImportError:  # older builds: the plain sum
    return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))
  return nbytes(tree)


def _is_inactive(path: tuple, objective: int) -> bool:
  """True for a state leaf that belongs to an objective other than ``objective``.

  Per-objective state lives under ``deltas[j]`` (DualOptim+) or
  ``inner_states[j]`` (DualOptim); an update of objective k never touches j != k.
  """
  for a, b in zip(path, path[1:]):
    if (
      isinstance(a, jax.tree_util.GetAttrKey)
      and a.name in ("deltas", "inner_states")
      and isinstance(b, jax.tree_util.SequenceKey)
    ):
      return b.idx != objective
  return False


def touched_state_nbytes(state: Any, objective: int = 0) -> int:
  """Bytes of the state leaves one update of ``objective`` must read (and write)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(state)
  return state_nbytes([leaf for path, leaf in flat if not _is_inactive(path, objective)])


# ------------------------------------------------------------------------------------------------
# Parameter layouts.

LAYOUT_ALIASES = {"32M": "8x2048x2048", "4M": "4x1024x1024", "quick": "2x256x256"}


def parse_layout(spec: str) -> tuple[int, int, int]:
  """``"32M"``, ``"4M"``, ``"quick"`` or ``"LxRxC"`` (L leaves of R x C) -> (L, R, C)."""
  text = LAYOUT_ALIASES.get(spec, spec)
  parts = text.lower().split("x")
  if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
    raise SystemExit(f"bad size {spec!r}: use one of {sorted(LAYOUT_ALIASES)} or LxRxC")
  return tuple(int(p) for p in parts)  # type: ignore[return-value]


def layout_label(layout: tuple[int, int, int]) -> str:
  leaves, rows, cols = layout
  n = leaves * rows * cols
  return f"{leaves}x{rows}x{cols} ({n / 1e6:.1f}M)"


def make_tree(layout: tuple[int, int, int], seed: int, scale: float = 1.0) -> dict[str, jax.Array]:
  """A dict of ``L`` float32 ``R x C`` normal arrays (distinct buffers)."""
  leaves, rows, cols = layout
  keys = jax.random.split(jax.random.key(seed), leaves)
  return {
    f"w{i}": scale * jax.random.normal(k, (rows, cols), jnp.float32) for i, k in enumerate(keys)
  }


# ------------------------------------------------------------------------------------------------
# Timing.


def block(tree: Any) -> None:
  jax.block_until_ready(tree)


def median(xs: Sequence[float]) -> float:
  return float(statistics.median(xs))


def time_call(fn: Callable[[], Any]) -> tuple[float, Any]:
  """Seconds taken by ``fn()`` until its result is ready, and the result."""
  start = time.perf_counter()
  out = fn()
  block(out)
  return time.perf_counter() - start, out


# ------------------------------------------------------------------------------------------------
# HLO statistics of a compiled executable.

_SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64)\[([\d,]*)\]")
_BYTES = {
  "pred": 1,
  "s8": 1,
  "u8": 1,
  "s16": 2,
  "u16": 2,
  "f16": 2,
  "bf16": 2,
  "s32": 4,
  "u32": 4,
  "f32": 4,
  "s64": 8,
  "u64": 8,
  "f64": 8,
}
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%(\S+)\s*=\s*(.*?)\s+([\w-]+)\((.*)$")
# Instructions that move no data of their own.
_FREE = {
  "parameter",
  "tuple",
  "get-tuple-element",
  "bitcast",
  "constant",
  "after-all",
  "partition-id",
  "replica-id",
  "iota",
}


def _shape_bytes(type_text: str) -> int:
  total = 0
  for dtype, dims in _SHAPE.findall(type_text):
    total += _BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
  return total


def _computations(text: str) -> dict[str, list[str]]:
  comps, name = {}, None
  for line in text.splitlines():
    if line and not line[0].isspace() and "{" in line and ("%" in line or line.startswith("ENTRY")):
      head = line.split("(")[0].split()
      name = "ENTRY" if line.startswith("ENTRY") else head[0].lstrip("%")
      comps[name] = []
    elif line.startswith("}"):
      name = None
    elif name is not None:
      comps[name].append(line)
  return comps


def hlo_stats(compiled: Any, *, min_bytes: int = 1 << 16) -> dict[str, Any]:
  """Counts of what an XLA:CPU executable does per call.

  ``kernel_bytes`` sums, over the executed kernels (fusions, copies, ...) of the
  entry computation and of the *largest* branch of each conditional, the bytes
  of their array operands and results of at least ``min_bytes``: the traffic if
  no kernel found its inputs in cache. XLA:CPU has no multi-output fusion, so
  each output array is its own loop and re-reads its inputs.
  """
  text = compiled.as_text()
  comps = _computations(text)

  def walk(comp: str, seen: tuple[str, ...] = ()) -> dict[str, float]:
    types: dict[str, str] = {}
    stats: dict[str, float] = dict(
      kernels=0, fusions=0, copies=0, conditionals=0, whiles=0, kernel_bytes=0, large_outputs=0
    )
    for line in comps.get(comp, []):
      m = _INSTR.match(line)
      if not m:
        continue
      name, type_text, op, rest = m.groups()
      types[name] = type_text
      if op in _FREE:
        continue
      operands = re.findall(r"%([\w.\-]+)", rest.split("),")[0] if ")," in rest else rest)
      moved = [_shape_bytes(type_text)] + [_shape_bytes(types.get(o, "")) for o in operands]
      big = sum(b for b in moved if b >= min_bytes)
      stats["kernels"] += 1
      stats["fusions"] += op == "fusion"
      stats["copies"] += op == "copy" and _shape_bytes(type_text) >= min_bytes
      stats["large_outputs"] += _shape_bytes(type_text) >= min_bytes and op != "conditional"
      if op == "conditional":
        stats["conditionals"] += 1
        branches = (
          re.findall(r"%([\w.\-]+)", rest.split("branch_computations=")[-1].split("}")[0])
          if "branch_computations" in rest
          else re.findall(r"(?:true|false)_computation=%([\w.\-]+)", rest)
        )
        subs = [walk(b, seen + (comp,)) for b in branches if b not in seen]
        if subs:
          worst = max(subs, key=lambda s: s["kernel_bytes"])
          for key in (
            "kernels",
            "fusions",
            "copies",
            "kernel_bytes",
            "large_outputs",
            "conditionals",
            "whiles",
          ):
            stats[key] += worst[key]
        continue
      if op == "while":
        stats["whiles"] += 1
      stats["kernel_bytes"] += big
    return stats

  return walk("ENTRY")


# ------------------------------------------------------------------------------------------------
# Reports.


def machine_info() -> dict[str, Any]:
  """Where and with what the figures were measured."""
  model = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          model = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  from importlib.metadata import version

  device = jax.devices()[0]
  return dict(
    cpu=model,
    cores=os.cpu_count(),
    platform=platform.platform(),
    python=platform.python_version(),
    jax=jax.__version__,
    jaxlib=version("jaxlib"),
    optax=optax.__version__,
    device=f"{device.platform}:{device.device_kind}",
    date=datetime.datetime.now().isoformat(timespec="seconds"),
    command=" ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
    load_average=os.getloadavg() if hasattr(os, "getloadavg") else None,
  )


def print_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> None:
  """Prints ``rows`` with ``columns`` = (key, header, format) as a Markdown table."""

  def cell(row, key, fmt):
    value = row.get(key)
    if value is None:
      return "-"
    return format(value, fmt) if fmt else str(value)

  body = [[cell(r, k, f) for k, _, f in columns] for r in rows]
  headers = [h for _, h, _ in columns]
  widths = [
    max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(headers)
  ]
  print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
  print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
  for b in body:
    print("| " + " | ".join(c.ljust(w) for c, w in zip(b, widths)) + " |")


def write_json(path: str | None, payload: dict[str, Any]) -> None:
  if not path:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(payload, f, indent=2, default=float)
  print(f"wrote {path}")
