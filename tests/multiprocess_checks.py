"""The optimizer across processes (run by tests/test_multiprocess.py, under the launcher or alone).

``multiprocess_checks.py OUT.npz``: joins the job the environment describes
(:func:`dualoptim_jax.unlearn.distributed.initialize`: two launched processes with 4 CPU devices
each, or one process with 8), lays plain parameters out FSDP on a ``data=1,fsdp=8`` mesh over
*all* processes' devices and, for DualOptim+ in float32 and 8-bit, with eager and jitted ``init``
and static and traced objectives:

* checks that every state leaf sits on its parameter's global sharding (after init and update);
* checks that the compiled update has no collective;
* runs three updates and gathers the updates and states to every host.

Process 0 writes the gathered arrays to ``OUT.npz`` (the test compares the two-process and the
one-process files) and prints a JSON summary as its last line.
"""

from __future__ import annotations

import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from sharding_checks import OPTIMIZERS, expected_spec

from dualoptim_jax import sharding as S
from dualoptim_jax.unlearn import checkpoint as C
from dualoptim_jax.unlearn import distributed
from dualoptim_jax.unlearn.placement import make_mesh

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def host_params() -> dict[str, np.ndarray]:
  """The same values in every process (NumPy, so no process-local JAX array is involved)."""
  rng = np.random.default_rng(1)
  return {
    "embed": rng.normal(size=(16, 128)).astype(np.float32),
    "w": rng.normal(size=(128, 32)).astype(np.float32),
    "b": np.ones((32,), np.float32),
  }


def host_grads(i: int, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(100 + i)
  return {k: (rng.normal(size=v.shape) * 1e-2).astype(np.float32) for k, v in params.items()}


def gather(tree) -> dict[str, np.ndarray]:
  """Every leaf of ``tree`` as a whole NumPy array, in every process."""
  return {
    k: np.asarray(multihost_utils.process_allgather(v, tiled=True))
    for k, v in C.named_leaves(tree).items()
  }


def sharding_report(state, param_specs, mesh) -> dict:
  """Leaves off their expected global sharding; scalars left on one local device are counted.

  Param-shaped leaves (moments, 8-bit codes and scales) must sit on their parameter's sharding;
  the others (step counters) may also be single-device scalars of an eager ``init`` (uncommitted:
  ``jit`` places them).
  """
  wrong, local, sharded = [], [], 0
  for name, leaf in C.named_leaves(state).items():
    spec = expected_spec(name, leaf.shape, param_specs, mesh)
    if spec is None:  # not a parameter's state (a step counter): jit places it
      if not isinstance(leaf.sharding, NamedSharding):
        local.append(name)
      continue
    if not isinstance(leaf.sharding, NamedSharding):
      wrong.append(f"{name}: {leaf.sharding} is not {spec}")
      continue
    if not leaf.sharding.is_equivalent_to(NamedSharding(mesh, spec), leaf.ndim):
      wrong.append(f"{name}: {leaf.sharding.spec} != {spec}")
    sharded += any(e is not None for e in spec)
  return {"wrong": wrong[:10], "num_sharded": sharded, "local_scalars": local}


def check(name: str, init_mode: str, objective_mode: str, params, shardings, mesh, specs) -> dict:
  tx = OPTIMIZERS[name]()
  if init_mode == "eager":
    state = tx.init(params)
  else:  # jitted, with the state shardings the trainer asks for
    shapes = jax.eval_shape(tx.init, params)
    state = jax.jit(tx.init, out_shardings=S.state_shardings(shapes, params))(params)
  res = {"init": sharding_report(state, specs, mesh)}
  if objective_mode == "static":
    update = jax.jit(lambda g, s, p, k: tx.update(g, s, p, objective=k), static_argnums=3)
    objectives = [0, 1, 1]
  else:
    update = jax.jit(lambda g, s, p, k: tx.update(g, s, p, objective=k))
    objectives = [jnp.int32(0), jnp.int32(1), jnp.int32(1)]
  single = host_params()
  grads = [jax.device_put(host_grads(i, single), shardings) for i in range(len(objectives))]
  hlo = update.lower(grads[0], state, params, objectives[0]).compile().as_text()
  res["collectives"] = [op for op in COLLECTIVES if op in hlo]
  out = {}
  for i, k in enumerate(objectives):
    updates, state = update(grads[i], state, params, k)
    out.update({f"u{i}/{n}": v for n, v in gather(updates).items()})
  res["after_update"] = sharding_report(state, specs, mesh)
  out.update({f"state/{n}": v for n, v in gather(state).items()})
  return res, out


def main(out_path: str) -> None:
  t0 = time.perf_counter()
  setup = distributed.initialize(timeout=60)
  mesh = make_mesh("data=1,fsdp=8")
  single = host_params()
  specs_tree = S.fsdp_specs(single, mesh, min_size=1024)
  shardings = S.param_shardings(single, mesh, specs_tree)
  params = jax.device_put(single, shardings)
  specs = {k: v.sharding.spec for k, v in C.named_leaves(params).items()}
  result = {
    "setup": setup.source,
    "process_count": jax.process_count(),
    "device_count": jax.device_count(),
    "local_device_count": jax.local_device_count(),
    "params_fully_addressable": all(x.is_fully_addressable for x in jax.tree.leaves(params)),
    "param_specs": {k: str(v) for k, v in specs.items()},
    "checks": {},
  }
  arrays = {}
  for name in ("dualoptim_plus", "dualoptim_plus_8bit"):
    for init_mode, objective_mode in (("eager", "static"), ("jit", "traced")):
      key = f"{name}:{init_mode}:{objective_mode}"
      result["checks"][key], out = check(
        name, init_mode, objective_mode, params, shardings, mesh, specs
      )
      arrays.update({f"{key}/{k}": v for k, v in out.items()})
  result["seconds"] = round(time.perf_counter() - t0, 1)
  if distributed.is_primary():
    np.savez(out_path, **arrays)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
  main(sys.argv[1])
