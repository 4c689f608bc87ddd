"""Bytes of optimizer state per parameter, on a ~100M-parameter Llama layout.

Nothing is allocated: the parameters are the abstract shapes of the package's
Flax Llama (``nnx.eval_shape``; default: vocabulary 32000, dim 768, 12 layers,
12 heads / 4 KV heads, ffn 2048, tied embeddings = 100.1M parameters in 110
tensors, 25 of them norm scales below 4096 elements) and every state is
``jax.eval_shape(tx.init, params)``. Bytes are ``dualoptim_jax.quantize.state_nbytes``
(size x itemsize of every state array, counters included).

Columns: ``B/param`` = state bytes / parameters; ``touched B/param`` = the part
one update of one objective reads and writes (the other objectives' deltas stay
untouched); ``uint8`` / ``float32`` = where the bytes are.

  python benchmarks/bench_memory.py --out bench_memory.json
  python benchmarks/bench_memory.py --quick
"""

from __future__ import annotations

import argparse
from typing import Any

import common
import jax
import numpy as np
from flax import nnx

from dualoptim_jax.models.llama import Llama, LlamaConfig

# issue 7: the 8-bit DualOptim+ state must hold <= 6.2 B/param.
TARGETS = {"dualoptim_plus_8bit": 6.2}


def llama_100m() -> LlamaConfig:
  return LlamaConfig(vocab_size=32000, dim=768, n_layers=12, n_heads=12, n_kv_heads=4, ffn_dim=2048)


def abstract_params(config: LlamaConfig) -> Any:
  """The model's parameters as a dict of ``jax.ShapeDtypeStruct`` (nothing allocated)."""
  model = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
  _, params, _ = nnx.split(model, nnx.Param, ...)
  return params.to_pure_dict()


def bytes_by_dtype(tree: Any) -> dict[str, int]:
  out: dict[str, int] = {}
  for leaf in jax.tree.leaves(tree):
    name = np.dtype(leaf.dtype).name
    out[name] = out.get(name, 0) + common.state_nbytes(leaf)
  return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny model (smoke test)")
  parser.add_argument("--optimizers", default="", help="comma-separated subset")
  parser.add_argument("--out", default=None, help="write the results as JSON here")
  args = parser.parse_args(argv)

  config = LlamaConfig.tiny(vocab_size=256) if args.quick else llama_100m()
  params = abstract_params(config)
  leaves = jax.tree.leaves(params)
  n = sum(int(np.prod(x.shape)) for x in leaves)
  cases, notes = common.optimizer_cases()
  cases = common.select_cases(cases, args.optimizers)

  rows = []
  for case in cases:
    state = jax.eval_shape(case.make().init, params)
    total = common.state_nbytes(state)
    by_dtype = bytes_by_dtype(state)
    target = TARGETS.get(case.name)
    rows.append(
      dict(
        optimizer=case.name,
        params=n,
        state_bytes=total,
        bytes_per_param=total / n,
        touched_bytes_per_param=common.touched_state_nbytes(state, 0) / n,
        uint8_bytes_per_param=by_dtype.get("uint8", 0) / n,
        float32_bytes_per_param=by_dtype.get("float32", 0) / n,
        target_bytes_per_param=target,
        meets_target=None if target is None else total / n <= target,
      )
    )

  for note in notes:
    print(f"note: {note}")
  print(f"layout: {config}, {n / 1e6:.1f}M parameters in {len(leaves)} tensors")
  common.print_table(
    rows,
    [
      ("optimizer", "optimizer", ""),
      ("bytes_per_param", "B/param", ".3f"),
      ("touched_bytes_per_param", "touched B/param", ".3f"),
      ("uint8_bytes_per_param", "uint8", ".3f"),
      ("float32_bytes_per_param", "float32", ".3f"),
      ("target_bytes_per_param", "target", ".1f"),
      ("meets_target", "ok", ""),
    ],
  )
  payload = dict(
    benchmark="memory",
    machine=common.machine_info(),
    notes=notes,
    layout=dict(config=repr(config), params=n, tensors=len(leaves)),
    results=rows,
  )
  common.write_json(args.out, payload)
  return payload


if __name__ == "__main__":
  main()
