"""DualOptim+ in your own Flax NNX training loop: unlearn one toy corpus, keep another.

A tiny ``dualoptim_jax.models.Llama`` (byte-level, 256 tokens) is trained with two
objectives: objective 0 *forgets* a corpus (gradient ascent on its next-token loss) and
objective 1 *retains* another (plain next-token loss), in the paper's alternating schedule
(1 forget step, then 2 retain steps). The optimizer keeps a shared base and one delta per
objective; ``nnx.Optimizer`` forwards ``objective=`` to it. The loop runs twice:

* a **static** objective (a Python int): one compiled step per objective;
* a **traced** objective (an int32 array): one compiled step for both.

Both print the forget loss rising and the retain loss falling. (The two runs differ after a
few steps: float32 noise is amplified where ``v_Δ/c + v̂_B`` nearly cancels; with
``careful_rounding=True`` they agree far longer.) About 30 s of CPU time:

  python examples/flax_lm_dualoptim.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import dualoptim_jax as dj
from dualoptim_jax.models.llama import Llama, LlamaConfig

FORGET_TEXT = "alice's phone number is 555 0199 and her pin is 4827. " * 8
RETAIN_TEXT = "the cat sat on the mat while the dog slept by the door. " * 8
SEQ, BATCH, STEPS, WARM_STEPS = 32, 8, 24, 30
FORGET, RETAIN = 0, 1


def windows(text: str, seed: int) -> jax.Array:
  """``BATCH`` random byte windows of ``SEQ + 1`` tokens (inputs and next-token targets)."""
  data = np.frombuffer(text.encode(), np.uint8).astype(np.int32)
  starts = np.random.default_rng(seed).integers(0, len(data) - SEQ - 1, BATCH)
  return jnp.asarray(np.stack([data[s : s + SEQ + 1] for s in starts]))


def next_token_loss(model: Llama, batch: jax.Array) -> jax.Array:
  logits = model.logits(model.hidden_states(batch[:, :-1])[0])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


def objective_loss(model: Llama, batch: jax.Array, objective) -> jax.Array:
  """Forget: ascend the corpus' loss (its negative); retain: descend it."""
  sign = jnp.where(objective == FORGET, -1.0, 1.0)
  return sign * next_token_loss(model, batch)


def train_step(model, optimizer, batch, objective):
  grads = nnx.grad(objective_loss)(model, batch, objective)
  optimizer.update(model, grads, objective=objective)  # forwarded to dualoptim_plus


# Static: `objective` is a Python int, so each objective gets its own compiled program.
static_step = nnx.jit(train_step, static_argnames="objective")
# Traced: `objective` is an int32 array, so one program serves both objectives.
traced_step = nnx.jit(train_step)


def run(mode: str) -> tuple[list[float], list[float]]:
  config = LlamaConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128)
  model = Llama(config, rngs=nnx.Rngs(0))
  # Warm up on both corpora with plain Adam, so there is something to forget.
  warm = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
  both = lambda m, f, r: next_token_loss(m, f) + next_token_loss(m, r)
  warm_step = nnx.jit(lambda m, o, f, r: o.update(m, nnx.grad(both)(m, f, r)))
  for i in range(WARM_STEPS):
    warm_step(model, warm, windows(FORGET_TEXT, i), windows(RETAIN_TEXT, 1000 + i))

  tx = dj.dualoptim_plus(1e-3, weight_decay=0.0, lr_scales=(0.5, 1.0))  # (forget, retain)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  schedule = dj.alternating(1, 2)
  evaluate = nnx.jit(next_token_loss)
  forget_eval, retain_eval = windows(FORGET_TEXT, 7), windows(RETAIN_TEXT, 8)
  forget_losses, retain_losses = [], []
  for step in range(STEPS + 1):
    forget_losses.append(float(evaluate(model, forget_eval)))
    retain_losses.append(float(evaluate(model, retain_eval)))
    if step == STEPS:
      break
    k = schedule(step)
    batch = windows(FORGET_TEXT if k == FORGET else RETAIN_TEXT, 100 + step)
    if mode == "static":
      static_step(model, optimizer, batch, objective=k)
    else:
      traced_step(model, optimizer, batch, jnp.int32(k))
  return forget_losses, retain_losses


def main() -> None:
  for mode in ("static", "traced"):
    forget, retain = run(mode)
    print(
      f"{mode:6s} objective: forget loss {forget[0]:.3f} -> {forget[-1]:.3f} (should rise), "
      f"retain loss {retain[0]:.3f} -> {retain[-1]:.3f} (should stay low)"
    )
    ok = forget[-1] > forget[0] and retain[-1] < forget[-1]
    print(f"{mode:6s} RESULT: {'as intended' if ok else 'NOT as intended'}")


if __name__ == "__main__":
  main()
