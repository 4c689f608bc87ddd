"""A small checkpointed unlearning job, run (and killed) by tests/test_checkpoint.py.

The same code path as ``dualoptim-unlearn --checkpoint-dir``: a tiny Llama, GA+GD (``--loss``), the
alternating schedule, an :class:`~dualoptim_jax.unlearn.trainer.Unlearner` on a mesh, driven by
:func:`~dualoptim_jax.unlearn.checkpoint.run_with_checkpoints`. Writes the final parameters and
loss history to ``--out`` (npz) and prints a JSON summary as its last line.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np
from flax import nnx
from multidevice import toy_unlearning_arrays

import dualoptim_jax as dj
from dualoptim_jax.models.llama import Llama, LlamaConfig
from dualoptim_jax.unlearn import checkpoint as C
from dualoptim_jax.unlearn import data as D
from dualoptim_jax.unlearn import losses as L
from dualoptim_jax.unlearn import placement as PL
from dualoptim_jax.unlearn import trainer as T

V, LEN, BATCH = 64, 16, 8
FORGET_STEPS, RETAIN_STEPS = 2, 3  # a cycle of 5 updates: checkpoints every 4 fall mid-cycle
OPTIMIZERS = {
  "dualoptim_plus": lambda: dj.dualoptim_plus(1e-3, weight_decay=0.01),
  "dualoptim": lambda: dj.dualoptim(1e-3, weight_decay=0.01),
  # 8-bit codes for every moment of the tiny model (block 4: whole blocks per fsdp=8 shard).
  "dualoptim_plus_8bit": lambda: dj.dualoptim_plus(
    1e-3, weight_decay=0.01, storage=dj.state_storage(state_bits=8, block_size=4, min_8bit_size=0)
  ),
}


def arrays(seed: int, n: int) -> dict[str, np.ndarray]:
  return toy_unlearning_arrays(seed, n, V, LEN)


class SlowBatches(D.BatchIterator):
  """A data pipeline that takes ``delay`` seconds per batch (so the test can kill mid-run)."""

  delay = 0.0

  def __next__(self):
    time.sleep(self.delay)
    return super().__next__()


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--dir", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--updates", type=int, default=14)
  p.add_argument("--every", type=int, default=4)
  p.add_argument("--keep", type=int, default=2)
  p.add_argument("--mesh", default="fsdp=8", help="mesh spec, or 'none' for the default device")
  p.add_argument("--optimizer", default="dualoptim_plus", choices=sorted(OPTIMIZERS))
  p.add_argument("--dim", type=int, default=32)
  p.add_argument("--resume", action="store_true")
  p.add_argument("--delay", type=float, default=0.0)
  p.add_argument("--loss", default="GA+GD")
  p.add_argument(
    "--compilation-cache", default=None, help="JAX persistent compilation cache directory"
  )
  a = p.parse_args()
  if a.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", a.compilation_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

  config = LlamaConfig(vocab_size=V, dim=a.dim, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64)
  mesh = None if a.mesh == "none" else PL.make_mesh(a.mesh)
  objective = L.make_objective(a.loss)
  runner = T.Unlearner(
    Llama(config, rngs=nnx.Rngs(0)),
    objective,
    OPTIMIZERS[a.optimizer](),
    forget_steps=FORGET_STEPS,
    retain_steps=RETAIN_STEPS,
    mesh=mesh,
  )
  SlowBatches.delay = a.delay
  forget = SlowBatches(arrays(0, 16), BATCH, seed=0)
  retain = SlowBatches(arrays(1, 40), BATCH, seed=1)
  fp = C.fingerprint(
    model=config,
    preset=a.optimizer,
    optimizer={"learning_rate": 1e-3, "weight_decay": 0.01},
    loss={"name": objective.name},
    schedule={"forget_steps": FORGET_STEPS, "retain_steps": RETAIN_STEPS},
  )
  resumed = []
  with C.Checkpointer(a.dir, fingerprint=fp, every=a.every, keep=a.keep) as ckpt:
    start = ckpt.latest_step()
    history = C.run_with_checkpoints(
      runner,
      forget,
      retain,
      a.updates,
      ckpt,
      resume=a.resume,
      progress=False,
      log=lambda msg: resumed.append(msg),
    )
    steps = ckpt.all_steps()
  named = C.named_leaves(runner.params)
  np.savez(
    a.out,
    **{f"param/{k}": np.asarray(v) for k, v in named.items()},
    **{f"history/{f}": getattr(history, f) for f in history._fields},
  )
  print(
    json.dumps(
      {
        "resumed": resumed,
        "start": start,
        "steps": steps,
        "update_count": runner.update_count,
        "mesh": None if mesh is None else dict(mesh.shape),
        "param_specs": {
          k: str(v.sharding.spec) if hasattr(v.sharding, "spec") else "single-device"
          for k, v in named.items()
        },
        "num_devices": jax.device_count(),
      }
    )
  )


if __name__ == "__main__":
  main()
