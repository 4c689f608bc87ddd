"""Compile time of the optimizer update: static objective (one program per objective) vs traced.

The step is the one of ``bench_update.py`` (update + ``optax.apply_updates``,
donated buffers) on the parameter layout of a Llama (default: the ~100M layout
of ``bench_memory.py``, 110 tensors; compile time grows with the number of
tensors, not their size). Shapes are abstract, so nothing is allocated. Each
measurement uses a fresh ``jax.jit`` after ``jax.clear_caches()``; ``trace+lower``
and ``compile`` (XLA) are timed separately; the table gives medians over
``--repeats``. A static objective needs K = 2 programs (``static k=0`` and
``static k=1``); a traced one needs one.

  python benchmarks/bench_compile.py --out bench_compile.json
  python benchmarks/bench_compile.py --quick
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import bench_memory
import bench_update
import common
import jax
import jax.numpy as jnp
from tqdm import tqdm

from dualoptim_jax.models.llama import LlamaConfig


def compile_times(fn, args, options: str) -> tuple[float, float]:
  """(trace+lower seconds, compile seconds) of a fresh jit of ``fn``."""
  jax.clear_caches()
  jitted = jax.jit(fn, donate_argnums=(0, 1), keep_unused=True)
  start = time.perf_counter()
  lowered = jitted.lower(*args)
  lowered_at = time.perf_counter()
  opts = common.COMPILER_OPTIONS[options]
  if opts:
    lowered.compile(compiler_options=opts)
  else:
    lowered.compile()
  return lowered_at - start, time.perf_counter() - lowered_at


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
  parser.add_argument("--repeats", type=int, default=3, help="compilations per program")
  parser.add_argument("--optimizers", default="", help="comma-separated subset")
  parser.add_argument(
    "--options",
    default="default,region",
    help=f"compiler option sets: {','.join(common.COMPILER_OPTIONS)}",
  )
  parser.add_argument(
    "--quick",
    action="store_true",
    help="smoke test: tiny model, 1 repeat, optax.adamw and dualoptim_plus with "
    "the region options unless --optimizers / --options say otherwise",
  )
  parser.add_argument("--out", default=None, help="write the results as JSON here")
  args = parser.parse_args(argv)
  if args.quick:
    args.repeats = 1
    args.optimizers = args.optimizers or "optax.adamw,dualoptim_plus"
    if args.options == parser.get_default("options"):
      args.options = "region"

  config = LlamaConfig.tiny(vocab_size=256) if args.quick else bench_memory.llama_100m()
  params = bench_memory.abstract_params(config)
  grads = params
  k_spec = jax.ShapeDtypeStruct((), jnp.int32)
  cases, notes = common.optimizer_cases()
  cases = common.select_cases(cases, args.optimizers)
  options = [o for o in args.options.split(",") if o]

  programs = []  # (optimizer, program, options, fn, args)
  for case in cases:
    tx = case.make()
    state = jax.eval_shape(tx.init, params)
    for opt in options:
      if case.multi_objective:
        for k in (0, 1):
          programs.append(
            (
              case.name,
              f"static k={k}",
              opt,
              bench_update.update_step(tx, "static", k),
              (params, state, grads),
            )
          )
        programs.append(
          (
            case.name,
            "traced",
            opt,
            bench_update.update_step(tx, "traced"),
            (params, state, grads, k_spec),
          )
        )
      else:
        programs.append(
          (case.name, "-", opt, bench_update.update_step(tx, "-"), (params, state, grads))
        )

  times: dict[tuple, list[tuple[float, float]]] = {p[:3]: [] for p in programs}
  for _ in tqdm(range(args.repeats), desc="compile", leave=False):
    for name, program, opt, fn, fn_args in programs:  # interleaved, like the timings
      times[(name, program, opt)].append(compile_times(fn, fn_args, opt))

  rows = []
  for (name, program, opt), ts in times.items():
    lower = common.median([t[0] for t in ts])
    comp = common.median([t[1] for t in ts])
    rows.append(
      dict(
        optimizer=name,
        program=program,
        compiler_options=opt,
        lower_s=lower,
        compile_s=comp,
        total_s=lower + comp,
      )
    )
  for row in rows:  # traced vs all static programs together (one per objective)
    if row["program"] == "traced":
      static = [
        r["total_s"]
        for r in rows
        if r["optimizer"] == row["optimizer"]
        and r["compiler_options"] == row["compiler_options"]
        and r["program"].startswith("static")
      ]
      row["ratio_to_all_static"] = row["total_s"] / sum(static)
      row["ratio_to_one_static"] = row["total_s"] / (sum(static) / len(static))

  for note in notes:
    print(f"note: {note}")
  print(f"layout: {config}")
  common.print_table(
    rows,
    [
      ("optimizer", "optimizer", ""),
      ("program", "program", ""),
      ("compiler_options", "options", ""),
      ("lower_s", "trace+lower s", ".2f"),
      ("compile_s", "compile s", ".2f"),
      ("total_s", "total s", ".2f"),
      ("ratio_to_one_static", "x one static", ".2f"),
      ("ratio_to_all_static", "x all static", ".2f"),
    ],
  )
  payload = dict(
    benchmark="compile",
    machine=common.machine_info(),
    repeats=args.repeats,
    notes=notes,
    layout=repr(config),
    results=rows,
  )
  common.write_json(args.out, payload)
  return payload


if __name__ == "__main__":
  main()
