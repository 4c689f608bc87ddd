"""Optimizer-state memory of an 8B Llama under 8-bit DualOptim+, per device, for a few meshes.

Nothing is allocated: the parameters are the abstract shapes of the package's Flax Llama with the
Llama-3-8B layout, the state is ``jax.eval_shape(tx.init, params)``, its bytes are
``dj.state_nbytes``, and the per-device share follows the shardings the trainer gives it
(:func:`dualoptim_jax.sharding.state_shardings` on an abstract mesh: every state leaf on its
parameter's sharding). Run: ``python examples/scale_memory.py``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractMesh, AxisType

import dualoptim_jax as dj
from dualoptim_jax import sharding as S
from dualoptim_jax.models.llama import Llama, LlamaConfig
from dualoptim_jax.unlearn.placement import MESH_AXES

LLAMA3_8B = LlamaConfig(
  vocab_size=128256,
  dim=4096,
  n_layers=32,
  n_heads=32,
  n_kv_heads=8,
  ffn_dim=14336,
  rope_theta=500000.0,
  max_seq_len=8192,
  tie_embeddings=False,
)
GIB = 2**30


def per_device_bytes(tree, shardings) -> int:
  """Bytes the largest-loaded device holds: each leaf's shard shape, summed."""
  total = 0
  for leaf, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    total += math.prod(sh.shard_shape(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
  return total


def main() -> None:
  model = nnx.eval_shape(lambda: Llama(LLAMA3_8B, rngs=nnx.Rngs(0)))
  params = nnx.state(model, nnx.Param)
  n = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  bf16 = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), params)
  print(f"Llama-3-8B layout: {n / 1e9:.3f}B parameters, bf16 weights {2 * n / GIB:.1f} GiB")
  optimizers = {
    "one fp32 Adam state": lambda: dj.dualoptim(
      1e-5, num_objectives=1, storage=dj.state_storage(dtype=jnp.float32)
    ),
    "dualoptim_plus fp32": lambda: dj.dualoptim_plus(
      1e-5, storage=dj.state_storage(dtype=jnp.float32)
    ),
    "dualoptim_plus 8-bit": lambda: dj.dualoptim_plus(1e-5, state_bits=8),
  }
  states = {}
  for name, make in optimizers.items():
    states[name] = jax.eval_shape(make().init, bf16)
    total = dj.state_nbytes(states[name])
    print(f"{name:22s} state {total / GIB:7.1f} GiB = {total / n:5.2f} B/param")
  print("\nper device (state + bf16 weights), largest share; mesh axes data x fsdp:")
  for data, fsdp in ((1, 8), (1, 16), (2, 16), (1, 32), (4, 64)):
    mesh = AbstractMesh((data, fsdp), MESH_AXES, axis_types=(AxisType.Auto,) * 2)
    p_sh = S.param_shardings(bf16, mesh)
    row = []
    for name in ("dualoptim_plus fp32", "dualoptim_plus 8-bit"):
      s_sh = S.state_shardings(states[name], bf16, p_sh)
      dev = per_device_bytes(states[name], s_sh) + per_device_bytes(bf16, p_sh)
      row.append(f"{name} {dev / GIB:5.1f} GiB")
    print(f"  data={data},fsdp={fsdp} ({data * fsdp:3d} devices): " + "; ".join(row))


if __name__ == "__main__":
  main()
