"""Trajectories of every DualOptim+ instance on two conflicting quadratics.

f_k(x) = 1/2 (x - c_k)^T H_k (x - c_k), k = 0, 1, in the plane, alternated 1/1
and 1/5 (the latter with lr_scales (5, 1), so one cycle weighs both objectives
equally). Writes docs/trajectories.png and prints where each optimizer ends.

What it shows: EMA-SGD (plain or Nesterov) goes to the optimum of f_0 + f_1.
The adaptive ones (Adam form, DualOptim, Lion, RMSprop, Adafactor) normalise
each objective's step by that objective's own statistics, so with exact
gradients each step is close to sign-like and the cycle's steps cancel
wherever the two gradients have opposite signs in every coordinate (the shaded
region): they come to rest inside it, where their path leads them, not at the
optimum of the sum.

Run: python examples/quadratic_trajectories.py [--steps 1500] [--out PATH]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import dualoptim_jax as dj  # noqa: E402

H = np.array([[[2.0, 0.6], [0.6, 1.0]], [[1.0, -0.3], [-0.3, 2.5]]])
C = np.array([[1.5, 1.0], [-1.0, -1.2]])
X0 = np.array([-2.5, 2.5])
X_STAR = np.linalg.solve(H[0] + H[1], H[0] @ C[0] + H[1] @ C[1])


def optimizers(steps: int, lr_scales):
  """name -> transform; peak learning rates picked per family, cosine decay."""
  lr = lambda peak: optax.cosine_decay_schedule(peak, steps, alpha=1e-3)
  kw = dict(lr_scales=lr_scales)
  return {
    "SGD (EMA)": dj.dualoptim_plus_sgd(lr(0.05), **kw),
    "SGD Nesterov": dj.dualoptim_plus_sgd(lr(0.05), nesterov=True, **kw),
    "DualOptim+ (Adam)": dj.dualoptim_plus(lr(0.05), **kw),
    "DualOptim (Adam)": dj.dualoptim(lr(0.05), **kw),
    "Lion": dj.dualoptim_plus_lion(lr(0.02), **kw),
    "RMSprop": dj.dualoptim_plus_rmsprop(lr(0.05), **kw),
    "Adafactor": dj.dualoptim_plus_adafactor(lr(0.05), multiply_by_parameter_scale=False, **kw),
  }


def trajectory(tx, schedule, steps: int) -> np.ndarray:
  h, c = jnp.asarray(H, jnp.float32), jnp.asarray(C, jnp.float32)

  def step(carry, i):
    x, state = carry
    k = schedule(i)
    u, state = tx.update(h[k] @ (x - c[k]), state, x, objective=k)
    x = optax.apply_updates(x, u)
    return (x, state), x

  x = jnp.asarray(X0, jnp.float32)
  run = jax.jit(lambda x, s: jax.lax.scan(step, (x, s), jnp.arange(steps))[1])
  return np.concatenate([X0[None], np.asarray(run(x, tx.init(x)))])


def pareto_curve(num: int = 200) -> np.ndarray:
  """argmin lam f_0 + (1 - lam) f_1 for lam in [0, 1]."""
  out = []
  for lam in np.linspace(0, 1, num):
    a = lam * H[0] + (1 - lam) * H[1]
    out.append(np.linalg.solve(a, lam * H[0] @ C[0] + (1 - lam) * H[1] @ C[1]))
  return np.array(out)


def main() -> None:
  parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
  parser.add_argument("--steps", type=int, default=1500)
  parser.add_argument(
    "--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "trajectories.png"
  )
  args = parser.parse_args()

  xs, ys = np.meshgrid(np.linspace(-3, 3, 241), np.linspace(-2.5, 3, 221))
  grid = np.stack([xs, ys], -1)
  g0 = np.einsum("ij,...j->...i", H[0], grid - C[0])
  g1 = np.einsum("ij,...j->...i", H[1], grid - C[1])
  total = 0.5 * (np.einsum("...i,...i", grid - C[0], g0) + np.einsum("...i,...i", grid - C[1], g1))
  balanced = np.all(g0 * g1 <= 0, axis=-1)

  fig, axes = plt.subplots(1, 2, figsize=(13, 5.6), sharey=True)
  for ax, (ff, fr) in zip(axes, [(1, 1), (1, 5)]):
    scales = None if ff == fr else (fr / ff, 1.0)
    ax.contour(xs, ys, total, levels=18, colors="0.8", linewidths=0.6)
    ax.contourf(xs, ys, balanced, levels=[0.5, 1.5], colors=["#e8e0f5"])
    curve = pareto_curve()
    ax.plot(curve[:, 0], curve[:, 1], color="0.4", lw=1, ls="--", label="Pareto set")
    print(
      f"schedule {ff}/{fr}, lr_scales {scales}: distance of the end point to the optimum of f0 + f1"
    )
    for name, tx in optimizers(args.steps, scales).items():
      path = trajectory(tx, dj.alternating(ff, fr), args.steps)
      ax.plot(path[:, 0], path[:, 1], lw=1.2, label=name)
      ax.plot(*path[-1], "o", ms=3, color=ax.lines[-1].get_color())
      print(f"  {name:18s} {np.linalg.norm(path[-1] - X_STAR):.4f}")
    ax.plot(*C[0], "k^", ms=8, label="min f_0 (forget)")
    ax.plot(*C[1], "kv", ms=8, label="min f_1 (retain)")
    ax.plot(*X_STAR, "k*", ms=12, label="min f_0 + f_1")
    ax.set_title(f"alternating {ff}/{fr}" + (f", lr_scales {scales}" if scales else ""))
    ax.set_xlabel("x_1")
    ax.set_xlim(xs.min(), xs.max())
    ax.set_ylim(ys.min(), ys.max())
    ax.set_aspect("equal")
  axes[0].set_ylabel("x_2")
  axes[1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
  fig.suptitle(
    "DualOptim+ instances on two conflicting quadratics "
    "(shaded: gradients opposed in every coordinate)"
  )
  fig.tight_layout()
  args.out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(args.out, dpi=120)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
