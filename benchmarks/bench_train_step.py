"""Full training step (forward, backward, update) of the package's Flax Llama per optimizer preset.

The model is ``LlamaConfig.small`` (the built-in experiment's: dim 128, 4 layers,
vocabulary 1024) on a batch of the built-in experiment's size (4 sequences of
256 tokens); the loss is the token-mean next-token NLL. The step is
``jax.jit(step, donate_argnums=(0, 1))`` on (params, optimizer state), as in
``dualoptim_jax.unlearn.trainer``. Presets are those of
``dualoptim_jax.unlearn.trainer.PRESETS`` that this build can make (``joint`` /
``alternate`` = optax AdamW driven jointly / with an objective-aware learning
rate, ``dualoptim``, ``dualoptim_plus``, 8-bit forms), plus ``optax.adamw`` as
the reference (ratio 1.00). Multi-objective presets run with a static objective
(one program per objective, as the trainer does; rounds alternate 0 / 1) and a
traced one. Every preset runs the same single loss, so differences are the
optimizer's alone (the real ``joint`` mode also evaluates two losses per step).

Variants run interleaved, round-robin; the table gives the median step time,
tokens/s and the ratio to ``optax.adamw`` compiled with the same options
(``--options default,region`` adds region-analysis copy insertion).

  python benchmarks/bench_train_step.py --out bench_train_step.json
  python benchmarks/bench_train_step.py --quick
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import Any

import common
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from tqdm import tqdm

from dualoptim_jax.models.llama import Llama, LlamaConfig
from dualoptim_jax.unlearn import trainer as trainer_lib


def presets(learning_rate: float) -> tuple[list[tuple[str, Callable, bool]], list[str]]:
  """(name, make, multi_objective) for the reference and each available preset."""
  out = [
    (
      "optax.adamw",
      lambda: optax.with_extra_args_support(
        optax.adamw(learning_rate, weight_decay=common.WEIGHT_DECAY)
      ),
      False,
    )
  ]
  notes = []
  for name, spec in trainer_lib.PRESETS.items():
    make = lambda name=name: trainer_lib.make_optimizer(
      name, learning_rate, weight_decay=common.WEIGHT_DECAY
    )
    out.append((name, make, spec.mode == "alternate"))
  return out, notes


@dataclasses.dataclass
class Variant:
  name: str
  objective: str
  options: str
  calls: list[Callable]
  extra: list[tuple]
  state: list[Any]  # [params, opt_state]
  times: list[float] = dataclasses.field(default_factory=list)

  def run(self, r: int, batch) -> float:
    i = r % len(self.calls)
    seconds, out = common.time_call(
      lambda: self.calls[i](self.state[0], self.state[1], batch, *self.extra[i])
    )
    self.state[0], self.state[1], _ = out
    return seconds


def make_step(
  graphdef, rest, tx, objective: str, k: int | None = None, options: str = "default"
) -> Callable:
  def loss_fn(params, ids):
    logits = nnx.merge(graphdef, params, rest)(ids[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

  def step(params, opt_state, ids, *traced_k):
    loss, grads = jax.value_and_grad(loss_fn)(params, ids)
    kwargs = common.objective_kwargs(objective, k, traced_k)
    updates, opt_state = tx.update(grads, opt_state, params, **kwargs)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1), compiler_options=common.COMPILER_OPTIONS[options])


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
  parser.add_argument("--vocab-size", type=int, default=1024)
  parser.add_argument("--batch-size", type=int, default=4)
  parser.add_argument("--seq-len", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=25, help="timed rounds (default 25)")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--objectives", default="static,traced")
  parser.add_argument(
    "--options",
    default="default",
    help="compiler option sets, comma-separated: default (as the trainer "
    "compiles today), region (region-analysis copy insertion)",
  )
  parser.add_argument(
    "--presets", default="", help="comma-separated subset (default: all; optax.adamw is always run)"
  )
  parser.add_argument(
    "--quick",
    action="store_true",
    help="smoke test: tiny model and batch, 3 rounds, optax.adamw and "
    "dualoptim_plus (static) unless --presets / --objectives say otherwise",
  )
  parser.add_argument("--out", default=None, help="write the results as JSON here")
  args = parser.parse_args(argv)
  if args.quick:
    args.vocab_size, args.batch_size, args.seq_len, args.repeats, args.warmup = 256, 2, 32, 3, 1
    args.presets = args.presets or "dualoptim_plus"
    if args.objectives == parser.get_default("objectives"):
      args.objectives = "static"
  config = (LlamaConfig.tiny if args.quick else LlamaConfig.small)(args.vocab_size)
  objectives = [o for o in args.objectives.split(",") if o]

  model = Llama(config, rngs=nnx.Rngs(0))
  graphdef, params0, rest = nnx.split(model, nnx.Param, ...)
  n_params = sum(x.size for x in jax.tree.leaves(params0))
  ids = jax.random.randint(
    jax.random.key(1), (args.batch_size, args.seq_len + 1), 0, args.vocab_size, jnp.int32
  )
  tokens = args.batch_size * args.seq_len
  ks = [jnp.asarray(k, jnp.int32) for k in (0, 1)]
  cases, notes = presets(1e-4)
  if args.presets:
    wanted = {p.strip() for p in args.presets.split(",")}
    unknown = wanted - {name for name, _, _ in cases}
    if unknown:
      raise SystemExit(f"unknown or unavailable preset(s) {sorted(unknown)}")
    cases = [c for c in cases if c[0] == "optax.adamw" or c[0] in wanted]

  options = [o for o in args.options.split(",") if o]
  for o in options:
    if o not in common.COMPILER_OPTIONS:
      raise SystemExit(f"unknown option set {o!r}; choose from {list(common.COMPILER_OPTIONS)}")
  variants = []
  for name, make, multi in cases:
    tx = make()
    params = jax.tree.map(jnp.copy, params0)
    state = [params, tx.init(params)]  # shared by this preset's variants
    for mode in objectives if multi else ["-"]:
      for opt in options:
        if mode == "static":
          calls = [make_step(graphdef, rest, tx, "static", k, opt) for k in (0, 1)]
          extra = [(), ()]
        elif mode == "traced":
          calls = [make_step(graphdef, rest, tx, "traced", None, opt)] * 2
          extra = [(ks[0],), (ks[1],)]
        else:
          calls, extra = [make_step(graphdef, rest, tx, "-", None, opt)], [()]
        variants.append(Variant(name, mode, opt, calls, extra, state))

  for v in variants:
    for r in range(max(args.warmup, len(v.calls))):  # compile every program
      v.run(r, ids)
  for r in tqdm(range(args.repeats), desc="train step", leave=False):
    start = r % len(variants)
    for v in variants[start:] + variants[:start]:
      v.times.append(v.run(r, ids))

  reference = {v.options: common.median(v.times) for v in variants if v.name == "optax.adamw"}
  rows = []
  for v in variants:
    t = common.median(v.times)
    rows.append(
      dict(
        preset=v.name,
        objective=v.objective,
        compiler_options=v.options,
        median_ms=1e3 * t,
        min_ms=1e3 * min(v.times),
        tokens_per_s=tokens / t,
        ratio_to_adamw=t / reference[v.options],
        calls=len(v.times),
      )
    )

  for note in notes:
    print(f"note: {note}")
  print(
    f"model: {config} ({n_params / 1e6:.2f}M parameters), batch {args.batch_size} x "
    f"{args.seq_len} tokens"
  )
  common.print_table(
    rows,
    [
      ("preset", "preset", ""),
      ("objective", "objective", ""),
      ("compiler_options", "options", ""),
      ("median_ms", "ms", ".1f"),
      ("tokens_per_s", "tokens/s", ".0f"),
      ("ratio_to_adamw", "x adamw", ".3f"),
    ],
  )
  payload = dict(
    benchmark="train_step",
    machine=common.machine_info(),
    repeats=args.repeats,
    notes=notes,
    model=repr(config),
    params=n_params,
    batch_size=args.batch_size,
    seq_len=args.seq_len,
    results=rows,
  )
  common.write_json(args.out, payload)
  return payload


if __name__ == "__main__":
  main()
