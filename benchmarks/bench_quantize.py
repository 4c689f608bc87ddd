"""Speed of the 8-bit block-wise codec against float32 optimizer updates.

Times, on one ``(rows, cols)`` float32 tensor (default 4096 x 4096 = 16.8M
elements), jitted and with donated state buffers:

* ``ema``:  ``m <- b m + (1 - b) g`` with ``m`` float32 (the baseline, 1.00)
  versus with ``m`` stored 8-bit signed (decode -> EMA -> encode);
* ``adam``: the two Adam EMAs plus the update ``m / (sqrt(v) + eps)``, float32
  versus ``m`` 8-bit signed and ``v`` 8-bit unsigned;
* ``encode`` / ``decode`` alone (8-bit signed) against the float32 EMA.

Each variant runs ``--warmup`` times, then ``--repeats`` rounds in which every
variant runs once (interleaved, so load changes hit all alike); the table gives
the median wall time and its ratio to the float32 version of the same update,
and the same for the fastest round and for the median process CPU time (all
threads), which are less disturbed on a shared machine.

  python benchmarks/bench_quantize.py [--rows 4096 --cols 4096 --repeats 20]
"""

from __future__ import annotations

import argparse
import platform
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from dualoptim_jax import quantize as qz

B1, B2, EPS = 0.9, 0.95, 1e-8


def make_variants(block_size: int):
  def q(x, signed):
    return qz.quantize_blockwise(x, signed=signed, block_size=block_size)

  def dq(s, signed):
    return qz.dequantize_blockwise(s, signed=signed, block_size=block_size)

  def ema_f32(m, g):
    return B1 * m + (1 - B1) * g

  def ema_8bit(m, g):
    return q(B1 * dq(m, True) + (1 - B1) * g, True)

  def adam_f32(m, v, g):
    m = B1 * m + (1 - B1) * g
    v = B2 * v + (1 - B2) * g * g
    return m, v, m / (jnp.sqrt(v) + EPS)

  def adam_8bit(m, v, g):
    m = B1 * dq(m, True) + (1 - B1) * g
    v = B2 * dq(v, False) + (1 - B2) * g * g
    return q(m, True), q(v, False), m / (jnp.sqrt(v) + EPS)

  return dict(
    ema_f32=(jax.jit(ema_f32, donate_argnums=0), 1),
    ema_8bit=(jax.jit(ema_8bit, donate_argnums=0), 1),
    adam_f32=(jax.jit(adam_f32, donate_argnums=(0, 1)), 2),
    adam_8bit=(jax.jit(adam_8bit, donate_argnums=(0, 1)), 2),
    encode=(jax.jit(lambda x: q(x, True)), 0),
    decode=(jax.jit(lambda s: dq(s, True)), 0),
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
  parser.add_argument("--rows", type=int, default=4096)
  parser.add_argument("--cols", type=int, default=4096)
  parser.add_argument("--block-size", type=int, default=256)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=20)
  args = parser.parse_args()

  shape = (args.rows, args.cols)
  g = jax.random.normal(jax.random.key(0), shape, jnp.float32)
  x = g * jnp.exp(2 * jax.random.normal(jax.random.key(1), shape))
  variants = make_variants(args.block_size)
  # Each variant's carried state (its donated inputs) and fixed inputs.
  state: dict[str, list[Any]] = dict(
    ema_f32=[jnp.zeros(shape)],
    ema_8bit=[qz.quantize_blockwise(jnp.zeros(shape), signed=True, block_size=args.block_size)],
    adam_f32=[jnp.zeros(shape), jnp.zeros(shape)],
    adam_8bit=[
      qz.quantize_blockwise(jnp.zeros(shape), signed=True, block_size=args.block_size),
      qz.quantize_blockwise(jnp.zeros(shape), signed=False, block_size=args.block_size),
    ],
    encode=[x],
    decode=[qz.quantize_blockwise(x, signed=True, block_size=args.block_size)],
  )
  extra = dict(ema_f32=[g], ema_8bit=[g], adam_f32=[g], adam_8bit=[g], encode=[], decode=[])

  def call(name):
    fn, n_carry = variants[name]
    out = fn(*state[name], *extra[name])
    jax.block_until_ready(out)
    if n_carry:
      out = out if isinstance(out, tuple) and n_carry > 1 else (out,)
      state[name] = list(out[:n_carry])

  wall = {name: [] for name in variants}
  cpu = {name: [] for name in variants}
  for name in variants:
    for _ in range(args.warmup):
      call(name)
  for _ in tqdm(range(args.repeats), desc="rounds"):
    for name in variants:
      t0, c0 = time.perf_counter(), time.process_time()
      call(name)
      wall[name].append(time.perf_counter() - t0)
      cpu[name].append(time.process_time() - c0)

  stats = {
    "median": {k: float(np.median(v)) for k, v in wall.items()},
    "min": {k: float(np.min(v)) for k, v in wall.items()},
    "cpu": {k: float(np.median(v)) for k, v in cpu.items()},
  }
  base = dict(
    ema_f32="ema_f32",
    ema_8bit="ema_f32",
    adam_f32="adam_f32",
    adam_8bit="adam_f32",
    encode="ema_f32",
    decode="ema_f32",
  )
  print(
    f"{shape[0]}x{shape[1]} = {np.prod(shape) / 1e6:.1f}M elements, "
    f"block_size {args.block_size}, {jax.devices()[0].device_kind}, "
    f"{platform.processor() or platform.machine()}, jax {jax.__version__}"
  )
  print("ms and ratio to the float32 update (ema_f32 for encode/decode)")
  print(f"{'variant':10s}" + "".join(f"{k + ' ms':>12s} {'ratio':>6s}" for k in stats))
  for name in variants:
    print(
      f"{name:10s}"
      + "".join(f"{v[name] * 1e3:12.2f} {v[name] / v[base[name]]:6.2f}" for v in stats.values())
    )


if __name__ == "__main__":
  main()
