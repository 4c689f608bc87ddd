"""Cost of one optimizer update + ``optax.apply_updates`` against memory bandwidth.

For each parameter layout (default ~32M float32 parameters as 8 x 2048^2 and ~4M
as 4 x 1024^2) it times, in one process and interleaved (round-robin, one call
of every variant per round, the starting variant rotated each round):

* ``optax.adamw`` (the reference: ratio 1.00);
* ``dualoptim`` and ``dualoptim_plus`` with a *static* objective (one compiled
  program per objective; rounds alternate objectives 0 and 1) and a *traced*
  one (an int32 array argument, one program for both);
* their 8-bit forms when this build has them (``state_bits=8``);
* a jitted triad ``a = b + s * c`` over the same element count: the bandwidth
  reference (STREAM's triad: ``a`` is a third, donated buffer);
* ``axpy``, the same sum written in place, ``b = b + s * c``: an optimizer writes
  every state array in place, and on this CPU a store to a line the loop has
  just read is cheaper than to one it has not (the triad pays a read for
  ownership of ``a``), so this is the tighter reference for optimizer updates.

Every step is ``jax.jit(step, donate_argnums=(0, 1), keep_unused=True)`` on
(params, state, grads[, objective]) returning (params, state), so parameters and
state are updated in place. Each variant is compiled twice: with XLA's default
options and with ``xla_cpu_copy_insertion_use_region_analysis`` (``region``),
and both run on the same buffers.

Traffic model (bytes per parameter, float32): the *minimal* traffic of an
algorithm reads the gradient and the parameter, writes the parameter, and reads
and writes every state array the update touches (the active objective's only):
optax.adamw / DualOptim 7 floats = 28 B, DualOptim+ 11 floats = 44 B; the triad
3 floats = 12 B, as the axpy. ``GB/s`` = minimal bytes / time; ``x triad`` /
``x axpy`` = that bandwidth over the triad's / the axpy's. ``HLO B/param`` is what the compiled program's kernels read
and write if nothing stays in cache (see ``common.hlo_stats``).

  python benchmarks/bench_update.py --out bench_update.json            # full run
  python benchmarks/bench_update.py --quick                            # smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import Any

import common
import jax
import jax.numpy as jnp
import optax
from tqdm import tqdm

TRIAD_SCALE = 0.5


@dataclasses.dataclass
class Buffers:
  """The donated arrays one group of variants updates in turn."""

  arrays: tuple[Any, ...]


@dataclasses.dataclass
class Variant:
  """One timed program: ``run(round)`` calls it once on its group's buffers."""

  optimizer: str
  objective: str  # "static", "traced", "-" (single-objective), "triad"
  options: str  # key of common.COMPILER_OPTIONS
  buffers: Buffers
  calls: list[Callable]  # executables, chosen by round parity (objective r % 2)
  extra: list[tuple]  # extra arguments, chosen the same way
  bytes_per_param: float
  hlo: dict[str, Any]
  times: list[float] = dataclasses.field(default_factory=list)

  def run(self, round_index: int) -> float:
    i = round_index % len(self.calls)
    grads = self.extra[i][0]
    args = self.buffers.arrays + (grads,) + self.extra[i][1:]
    seconds, out = common.time_call(lambda: self.calls[i](*args))
    self.buffers.arrays = tuple(out)
    return seconds


def update_step(tx, objective: str, k: int | None = None) -> Callable:
  """(params, state, grads[, k]) -> (params, state): update then apply."""

  def step(params, state, grads, *traced_k):
    kwargs = common.objective_kwargs(objective, k, traced_k)
    updates, state = tx.update(grads, state, params, **kwargs)
    return optax.apply_updates(params, updates), state

  return step


def triad_step(a, b, c):
  """``a = b + s * c`` leaf by leaf (``a`` donated: its buffer receives the result)."""
  del a
  return (jax.tree.map(lambda x, y: x + TRIAD_SCALE * y, b, c),)


def axpy_step(b, c):
  """``b = b + s * c`` leaf by leaf, in place (``b`` donated)."""
  return (jax.tree.map(lambda x, y: x + TRIAD_SCALE * y, b, c),)


