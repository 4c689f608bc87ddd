"""Two-objective toy unlearning: Joint, Alternate, DualOptim and DualOptim+ side by side.

A small MLP classifier is trained on all data, then asked to *forget* one class
(forget objective: cross-entropy to the uniform distribution on that class, i.e.
maximum entropy) while *keeping* the others (retain objective: cross-entropy).
Each optimizer takes the same number of steps (Joint evaluates both objectives
at every step, the others one); the table shows
forget accuracy (lower is better), retain accuracy (higher is better) and the
final losses.

  python examples/toy_comparison.py [--steps 300] [--seed 0]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import dualoptim_jax as dj


def make_data(seed: int, n: int = 1200, classes: int = 4, dim: int = 8):
  rng = np.random.default_rng(seed)
  centers = rng.normal(scale=2.5, size=(classes, dim))
  y = rng.integers(0, classes, size=n)
  x = centers[y] + rng.normal(size=(n, dim))
  return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32)


def init_mlp(key, dim=8, hidden=32, classes=4):
  k1, k2 = jax.random.split(key)
  return {
    "w1": jax.random.normal(k1, (dim, hidden)) / np.sqrt(dim),
    "b1": jnp.zeros(hidden),
    "w2": jax.random.normal(k2, (hidden, classes)) / np.sqrt(hidden),
    "b2": jnp.zeros(classes),
  }


def logits_fn(p, x):
  return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def retain_loss(p, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits_fn(p, x), y).mean()


def forget_loss(p, x):
  logp = jax.nn.log_softmax(logits_fn(p, x))
  return -logp.mean()  # cross-entropy to uniform: maximum-entropy forgetting


def accuracy(p, x, y):
  return float((logits_fn(p, x).argmax(-1) == y).mean())


def pretrain(params, x, y, steps=400):
  tx = optax.adam(1e-2)
  state = tx.init(params)

  @jax.jit
  def step(p, s):
    g = jax.grad(retain_loss)(p, x, y)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  for _ in range(steps):
    params, state = step(params, state)
  return params


def unlearn(name, params, xf, xr, yr, steps, lr):
  """Runs one optimizer setting of the paper (1 forget step, then 5 retain)."""
  schedule = dj.alternating(1, 5)
  if name == "joint":
    tx = optax.adamw(lr, b1=0.9, b2=0.95, weight_decay=0.01)
  elif name == "alternate":
    tx = optax.adamw(lr, b1=0.9, b2=0.95, weight_decay=0.01)
  elif name == "dualoptim":
    tx = dj.dualoptim(lr, weight_decay=0.01)
  elif name == "dualoptim_plus":
    tx = dj.dualoptim_plus(lr, weight_decay=0.01)
  else:
    raise ValueError(f"unknown optimizer {name!r}")
  state = tx.init(params)
  multi = name.startswith("dualoptim")

  @jax.jit
  def joint_step(p, s):
    g = jax.grad(lambda q: forget_loss(q, xf) + retain_loss(q, xr, yr))(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  def make_step(k):
    def loss(q):
      return forget_loss(q, xf) if k == 0 else retain_loss(q, xr, yr)

    @jax.jit
    def step(p, s):
      g = jax.grad(loss)(p)
      if multi:
        u, s = tx.update(g, s, p, objective=k)
      else:
        u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    return step

  steps_by_objective = (make_step(0), make_step(1))
  for n in range(steps):
    if name == "joint":
      params, state = joint_step(params, state)
    else:
      params, state = steps_by_objective[schedule(n)](params, state)
  return params


def main(argv=None):
  parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--lr", type=float, default=3e-3)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  x, y = make_data(args.seed)
  forget = y == 0
  xf, xr, yr = x[forget], x[~forget], y[~forget]
  params = pretrain(init_mlp(jax.random.PRNGKey(args.seed)), x, y)
  rows = [("initial", params)]
  for name in ("joint", "alternate", "dualoptim", "dualoptim_plus"):
    rows.append((name, unlearn(name, params, xf, xr, yr, args.steps, args.lr)))

  print(
    f"{'optimizer':<16}{'forget acc':>12}{'retain acc':>12}{'forget loss':>13}{'retain loss':>13}"
  )
  for name, p in rows:
    print(
      f"{name:<16}{accuracy(p, xf, y[forget]):>12.3f}{accuracy(p, xr, yr):>12.3f}"
      f"{float(forget_loss(p, xf)):>13.4f}{float(retain_loss(p, xr, yr)):>13.4f}"
    )
  print(
    "forget loss: cross-entropy to uniform (minimum log 4 = 1.3863); "
    "forget acc: lower is better; retain acc: higher is better."
  )
  return rows


if __name__ == "__main__":
  main()
