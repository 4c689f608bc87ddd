"""``dualoptim-unlearn`` (also ``python -m dualoptim_jax.unlearn``): the paper's experiment end to end.

1. Data: the built-in synthetic TOFU (default), or TOFU / real-world JSON Lines from ``--data-dir``.
2. Tokenizer: a byte-level BPE trained on the data's text (cached).
3. The "TOFU-tuned" model: a Llama of ``--model-size`` trained from scratch on every QA pair
   (forget + retain, and the real-authors / world-facts sets, which stand in for the knowledge
   a pretrained model would bring), cached as a checkpoint keyed by everything that shapes it.
   With ``--model`` (``smollm2``, a ``.gguf`` file or a HF safetensors directory) the model and
   tokenizer are the checkpoint's instead, fine-tuned on forget + retain of a TOFU subset, with
   CPU-sized defaults (:mod:`dualoptim_jax.unlearn.pretrained`, ``docs/smollm2.md``).
4. The retain-only model: the same recipe without the forget set (for forget quality), cached.
5. Unlearning with ``--loss`` under every preset in ``--presets`` and every seed in ``--seeds``,
   each starting from the TOFU-tuned model.
6. Evaluation (:func:`dualoptim_jax.unlearn.metrics.evaluate`) and the report
   (:func:`dualoptim_jax.unlearn.report.write_report`): a Table-1-style comparison on stdout and
   ``results.json``, ``results.md`` and ``results.png`` in ``--out``.

Seeds vary the unlearning run (batch order and refusal answers), not the tuned model. ``--steps``
counts forget updates: a joint run makes ``steps`` updates, an alternating run
``ceil(steps / F_f)`` cycles of ``F_f + F_r`` updates, so both see the same forget batches, as in
the paper's epoch-based budget.

Scale-out and resume: ``--mesh data=1,fsdp=8`` trains FSDP-sharded over the devices
(:mod:`dualoptim_jax.sharding`); ``--checkpoint-dir DIR`` checkpoints each unlearning run under
``DIR/<preset>/seed<k>`` every ``--checkpoint-every`` updates and at its end, and ``--resume``
continues every run from its latest checkpoint (:mod:`dualoptim_jax.unlearn.checkpoint`).

Several processes (hosts): ``--coordinator HOST:PORT --num-processes N --process-id I`` join JAX's
multi-process runtime (:mod:`dualoptim_jax.unlearn.distributed`; without them SLURM and TPU pods
are detected, and ``python -m dualoptim_jax.launch -n N -- dualoptim-unlearn ...`` starts N local
processes); ``--mesh`` then spans every process's devices. Every process draws the same batches
and puts only its rows on its devices, so the result does not depend on the process count;
process 0 alone prints progress and writes caches and the report; checkpoints are written by all.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dualoptim_jax import sharding
from dualoptim_jax.models.llama import Llama, LlamaConfig
from dualoptim_jax.models.tokenizer import Tokenizer
from dualoptim_jax.unlearn import data as D
from dualoptim_jax.unlearn import distributed, metrics, pretrained, report
from dualoptim_jax.unlearn.checkpoint import (
  CheckpointCorruptError,
  CheckpointMismatchError,
  checkpointed_unlearn,
)
from dualoptim_jax.unlearn.losses import make_objective
from dualoptim_jax.unlearn.trainer import PRESETS, finetune, preset_available

__all__ = ["RunConfig", "build_parser", "parse_args", "run", "main"]

MODEL_SIZES = {"tiny": LlamaConfig.tiny, "small": LlamaConfig.small}
SPLITS = (*D.TOFU_SPLITS, "real_world")
_CACHE_VERSION = "1"


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Every setting of a run (the command-line flags; see ``dualoptim-unlearn --help``)."""

  data_dir: str | None = None
  split: str = "forget01"
  task_id: int | None = None
  loss: str = "IDK+AP"
  presets: tuple[str, ...] = tuple(PRESETS)
  seeds: tuple[int, ...] = (0, 1, 2)
  steps: int | None = None
  epochs: float = 5.0
  batch_size: int = 4
  lr: float = 3e-4
  forget_lr_scale: float = 1.0
  retain_lr_scale: float = 1.0
  forget_steps: int = 1
  retain_steps: int = 5
  forget_coef: float = 1.0
  retain_coef: float = 1.0
  beta: float = 0.1
  weight_decay: float = 0.01
  model: str | None = None
  model_layers: int | None = None
  forget_items: int | None = None
  retain_items: int | None = None
  finetune_epochs: float | None = None
  model_size: str = "small"
  vocab_size: int | None = None
  max_len: int = 256
  finetune_steps: int = 400
  finetune_lr: float = 2e-3
  finetune_batch_size: int = 16
  model_seed: int = 0
  eval_items: int = 300
  max_new_tokens: int = 48
  cache_dir: str | None = None
  out: str = "results"
  progress: bool = True
  mesh: str | None = None
  checkpoint_dir: str | None = None
  checkpoint_every: int = 50
  keep_checkpoints: int = 3
  resume: bool = False
  coordinator: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  distributed_timeout: int = distributed.DEFAULT_TIMEOUT