def compile_step(fn: Callable, args: tuple, donate: tuple[int, ...], options: str):
  jitted = jax.jit(fn, donate_argnums=donate, keep_unused=True)
  lowered = jitted.lower(*args)
  opts = common.COMPILER_OPTIONS[options]
  return lowered.compile(compiler_options=opts) if opts else lowered.compile()


def build_variants(layout, cases, option_names, objectives) -> tuple[list[Variant], int]:
  """Allocates every group's buffers and compiles every variant of one layout."""
  n = layout[0] * layout[1] * layout[2]
  grads = common.make_tree(layout, seed=1, scale=1e-3)
  ks = [jnp.asarray(k, jnp.int32) for k in (0, 1)]
  variants: list[Variant] = []
  param_bytes = common.state_nbytes(grads)

  for case in cases:
    tx = case.make()
    params = common.make_tree(layout, seed=0)
    state = tx.init(params)
    buffers = Buffers((params, state))
    minimal = (3 * param_bytes + 2 * common.touched_state_nbytes(state, 0)) / n
    modes = objectives if case.multi_objective else ["-"]
    for mode in modes:
      for opt in option_names:
        if mode == "static":
          calls = [
            compile_step(update_step(tx, "static", k), (params, state, grads), (0, 1), opt)
            for k in (0, 1)
          ]
          extra = [(grads,), (grads,)]
        elif mode == "traced":
          calls = [
            compile_step(update_step(tx, "traced"), (params, state, grads, ks[0]), (0, 1), opt)
          ] * 2
          extra = [(grads, ks[0]), (grads, ks[1])]
        else:
          calls = [compile_step(update_step(tx, "-"), (params, state, grads), (0, 1), opt)]
          extra = [(grads,)]
        variants.append(
          Variant(case.name, mode, opt, buffers, calls, extra, minimal, common.hlo_stats(calls[0]))
        )

  a, b = common.make_tree(layout, seed=2), common.make_tree(layout, seed=3)
  triad_buffers, axpy_buffers = Buffers((a,)), Buffers((common.make_tree(layout, seed=4),))
  for opt in option_names:
    call = compile_step(triad_step, (a, b, grads), (0,), opt)
    variants.append(
      Variant(
        "triad",
        "triad",
        opt,
        triad_buffers,
        [call],
        [(b, grads)],
        3 * param_bytes / n,
        common.hlo_stats(call),
      )
    )
  for opt in option_names:
    call = compile_step(axpy_step, (axpy_buffers.arrays[0], grads), (0,), opt)
    variants.append(
      Variant(
        "axpy",
        "axpy",
        opt,
        axpy_buffers,
        [call],
        [(grads,)],
        3 * param_bytes / n,
        common.hlo_stats(call),
      )
    )
  return variants, n


def measure(variants: list[Variant], warmup: int, repeats: int, desc: str) -> None:
  """Warm-up, then ``repeats`` interleaved rounds."""
  for v in variants:
    for r in range(warmup):
      v.run(r)
  for r in tqdm(range(repeats), desc=desc, leave=False):
    start = r % len(variants)
    for v in variants[start:] + variants[:start]:
      v.times.append(v.run(r))


def summarise(variants: list[Variant], layout, n: int) -> list[dict[str, Any]]:
  """One result row per variant, with ratios to optax.adamw / static / triad."""
  med = {(v.optimizer, v.objective, v.options): common.median(v.times) for v in variants}
  rows = []
  for v in variants:
    t = med[(v.optimizer, v.objective, v.options)]
    adamw = med.get(("optax.adamw", "-", v.options))
    static = med.get((v.optimizer, "static", v.options))
    triad = med.get(("triad", "triad", v.options))
    axpy = med.get(("axpy", "axpy", v.options))
    gbps = v.bytes_per_param * n / t / 1e9
    triad_gbps = 3 * 4 * n / triad / 1e9 if triad else None
    axpy_gbps = 3 * 4 * n / axpy / 1e9 if axpy else None
    rows.append(
      dict(
        size=common.layout_label(layout),
        params=n,
        optimizer=v.optimizer,
        objective=v.objective,
        compiler_options=v.options,
        median_ms=1e3 * t,
        min_ms=1e3 * min(v.times),
        calls=len(v.times),
        ratio_to_adamw=(t / adamw) if adamw and v.objective not in ("triad", "axpy") else None,
        ratio_to_static=(t / static) if v.objective == "traced" and static else None,
        min_bytes_per_param=v.bytes_per_param,
        gb_per_s=gbps,
        fraction_of_triad=(gbps / triad_gbps) if triad_gbps else None,
        fraction_of_axpy=(gbps / axpy_gbps) if axpy_gbps else None,
        hlo_bytes_per_param=v.hlo["kernel_bytes"] / n,
        hlo_kernels=v.hlo["kernels"],
        hlo_copies=v.hlo["copies"],
        hlo_conditionals=v.hlo["conditionals"],
      )
    )
  return rows


