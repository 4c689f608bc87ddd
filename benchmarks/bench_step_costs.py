"""What the trainer's compiled step costs by XLA's own accounting, per preset, on SmolLM2-135M.

Timings on a shared 2-core machine are noisy; XLA's cost and memory analyses of the compiled
programs are not. For each preset this compiles (never runs) the step the unlearning job runs
(:mod:`dualoptim_jax.unlearn.trainer`: loss, gradient, global-norm clipping, the preset's moments,
decay, learning rate, the stability record) and two references:

* ``bare``: ``bench_lm_pipeline.py``'s reference, ``jax.value_and_grad`` of the forget loss
  plus ``optax.adamw``, donated;
* ``bare+clip``: the same after ``optax.clip_by_global_norm(1.0)``.

and reports, relative to ``bare`` (for ``joint``: a bare step on its loss, the forget plus the
retain loss on two batches): ``flops``, ``bytes`` (XLA's "bytes accessed") and
``temps_x_params`` (the compiled temporaries over the parameters' bytes). A step that is bound
by memory traffic cannot be faster than its bytes ratio. Compile only: minutes on a CPU.

  python benchmarks/bench_step_costs.py --out F.json            # SmolLM2-135M
  python benchmarks/bench_step_costs.py --quick --out F.json    # 1 block, joint and DualOptim+
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import common
import jax
import jax.numpy as jnp
import numpy as np
from bench_lm_pipeline import bare_step, load_model, make_batch
from flax import nnx

from dualoptim_jax.unlearn import losses as losses_lib
from dualoptim_jax.unlearn import trainer as trainer_lib


def abstract(tree: Any) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def analyse(jitted: Any, *args: Any) -> dict[str, float]:
  compiled = jitted.lower(*args).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return {
    "flops": float(cost.get("flops", 0.0)),
    "bytes": float(cost.get("bytes accessed", 0.0)),
    "temps": float(compiled.memory_analysis().temp_size_in_bytes),
  }


def bare(graphdef, params, rest, batch, objective, clip: bool, joint: bool) -> dict[str, float]:
  """``bench_lm_pipeline.bare_step`` on the forget loss (``joint``: on both losses and batches)."""
  which = None if joint else trainer_lib.FORGET
  tx, step = bare_step(graphdef, objective, which, "region", clip)
  batches = (batch, batch) if joint else batch
  return analyse(step, abstract(params), jax.eval_shape(tx.init, params), abstract(rest), batches)


def trainer(graphdef, params, rest, batch, objective, preset: str) -> dict[str, float]:
  tx = trainer_lib.make_optimizer(preset, 1e-4)
  joint = trainer_lib.PRESETS[preset].mode == "joint"
  loss = trainer_lib._ObjectiveLoss(objective, None if joint else trainer_lib.FORGET)
  kwargs = () if joint else (("objective", trainer_lib.FORGET),)
  update = trainer_lib._compiled_update(graphdef, tx, loss, kwargs, None)
  batches = (batch, batch) if joint else batch
  size = jax.ShapeDtypeStruct((), jnp.float32)
  state = jax.eval_shape(tx.init, params)
  return analyse(update, abstract(params), state, abstract(rest), None, batches, size)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
  parser.add_argument("--layers", type=int, default=None, help="keep the first N blocks")
  parser.add_argument("--presets", default=",".join(trainer_lib.PRESETS))
  parser.add_argument("--quick", action="store_true", help="1 block, joint and dualoptim_plus")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  if args.quick:
    args.layers, args.presets = args.layers or 1, "joint,dualoptim_plus"
  notes: list[str] = []
  model = load_model(args.layers, notes)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  objective = losses_lib.make_objective("IDK+AP")
  batch = abstract(make_batch(model.config.vocab_size, 4, 64, 0))
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  args_ = (graphdef, params, rest, batch, objective)
  refs = {joint: bare(*args_, clip=False, joint=joint) for joint in (False, True)}
  rows = {"bare": (refs[False], refs[False]), "bare+clip": (bare(*args_, True, False), refs[False])}
  for preset in args.presets.split(","):
    joint = trainer_lib.PRESETS[preset].mode == "joint"
    rows[preset] = (trainer(*args_, preset), refs[joint])
  results = [
    {
      "step": name,
      "flops": r["flops"] / ref["flops"],
      "bytes": r["bytes"] / ref["bytes"],
      "temps_x_params": r["temps"] / param_bytes,
    }
    for name, (r, ref) in rows.items()
  ]
  common.print_table(
    results,
    [
      ("step", "step", ""),
      ("flops", "flops / bare", ".3f"),
      ("bytes", "bytes / bare", ".3f"),
      ("temps_x_params", "temporaries / params", ".2f"),
    ],
  )
  payload = {
    "benchmark": "step_costs",
    "machine": common.machine_info(),
    "notes": notes,
    "layers": model.config.n_layers,
    "params": model.config.num_params,
    "batch": "4 x 64, IDK+AP forget loss",
    "results": results,
  }
  if args.out:
    with open(args.out, "w") as f:
      json.dump(payload, f, indent=1)
  return payload


if __name__ == "__main__":
  main()
