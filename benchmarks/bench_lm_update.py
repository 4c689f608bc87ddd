"""Each preset's optimizer update alone, at SmolLM2-135M's parameter shapes, against optax.adamw.

``bench_lm_pipeline.py`` times whole training steps (``step_ratio``). This script times what a
preset's step adds to the reference's: the update alone, ``tx.update`` + ``optax.apply_updates``
on the model's own parameter tree (random gradients), jitted with parameters and state donated,
interleaved with a bare ``optax.adamw`` update on its own buffers (the reference of
``bench_lm_pipeline.py``). Each preset is the trainer's optimizer
(``trainer.make_optimizer``: global-norm clipping at 1.0, decay mask, lr schedule), so
``excess_ms`` = preset update - adamw update is what the preset's step should cost over the
reference step if the forward and backward passes cost the same in both; ``predicted_ratio`` =
1 + excess / ``--bare-step-ms`` (a reference step measured by ``bench_lm_pipeline.py``) is the
step ratio the update alone explains. An alternating preset's rounds alternate its two
objectives' programs.

  python benchmarks/bench_lm_update.py --out lm_update.json
  python benchmarks/bench_lm_update.py --quick --out F.json       # the model's first 2 blocks
"""

from __future__ import annotations

import argparse
from typing import Any

import common
import jax
import numpy as np
import optax
from bench_lm_pipeline import load_model
from flax import nnx
from tqdm import tqdm

from dualoptim_jax.unlearn import trainer as trainer_lib

COLUMNS = [
  ("preset", "preset", ""),
  ("adamw_ms", "adamw ms", ".1f"),
  ("update_ms", "update ms", ".1f"),
  ("excess_ms", "excess ms", ".1f"),
  ("predicted_ratio", "predicted step ratio", ".2f"),
]


def update_step(tx: optax.GradientTransformationExtraArgs, kwargs: dict[str, Any]):
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params, **kwargs)
    return optax.apply_updates(params, updates), state

  return jax.jit(step, donate_argnums=(0, 1), compiler_options=common.REGION_ANALYSIS)


def time_preset(preset: str, params: Any, grads: Any, rounds: int) -> dict[str, Any]:
  """Median seconds of ``preset``'s update and of optax.adamw's, interleaved."""
  bare_tx = optax.adamw(1e-4, weight_decay=common.WEIGHT_DECAY)
  tx = optax.with_extra_args_support(
    trainer_lib.make_optimizer(
      preset, 1e-4, weight_decay=common.WEIGHT_DECAY, max_grad_norm=1.0, decay_steps=1000
    )
  )
  copy = lambda tree: jax.tree.map(lambda x: x.copy(), tree)
  bare = [copy(params), bare_tx.init(params)]
  mine = [copy(params), tx.init(params)]
  alternating = trainer_lib.PRESETS[preset].mode == "alternate"
  if alternating:
    steps = [update_step(tx, {"objective": k}) for k in (0, 1)]
  else:  # one program: two jitted copies of the same step would compile it twice
    steps = [update_step(tx, {})] * 2
  bare_step = update_step(optax.with_extra_args_support(bare_tx), {})
  times: dict[str, list[float]] = {"adamw": [], preset: []}

  def run(name: str, r: int) -> float:
    buffers, step = (bare, bare_step) if name == "adamw" else (mine, steps[r % 2])
    seconds, out = common.time_call(lambda: step(buffers[0], buffers[1], grads))
    buffers[0], buffers[1] = out
    return seconds

  for r in range(2):  # compiles both objectives' programs
    run("adamw", r)
    run(preset, r)
  for r in tqdm(range(rounds), desc=preset, leave=False):
    for name in ("adamw", preset) if r % 2 == 0 else (preset, "adamw"):
      times[name].append(run(name, r))
  bare_s, mine_s = common.median(times["adamw"]), common.median(times[preset])
  return dict(preset=preset, adamw_ms=1e3 * bare_s, update_ms=1e3 * mine_s, rounds=rounds)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
  parser.add_argument("--presets", default=",".join(trainer_lib.PRESETS))
  parser.add_argument("--rounds", type=int, default=8, help="timed rounds per preset")
  parser.add_argument("--quick", action="store_true", help="the model's first 2 blocks, 3 rounds")
  parser.add_argument(
    "--bare-step-ms",
    type=float,
    default=None,
    help="a reference step (bench_lm_pipeline.py's bare_ms) to predict step ratios from",
  )
  parser.add_argument("--out", default=None, help="write the results as JSON here")
  args = parser.parse_args(argv)
  notes: list[str] = []
  model = load_model(2 if args.quick else None, notes)
  params = nnx.state(model, nnx.Param)
  rng = np.random.default_rng(0)
  grads = jax.tree.map(lambda p: (1e-3 * rng.standard_normal(p.shape)).astype(p.dtype), params)
  rows = []
  for preset in args.presets.split(","):
    row = time_preset(preset, params, grads, 3 if args.quick else args.rounds)
    row["excess_ms"] = row["update_ms"] - row["adamw_ms"]
    if args.bare_step_ms:
      row["predicted_ratio"] = 1 + row["excess_ms"] / args.bare_step_ms
    rows.append(row)
  common.print_table(rows, COLUMNS)
  payload = dict(
    benchmark="lm_update",
    machine=common.machine_info(),
    parameters=int(sum(np.prod(p.shape) for p in jax.tree.leaves(params))),
    results=rows,
    notes=notes,
  )
  common.write_json(args.out, payload)
  return payload


if __name__ == "__main__":
  main()