COLUMNS = [
  ("size", "size", ""),
  ("optimizer", "optimizer", ""),
  ("objective", "objective", ""),
  ("compiler_options", "options", ""),
  ("median_ms", "ms", ".1f"),
  ("ratio_to_adamw", "x adamw", ".2f"),
  ("ratio_to_static", "x static", ".2f"),
  ("min_bytes_per_param", "min B/param", ".0f"),
  ("gb_per_s", "GB/s", ".1f"),
  ("fraction_of_triad", "x triad", ".2f"),
  ("fraction_of_axpy", "x axpy", ".2f"),
  ("hlo_bytes_per_param", "HLO B/param", ".0f"),
  ("hlo_copies", "copies", ""),
]


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
  parser.add_argument(
    "--sizes",
    default="32M,4M",
    help="comma-separated layouts: 32M, 4M, quick or LxRxC (default 32M,4M)",
  )
  parser.add_argument("--repeats", type=int, default=25, help="timed rounds (default 25)")
  parser.add_argument("--warmup", type=int, default=2, help="untimed calls per variant")
  parser.add_argument(
    "--optimizers", default="", help="comma-separated subset (default: all this build has)"
  )
  parser.add_argument("--objectives", default="static,traced", help="static and/or traced")
  parser.add_argument(
    "--options",
    default="default,region",
    help=f"compiler option sets: {','.join(common.COMPILER_OPTIONS)}",
  )
  parser.add_argument(
    "--quick", action="store_true", help="smoke test: size 'quick', 3 rounds, 1 warm-up"
  )
  parser.add_argument("--out", default=None, help="write the results as JSON here")
  args = parser.parse_args(argv)
  if args.quick:
    args.sizes, args.repeats, args.warmup = "quick", 3, 1

  cases, notes = common.optimizer_cases()
  cases = common.select_cases(cases, args.optimizers)
  if "optax.adamw" not in {c.name for c in cases}:
    cases.insert(0, common.optimizer_cases()[0][0])  # the reference is always timed
  options = [o for o in args.options.split(",") if o]
  objectives = [o for o in args.objectives.split(",") if o]
  for o in options:
    if o not in common.COMPILER_OPTIONS:
      raise SystemExit(f"unknown option set {o!r}; choose from {list(common.COMPILER_OPTIONS)}")
  for o in objectives:
    if o not in ("static", "traced"):
      raise SystemExit(f"unknown objective mode {o!r}; choose from static, traced")

  rows = []
  for size in args.sizes.split(","):
    layout = common.parse_layout(size)
    variants, n = build_variants(layout, cases, options, objectives)
    measure(variants, args.warmup, args.repeats, common.layout_label(layout))
    size_rows = summarise(variants, layout, n)
    rows.extend(size_rows)
    del variants  # free this size's buffers before the next

  for note in notes:
    print(f"note: {note}")
  common.print_table(rows, COLUMNS)
  payload = dict(
    benchmark="update",
    machine=common.machine_info(),
    repeats=args.repeats,
    warmup=args.warmup,
    notes=notes,
    traffic_model=(
      "minimal bytes/param = grads + 2 x params + 2 x state touched by the update "
      "(active objective only); triad = 3 x 4 B"
    ),
    compiler_options={k: v for k, v in common.COMPILER_OPTIONS.items() if k in options},
    results=rows,
  )
  common.write_json(args.out, payload)
  return payload


if __name__ == "__main__":
  main()
