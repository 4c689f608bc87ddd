"""Multi-device checks for dualoptim_jax.sharding (run by tests/test_sharding.py in a subprocess).

Started with 8 virtual CPU devices; prints one JSON document of measurements as its last line.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from multidevice import toy_unlearning_arrays

import dualoptim_jax as dj
from dualoptim_jax import sharding as S
from dualoptim_jax.models.llama import Llama, LlamaConfig
from dualoptim_jax.quantize import QuantizedArray
from dualoptim_jax.unlearn import data as D
from dualoptim_jax.unlearn import losses as L
from dualoptim_jax.unlearn import paths
from dualoptim_jax.unlearn import placement as PL
from dualoptim_jax.unlearn import trainer as T

V, LEN, BATCH = 64, 16, 8
CONFIG = LlamaConfig(vocab_size=V, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64)
BLOCK = 8  # 8-bit block size: the fsdp=4 shards of the 32-wide last axes hold whole blocks

OPTIMIZERS = {
  "dualoptim_plus": lambda: dj.dualoptim_plus(1e-3, weight_decay=0.01),
  "dualoptim_plus_8bit": lambda: dj.dualoptim_plus(
    1e-3,
    weight_decay=0.01,
    storage=dj.state_storage(state_bits=8, block_size=BLOCK, min_8bit_size=0),
  ),
  "dualoptim_plus_lion": lambda: dj.dualoptim_plus_lion(1e-4, weight_decay=0.01),
  "dualoptim": lambda: dj.dualoptim(1e-3, weight_decay=0.01),
  "adamw": lambda: optax.with_extra_args_support(optax.adamw(1e-3)),  # any optax state
}


def arrays(seed: int, n: int) -> dict[str, np.ndarray]:
  return toy_unlearning_arrays(seed, n, V, LEN)


def expected_spec(name: str, leaf_shape: tuple, param_specs: dict, mesh) -> P | None:
  """What the state leaf called ``name`` should be sharded as, decided from its name alone."""
  for pname, spec in param_specs.items():
    if name.endswith("." + pname) or name == pname:
      return spec
    if name.endswith("." + pname + ".codes"):
      return spec
    if name.endswith("." + pname + ".absmax"):
      # The param's spec on the leading axes; on the block axis if the mesh divides it.
      return S.fit_spec(spec, leaf_shape, mesh)
  return None  # not a parameter's state (step counters): left where JAX puts it, as in optax


def sharding_report(state, param_specs, mesh) -> dict:
  wrong, quantized, sharded = [], 0, 0
  for name, leaf in paths.named_leaves(state).items():
    spec = expected_spec(name, leaf.shape, param_specs, mesh)
    if spec is None:
      continue
    want = NamedSharding(mesh, spec)
    if not leaf.sharding.is_equivalent_to(want, leaf.ndim):
      wrong.append(f"{name}: {getattr(leaf.sharding, 'spec', leaf.sharding)} != {want.spec}")
    sharded += any(e is not None for e in want.spec)
    quantized += name.endswith(".codes")
  return {"wrong": wrong[:10], "num_sharded": sharded, "num_codes": quantized}


def plain_params() -> dict[str, jax.Array]:
  """A plain pytree: one leaf FSDP-split on its last axis, one on its first, one too small to split."""
  key = jax.random.key(1)
  return {
    "embed": jax.random.normal(key, (16, 128)),
    "w": jax.random.normal(key, (128, 32)),
    "b": jnp.ones((32,)),
  }


def optimizer_checks(runs: dict[str, list[str]], mesh) -> dict:
  """State shardings, collectives and single-device parity of the optimizer update alone."""
  single_params = plain_params()
  specs = S.fsdp_specs(single_params, mesh, min_size=1024)
  params = jax.device_put(single_params, S.param_shardings(single_params, mesh, specs))
  param_specs = {name: leaf.sharding.spec for name, leaf in paths.named_leaves(params).items()}
  out = {"param_specs": {k: str(v) for k, v in param_specs.items()}}
  key = jax.random.key(0)
  grad = lambda i: jax.tree.map(
    lambda x: jax.random.normal(jax.random.fold_in(key, i), x.shape) * 1e-2, single_params
  )
  for name, modes in runs.items():
    t0 = time.perf_counter()
    tx = OPTIMIZERS[name]()
    state = tx.init(params)  # eager, outside jit: optax-style placement
    res = {
      "init": sharding_report(state, param_specs, mesh),
      "quantized_leaves": sum(
        isinstance(x, QuantizedArray)
        for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, QuantizedArray))
      ),
    }
    for mode in modes:
      if mode == "static":
        update = jax.jit(
          lambda g, s, p, k, tx=tx: tx.update(g, s, p, objective=k), static_argnums=3
        )
        objectives = [0, 1, 1]
      else:
        update = jax.jit(lambda g, s, p, k, tx=tx: tx.update(g, s, p, objective=k))
        objectives = [jnp.int32(0), jnp.int32(1), jnp.int32(1)]
      shard = lambda g: jax.device_put(g, S.param_shardings(params, mesh, specs))
      hlo = update.lower(shard(grad(0)), state, params, objectives[0]).compile().as_text()
      s_state, u_state, equal = state, tx.init(single_params), True
      for i, k in enumerate(objectives):
        u_sharded, s_state = update(shard(grad(i)), s_state, params, k)
        u_single, u_state = update(grad(i), u_state, single_params, k)
        equal &= all(
          np.array_equal(a, b)
          for a, b in zip(
            jax.tree.leaves((u_sharded, s_state)), jax.tree.leaves((u_single, u_state))
          )
        )
      res[mode] = {
        "all_gather": "all-gather" in hlo,
        "collectives": sorted(
          {
            op
            for op in (
              "all-gather",
              "all-reduce",
              "reduce-scatter",
              "all-to-all",
              "collective-permute",
            )
            if op in hlo
          }
        ),
        "after_update": sharding_report(s_state, param_specs, mesh),
        "bitwise_equal_single_device": bool(equal),
      }
    res["seconds"] = round(time.perf_counter() - t0, 1)
    out[name] = res
  return out


def train(mesh, tx, loss: str, updates: int):
  model = Llama(CONFIG, rngs=nnx.Rngs(0))
  runner = T.Unlearner(model, L.make_objective(loss), tx, mesh=mesh)
  fi = D.BatchIterator(arrays(0, 16), BATCH, seed=0)
  ri = D.BatchIterator(arrays(1, 40), BATCH, seed=1)
  history = runner.run(fi, ri, updates, progress=False)
  return runner, history


TRAINING = {
  # name: (optimizer, loss); NPO+KL puts the frozen reference model on the mesh too.
  "sgd": (lambda: optax.sgd(0.1), "NPO+KL"),
  "dualoptim_plus_eps1e-3": (lambda: dj.dualoptim_plus(1e-3, eps=1e-3), "GA+GD"),
  "dualoptim_plus": (lambda: T.make_optimizer("dualoptim_plus", 1e-3), "NPO+KL"),
}


def training_checks(names: list[str], mesh) -> dict:
  """The Unlearner on one device and on the mesh: same batches, same schedule, 6 updates."""
  out = {}
  for name in names:
    make, loss = TRAINING[name]
    t0 = time.perf_counter()
    single, h1 = train(None, make(), loss, 6)
    sharded, h2 = train(mesh, make(), loss, 6)
    diffs = [
      float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
      for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(sharded.params))
    ]
    losses1 = np.where(np.isnan(h1.forget), h1.retain, h1.forget)
    losses2 = np.where(np.isnan(h2.forget), h2.retain, h2.forget)
    specs = annotated_specs()
    out[name] = {
      "max_abs_param_diff": max(diffs),
      "max_abs_loss_diff": float(np.max(np.abs(losses1 - losses2))),
      "params": sharding_report(sharded.params, specs, mesh),
      "state": sharding_report(sharded.opt_state, specs, mesh),
      "seconds": round(time.perf_counter() - t0, 1),
    }
  return out


def annotated_specs() -> dict[str, P]:
  """The Llama's parameter specs as its nnx.with_partitioning annotations write them."""
  mesh = PL.make_mesh("data=2,fsdp=4")
  state = nnx.state(Llama(CONFIG, rngs=nnx.Rngs(0)), nnx.Param)
  flat = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[
    0
  ]
  out = {}
  for path, var in flat:
    name = paths.path_name(path)
    out[name] = S.fit_spec(P(*(var.get_metadata().get("out_sharding") or ())), var.shape, mesh)
  return out


def main(argv: list[str]) -> None:
  """``sharding_checks.py NAME:MODE+MODE,... TRAINING,...`` (``-`` for none).

  E.g. ``dualoptim_plus:static+traced,adamw:static sgd``.
  """
  t0 = time.perf_counter()
  runs = (
    {}
    if argv[0] == "-"
    else {item.split(":")[0]: item.split(":")[1].split("+") for item in argv[0].split(",")}
  )
  trainings = [] if argv[1] == "-" else argv[1].split(",")
  mesh = PL.make_mesh("data=2,fsdp=4")
  result = {
    "num_devices": jax.device_count(),
    "mesh": dict(mesh.shape),
    "axis_types": [str(t) for t in mesh.axis_types],
    "optimizers": optimizer_checks(runs, mesh),
    "training": training_checks(trainings, mesh),
  }
  result["seconds"] = round(time.perf_counter() - t0, 1)
  print(json.dumps(result))


if __name__ == "__main__":
  import sys

  main(sys.argv[1:])