def build_parser() -> argparse.ArgumentParser:
  d = RunConfig()
  p = argparse.ArgumentParser(
    prog="dualoptim-unlearn",
    description="Fine-tune a small Llama on TOFU-style data, unlearn the forget set with each optimizer "
    "preset, evaluate with the TOFU / closer-look metrics and write results.json, results.md "
    "and results.png. With no flags: the built-in synthetic data.",
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  g = p.add_argument_group("data")
  g.add_argument(
    "--data-dir",
    default=d.data_dir,
    help="folder with tofu/ and real_world/ JSON Lines (or one of them); default: built-in data",
  )
  g.add_argument(
    "--split",
    default=d.split,
    choices=SPLITS,
    help="TOFU split, or real_world (ignored for built-in data)",
  )
  g.add_argument(
    "--task-id",
    type=int,
    default=d.task_id,
    help="forget task of the split (default 1 for TOFU, all targets for real_world)",
  )
  g = p.add_argument_group("unlearning")
  g.add_argument(
    "--loss",
    default=d.loss,
    help="FORGET+RETAIN, e.g. IDK+AP, ME+GD, NPO+KL, GA+GD, SimNPO+GD, DPO+GD",
  )
  g.add_argument(
    "--presets", default=",".join(d.presets), help=f"comma list of {', '.join(PRESETS)}"
  )
  g.add_argument(
    "--seeds", default=",".join(map(str, d.seeds)), help="comma list of unlearning seeds"
  )
  g.add_argument(
    "--steps",
    type=int,
    default=d.steps,
    help="forget updates per run (default: --epochs over the forget set)",
  )
  g.add_argument(
    "--epochs", type=float, default=d.epochs, help="forget-set epochs when --steps is not given"
  )
  g.add_argument("--batch-size", type=int, default=d.batch_size)
  g.add_argument("--lr", type=float, default=d.lr, help="unlearning learning rate")
  g.add_argument(
    "--forget-lr-scale",
    type=float,
    default=d.forget_lr_scale,
    help="forget lr = lr * this (alternating presets)",
  )
  g.add_argument(
    "--retain-lr-scale",
    type=float,
    default=d.retain_lr_scale,
    help="retain lr = lr * this (alternating presets)",
  )
  g.add_argument(
    "--forget-steps", type=int, default=d.forget_steps, help="F_f: consecutive forget updates"
  )
  g.add_argument(
    "--retain-steps", type=int, default=d.retain_steps, help="F_r: consecutive retain updates"
  )
  g.add_argument("--forget-coef", type=float, default=d.forget_coef)
  g.add_argument("--retain-coef", type=float, default=d.retain_coef)
  g.add_argument("--beta", type=float, default=d.beta, help="beta of NPO / SimNPO / DPO / AP")
  g.add_argument("--weight-decay", type=float, default=d.weight_decay)
  g = p.add_argument_group("model")
  g.add_argument(
    "--model",
    default=d.model,
    help="start from a pretrained LM: 'smollm2', a .gguf file or a HF safetensors directory "
    "(then the defaults change to a CPU-sized run: see dualoptim_jax.unlearn.pretrained)",
  )
  g.add_argument(
    "--model-layers",
    type=int,
    default=d.model_layers,
    help="keep only the first N blocks of --model (smoke tests)",
  )
  g.add_argument(
    "--forget-items", type=int, default=d.forget_items, help="first N forget items (0: all)"
  )
  g.add_argument(
    "--retain-items",
    type=int,
    default=d.retain_items,
    help="first N evaluated retain items (0: all)",
  )
  g.add_argument(
    "--finetune-epochs",
    type=float,
    default=d.finetune_epochs,
    help="fine-tuning epochs (overrides --finetune-steps)",
  )
  g.add_argument("--model-size", default=d.model_size, choices=sorted(MODEL_SIZES))
  g.add_argument(
    "--vocab-size",
    type=int,
    default=d.vocab_size,
    help="BPE vocabulary (default 1024 built-in, 4096 files)",
  )
  g.add_argument(
    "--max-len", type=int, default=d.max_len, help="longest tokenised question + answer"
  )
  g.add_argument("--finetune-steps", type=int, default=d.finetune_steps)
  g.add_argument("--finetune-lr", type=float, default=d.finetune_lr)
  g.add_argument("--finetune-batch-size", type=int, default=d.finetune_batch_size)
  g.add_argument("--model-seed", type=int, default=d.model_seed)
  g = p.add_argument_group("evaluation and output")
  g.add_argument(
    "--eval-items", type=int, default=d.eval_items, help="items per evaluation split (TOFU: 300)"
  )
  g.add_argument(
    "--max-new-tokens", type=int, default=d.max_new_tokens, help="greedy answer length for ROUGE"
  )
  g.add_argument(
    "--cache-dir",
    default=d.cache_dir,
    help="tokenizer and model cache (default: $XDG_CACHE_HOME/dualoptim_jax)",
  )
  g.add_argument("--out", default=d.out, help="where results.json, results.md and results.png go")
  g.add_argument("--no-progress", action="store_true", help="hide progress bars")
  g = p.add_argument_group("devices and checkpoints")
  g.add_argument(
    "--mesh",
    default=d.mesh,
    help="train FSDP-sharded on a device mesh, e.g. data=1,fsdp=8 or data=2,fsdp=4 (an axis left "
    "out or -1 takes the remaining devices); default: one device, no sharding",
  )
  g.add_argument(
    "--checkpoint-dir",
    default=d.checkpoint_dir,
    help="checkpoint each unlearning run under DIR/<preset>/seed<k> (orbax)",
  )
  g.add_argument(
    "--checkpoint-every",
    type=int,
    default=d.checkpoint_every,
    help="updates between checkpoints (one is always written at the end of a run)",
  )
  g.add_argument(
    "--keep-checkpoints",
    type=int,
    default=d.keep_checkpoints,
    help="latest checkpoints kept per run",
  )
  g.add_argument(
    "--resume",
    action="store_true",
    help="continue each run from its latest checkpoint in --checkpoint-dir (finished runs are "
    "restored, not rerun)",
  )
  g = p.add_argument_group("processes (JAX multi-process runtime)")
  g.add_argument(
    "--coordinator",
    default=d.coordinator,
    help="HOST:PORT of process 0's coordination service; with --num-processes and --process-id "
    "(default: detect SLURM / TPU pods / the local launcher, else one process)",
  )
  g.add_argument("--num-processes", type=int, default=d.num_processes)
  g.add_argument("--process-id", type=int, default=d.process_id)
  g.add_argument(
    "--distributed-timeout",
    type=int,
    default=d.distributed_timeout,
    help="seconds to wait for the other processes to join; a process silent this long is "
    "declared dead and the job stops",
  )
  return p


def _int_list(text: str, flag: str) -> tuple[int, ...]:
  try:
    values = tuple(int(v) for v in text.split(",") if v.strip())
  except ValueError:
    raise SystemExit(f"{flag} must be a comma list of integers, got {text!r}") from None
  if not values:
    raise SystemExit(f"{flag} must not be empty")
  return values


def parse_args(argv: Sequence[str] | None = None) -> RunConfig:
  """Parses and validates the flags into a :class:`RunConfig`."""
  parser = build_parser()
  a = parser.parse_args(argv)
  if a.model is not None:  # a pretrained model: CPU-sized defaults for the flags not given
    parser.set_defaults(**pretrained.DEFAULTS)
    a = parser.parse_args(argv)
  presets = tuple(p.strip() for p in a.presets.split(",") if p.strip())
  unknown = [p for p in presets if p not in PRESETS]
  if unknown or not presets:
    parser.error(f"--presets: unknown {unknown}; choose from {', '.join(PRESETS)}")
  try:
    make_objective(a.loss, a.forget_coef, a.retain_coef, a.beta)
  except ValueError as e:
    parser.error(f"--loss / coefficients: {e}")
  for flag, value, low in (
    ("--batch-size", a.batch_size, 1),
    ("--forget-steps", a.forget_steps, 1),
    ("--retain-steps", a.retain_steps, 1),
    ("--finetune-steps", a.finetune_steps, 0),
    ("--finetune-batch-size", a.finetune_batch_size, 1),
    ("--eval-items", a.eval_items, 1),
    ("--max-new-tokens", a.max_new_tokens, 1),
    ("--max-len", a.max_len, 8),
    ("--checkpoint-every", a.checkpoint_every, 1),
    ("--keep-checkpoints", a.keep_checkpoints, 1),
    ("--distributed-timeout", a.distributed_timeout, 1),
  ):
    if value < low:
      parser.error(f"{flag} must be >= {low}, got {value}")
  for flag, value in (
    ("--model-layers", a.model_layers),
    ("--forget-items", a.forget_items),
    ("--retain-items", a.retain_items),
  ):
    if value is not None and value < (1 if flag == "--model-layers" else 0):
      parser.error(f"{flag} must be >= {1 if flag == '--model-layers' else 0}, got {value}")
  if a.finetune_epochs is not None and not a.finetune_epochs > 0:
    parser.error(f"--finetune-epochs must be > 0, got {a.finetune_epochs}")
  if a.mesh is not None:
    try:
      sharding.parse_mesh_spec(a.mesh, jax.device_count())
    except ValueError as e:
      parser.error(f"--mesh: {e}")
  if a.resume and a.checkpoint_dir is None:
    parser.error("--resume needs --checkpoint-dir (where the runs' checkpoints are)")
  if a.steps is not None and a.steps < 1:
    parser.error(f"--steps must be >= 1, got {a.steps}")
  if not a.epochs > 0:
    parser.error(f"--epochs must be > 0, got {a.epochs}")
  for flag, value in (("--lr", a.lr), ("--finetune-lr", a.finetune_lr)):
    if not (math.isfinite(value) and value > 0):
      parser.error(f"{flag} must be > 0, got {value}")
  values = {f.name: getattr(a, f.name) for f in dataclasses.fields(RunConfig) if hasattr(a, f.name)}
  values.update(presets=presets, seeds=_int_list(a.seeds, "--seeds"), progress=not a.no_progress)
  return RunConfig(**values)


# ------------------------------------------------------------------------------------------------
# Pipeline pieces.


def load_data(cfg: RunConfig) -> D.UnlearningData:
  if cfg.data_dir is None:
    return D.synthetic_tofu()
  if cfg.split == "real_world":
    return D.load_real_world(cfg.data_dir, task_id=cfg.task_id)
  return D.load_tofu(cfg.data_dir, cfg.split, 1 if cfg.task_id is None else cfg.task_id)


def corpus(data: D.UnlearningData) -> list[str]:
  """Every text of the data set (questions, all answers, refusals): the tokenizer's training set."""
  texts = list(data.idk_answers)
  for items in (
    data.forget,
    data.retain,
    data.forget_eval,
    data.retain_eval,
    data.real_authors,
    data.world_facts,
  ):
    for it in items:
      texts += [it.question, it.answer, *it.perturbed_answers]
      texts += [t for t in (it.paraphrased_answer, it.paraphrased_question) if t]
  return texts


def _cache_dir(cfg: RunConfig) -> Path:
  if cfg.cache_dir is not None:
    return Path(cfg.cache_dir).expanduser()
  base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
  return Path(base) / "dualoptim_jax"


def _digest(*parts: Any) -> str:
  h = hashlib.sha256()
  for part in parts:
    h.update(json.dumps(part, sort_keys=True, default=str).encode())
  return h.hexdigest()[:20]


def save_params(model: nnx.Module, path: Path) -> None:
  """Writes the module's ``nnx.Param`` arrays to an ``.npz`` (atomically)."""
  leaves = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
  # Every process gathers (a collective), process 0 writes.
  arrays = {jax.tree_util.keystr(k): sharding.host_value(v) for k, v in leaves}
  if not distributed.is_primary():
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp.npz")
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def load_params(model: nnx.Module, path: Path) -> None:
  """Loads :func:`save_params` output into ``model`` in place; names and shapes must match."""
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
  with np.load(path) as f:
    names = [jax.tree_util.keystr(k) for k, _ in leaves]
    if sorted(names) != sorted(f.files):
      raise ValueError(f"{path}: parameter names do not match the model")
    new = []
    for name, (_, old) in zip(names, leaves):
      if f[name].shape != old.shape:
        raise ValueError(f"{path}: {name} has shape {f[name].shape}, the model {old.shape}")
      new.append(jnp.asarray(f[name], old.dtype))
  nnx.update(model, jax.tree_util.tree_unflatten(treedef, new))


def tuned_model(
  kind: str,
  items: Sequence[D.QAItem],
  tok: Tokenizer,
  cfg: RunConfig,
  cache: Path,
  log=print,
  *,
  init: nnx.Module | None = None,
  init_key: str | None = None,
  mesh: Any = None,
) -> nnx.Module:
  """A Llama fine-tuned on ``items`` (answer-token NLL), loaded from cache if there.

  From scratch (a ``--model-size`` Llama), or from ``init`` (a pretrained model, left unchanged)
  whose weights ``init_key`` names in the cache key.
  """
  pairs = [(it.question, it.answer) for it in items]
  steps = (
    cfg.finetune_steps
    if cfg.finetune_epochs is None
    else pretrained.finetune_steps(len(pairs), cfg.finetune_epochs, cfg.finetune_batch_size)
  )
  if init is None:
    model_cfg = MODEL_SIZES[cfg.model_size](tok.vocab_size)
    init_key, name = dataclasses.asdict(model_cfg), cfg.model_size
    model = Llama(model_cfg, rngs=nnx.Rngs(cfg.model_seed))
  else:
    model, name = init, "pretrained"
  key = _digest(
    _CACHE_VERSION,
    kind,
    pairs,
    tok.hf_tokenizer.to_str(),
    init_key,
    steps,
    cfg.finetune_lr,
    cfg.finetune_batch_size,
    cfg.model_seed,
    cfg.max_len,
  )
  path = cache / "models" / f"{kind}-{name}-{key}.npz"
  if distributed.all_true(path.is_file()):  # every process loads, or every process trains
    if (
      init is not None
    ):  # load into a copy with its own arrays: the pretrained model stays as it is
      graphdef, state = nnx.split(model)
      model = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
    load_params(model, path)
    log(f"[{kind}] loaded cached model {path}")
    return model
  arrays = D.encode_pairs(tok, pairs, cfg.max_len)
  warmup = min(50, max(steps // 10, 1))
  schedule = optax.warmup_cosine_decay_schedule(
    0.0, cfg.finetune_lr, warmup, max(steps, warmup + 1), cfg.finetune_lr * 0.1
  )
  t0 = time.perf_counter()
  result = finetune(
    model,
    D.BatchIterator(arrays, cfg.finetune_batch_size, seed=cfg.model_seed),
    optax.adamw(schedule, weight_decay=0.01),
    steps,
    progress=cfg.progress,
    desc=f"fine-tune {kind}",
    mesh=mesh,
  )
  tail = result.losses[-10:].mean() if len(result.losses) else float("nan")
  log(
    f"[{kind}] fine-tuned {steps} steps on {len(items)} QA in {time.perf_counter() - t0:.0f}s "
    f"(final NLL {tail:.3f}); cached at {path}"
  )
  save_params(result.model, path)
  return result.model


def num_updates(preset: str, forget_updates: int, cfg: RunConfig) -> int:
  """Optimizer updates of a run that makes ``forget_updates`` forget updates."""
  if PRESETS[preset].mode == "joint":
    return forget_updates
  return math.ceil(forget_updates / cfg.forget_steps) * (cfg.forget_steps + cfg.retain_steps)


def _run_fingerprint(
  cfg: RunConfig, data: D.UnlearningData, tok: Tokenizer, seed: int
) -> dict[str, Any]:
  """What a run's checkpoints are tied to besides model, optimizer, loss and schedule."""
  start = {
    k: getattr(cfg, k)
    for k in (
      "model",
      "model_size",
      "model_layers",
      "finetune_steps",
      "finetune_epochs",
      "finetune_lr",
      "finetune_batch_size",
      "model_seed",
      "max_len",
    )
  }
  return {
    "seed": seed,
    "batch_size": cfg.batch_size,
    "data": data.name,
    "tokenizer_vocab": tok.vocab_size,
    "start": start,
  }


# ------------------------------------------------------------------------------------------------
# The job.


def run(cfg: RunConfig, log=print) -> dict[str, Any]:
  """Runs the experiment of ``cfg`` and writes the report; returns the results.json document.

  In a multi-process job every process runs this; process 0 alone logs, shows progress and
  writes the report.
  """
  t_start = time.perf_counter()
  if not distributed.is_primary():
    cfg = dataclasses.replace(cfg, progress=False)
    log = lambda *args, **kwargs: None  # noqa: E731
  data = load_data(cfg)
  log(data.summary())
  cache = _cache_dir(cfg)
  mesh = None if cfg.mesh is None else sharding.make_mesh(cfg.mesh)
  if mesh is not None:
    log(f"mesh: {dict(mesh.shape)} over {mesh.size} devices (FSDP)")
  timings: dict[str, float] = {}
  t0 = time.perf_counter()
  if cfg.model is None:
    vocab = cfg.vocab_size or (1024 if cfg.data_dir is None else 4096)
    tok = Tokenizer.train(corpus(data), vocab_size=vocab, cache_path=cache / "tokenizers")
    log(
      f"tokenizer: {tok.vocab_size} tokens; model: Llama {cfg.model_size}; devices: {jax.devices()}"
    )
    general = data.real_authors + data.world_facts
    base = tuned_model("full", data.forget + data.retain + general, tok, cfg, cache, log, mesh=mesh)
    retain_only = tuned_model("retain", data.retain + general, tok, cfg, cache, log, mesh=mesh)
  else:  # a pretrained LM brings its general knowledge: tune on forget + retain only
    data = pretrained.subset(data, cfg.forget_items, cfg.retain_items)
    log(data.summary())
    start, tok, start_key = pretrained.load_model(cfg.model, n_layers=cfg.model_layers)
    log(pretrained.describe(start, cfg.model, start_key) + f"; devices: {jax.devices()}")
    base = tuned_model(
      "full",
      data.forget + data.retain,
      tok,
      cfg,
      cache,
      log,
      init=start,
      init_key=start_key,
      mesh=mesh,
    )
    retain_only = tuned_model(
      "retain", data.retain, tok, cfg, cache, log, init=start, init_key=start_key, mesh=mesh
    )
    del start
  timings["models_s"] = time.perf_counter() - t0

  def evaluate(model, retain_only_ratios=None):
    return metrics.evaluate(
      model,
      tok,
      data,
      retain_only_truth_ratios=retain_only_ratios,
      max_new_tokens=cfg.max_new_tokens,
      max_len=cfg.max_len,
      max_items=cfg.eval_items,
      progress=cfg.progress,
    )

  t0 = time.perf_counter()
  reference = evaluate(retain_only)
  ratios = np.asarray(reference["per_item"]["forget"]["truth_ratio"])
  results: dict[str, list[dict[str, Any]]] = {
    "Initial": [evaluate(base, ratios)],
    "Retain-only": [evaluate(retain_only, ratios)],
  }
  timings["reference_eval_s"] = time.perf_counter() - t0

  objective = make_objective(cfg.loss, cfg.forget_coef, cfg.retain_coef, cfg.beta)
  forget_updates = cfg.steps or max(1, math.ceil(cfg.epochs * len(data.forget) / cfg.batch_size))
  presets = [p for p in cfg.presets if preset_available(p)]
  skipped = [p for p in cfg.presets if p not in presets]
  for p in skipped:
    log(f"[{p}] skipped: this build of dualoptim_jax cannot construct it yet (8-bit states)")
  if not presets:
    raise SystemExit("none of the requested presets can be built; see the messages above")

  histories: dict[str, list[dict[str, Any]]] = {}
  for preset in presets:
    results[preset], histories[preset] = [], []
    t0 = time.perf_counter()
    for seed in cfg.seeds:
      forget = D.tokenize_unlearning_set(
        tok, data.forget, data.idk_answers, cfg.max_len, seed=2 * seed
      )
      retain = D.tokenize_unlearning_set(
        tok, data.retain, data.idk_answers, cfg.max_len, seed=2 * seed + 1
      )
      out = checkpointed_unlearn(
        base,
        objective,
        D.BatchIterator(forget, cfg.batch_size, seed=2 * seed),
        D.BatchIterator(retain, cfg.batch_size, seed=2 * seed + 1),
        preset=preset,
        learning_rate=cfg.lr,
        num_updates=num_updates(preset, forget_updates, cfg),
        forget_lr_scale=cfg.forget_lr_scale,
        retain_lr_scale=cfg.retain_lr_scale,
        weight_decay=cfg.weight_decay,
        forget_steps=cfg.forget_steps,
        retain_steps=cfg.retain_steps,
        progress=cfg.progress,
        mesh=mesh,
        log=log,
        checkpoint_dir=None
        if cfg.checkpoint_dir is None
        else Path(cfg.checkpoint_dir) / preset / f"seed{seed}",
        every=cfg.checkpoint_every,
        keep=cfg.keep_checkpoints,
        resume=cfg.resume,
        fingerprint_extra=_run_fingerprint(cfg, data, tok, seed),
      )
      res = evaluate(out.model, ratios)
      res["seed"] = seed
      results[preset].append(res)
      histories[preset].append(out.history.series())
      log(
        f"[{preset} seed {seed}] forget prob {res['forget_prob']:.3f}, UFE {res['forget_efficacy']:.3f}, "
        f"MU {res['model_utility']:.3f}, FQ {res['forget_quality']:.3g}"
      )
    timings[f"{preset}_s"] = time.perf_counter() - t0

  timings["total_s"] = time.perf_counter() - t_start
  config = {
    **{k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()},
    "data": data.summary(),
    "forget_updates": forget_updates,
    "presets_run": presets,
    "presets_skipped": skipped,
    "tokenizer_vocab": tok.vocab_size,
    "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, jax devices {jax.devices()}",
    "timings": {k: round(v, 1) for k, v in timings.items()},
  }
  if not distributed.is_primary():
    doc = report.results_json(results, loss_histories=histories, config=config)
    return json.loads(json.dumps(doc))
  files = report.write_report(
    cfg.out,
    results,
    loss_histories=histories,
    config=config,
    title=f"Unlearning {data.name} with {objective.name}",
  )
  log(f"wrote {files.json}, {files.markdown}, {files.plot} in {timings['total_s']:.0f}s")
  return json.loads(files.json.read_text())


def join_processes(argv: Sequence[str] | None = None) -> distributed.ProcessSetup:
  """Joins the multi-process job the flags (or the environment) describe; before any JAX work."""
  a, _ = build_parser().parse_known_args(argv)
  try:
    return distributed.initialize(
      a.coordinator, a.num_processes, a.process_id, timeout=a.distributed_timeout
    )
  except ValueError as e:
    raise SystemExit(f"dualoptim-unlearn: {e}") from None


def main(argv: Sequence[str] | None = None) -> int:
  join_processes(argv)
  cfg = parse_args(argv)
  try:
    run(cfg)
  except (
    D.DataFormatError,
    CheckpointMismatchError,
    CheckpointCorruptError,
    metrics.NonFiniteOutputError,
    FileExistsError,
  ) as e:
    print(f"dualoptim-unlearn: {e}", file=sys.stderr)
    return 2
  except jax.errors.JaxRuntimeError as e:
    if jax.process_count() == 1:
      raise
    # A collective failed: in a multi-process job, almost always a peer that died.
    print(
      f"dualoptim-unlearn: process {jax.process_index()}: a collective with the other processes "
      f"failed, so one of them has most likely died; stopping ({' '.join(str(e).split())[:300]})",
      file=sys.stderr,
    )
    return 3
  return 0


if __name__ == "__main__":
  sys.exit(main())
