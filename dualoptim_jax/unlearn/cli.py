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
5. Unlearning with ``--loss`` under every preset in ``--presets``, every value of ``--sweep`` and
   every seed in ``--seeds``, each starting from the TOFU-tuned model, under one optimizer recipe
   (:func:`dualoptim_jax.unlearn.trainer.make_optimizer`); each run is recorded in ``OUT/runs`` as
   it ends and reused on a rerun (:mod:`dualoptim_jax.unlearn.sweep`).
6. Evaluation (:func:`dualoptim_jax.unlearn.metrics.evaluate`) and the report
   (:func:`dualoptim_jax.unlearn.report.write_report`): a Table-1-style comparison with 95 % CIs
   on stdout and ``results.json``, ``results.md``, ``results.png`` and ``tradeoff.png`` in
   ``--out``.

That is ``--task tofu`` (the default). ``--task real_world`` and ``--task safety`` run the paper's
other two experiments through the same job (:mod:`dualoptim_jax.unlearn.tasks`, ``docs/tasks.md``):
each task gives the data of the two objectives, the initial models, the evaluation and the report
columns; steps 5-6 are the same for all.

Seeds vary the unlearning run (batch order and refusal answers), not the tuned model. Budgets:
:data:`BUDGET_RULES` (``--budget equal``: every preset sees the same forget batches).

Flags: every flag is one field of :class:`RunConfig` (its docstring says how to add one); the
parser, the ``--help`` text, the validation and the match of finished runs all read that table.
Every error prints one line (``dualoptim-unlearn: error: ...``) and exits with status 2.

Scale-out and resume: ``--mesh data=1,fsdp=8`` trains FSDP-sharded over the devices
(:mod:`dualoptim_jax.unlearn.placement`); ``--checkpoint-dir DIR`` checkpoints each unlearning
run under ``DIR/<preset>/seed<k>`` (``DIR/<preset>/<name>=<value>/seed<k>`` in a sweep) every
``--checkpoint-every`` updates and at its end, and ``--resume`` continues every run from its
latest checkpoint (:mod:`dualoptim_jax.unlearn.checkpoint`).

Several processes (hosts): ``--coordinator HOST:PORT --num-processes N --process-id I`` join JAX's
multi-process runtime (:mod:`dualoptim_jax.unlearn.distributed`; without them SLURM and TPU pods
are detected, and ``python -m dualoptim_jax.launch -n N -- dualoptim-unlearn ...`` starts N local
processes); ``--mesh`` then spans every process's devices. Every process draws the same batches
and puts only its rows on its devices; process 0 alone prints progress and writes the report;
checkpoints and the model cache are written by all (orbax: each process its shards), on storage
every process can reach (docs/scale.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import json
import math
import os
import platform
import sys
import time
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dualoptim_jax.models.llama import Llama, LlamaConfig
from dualoptim_jax.models.tokenizer import Tokenizer
from dualoptim_jax.unlearn import (
  compiles,
  distributed,
  memory,
  metrics,
  placement,
  pretrained,
  report,
)
from dualoptim_jax.unlearn import data as D
from dualoptim_jax.unlearn import sweep as sweep_lib
from dualoptim_jax.unlearn.checkpoint import RunCheckpointer, load_params, save_params
from dualoptim_jax.unlearn.losses import make_objective
from dualoptim_jax.unlearn.synthetic import synthetic_tofu
from dualoptim_jax.unlearn.tasks import TASKS, make_task
from dualoptim_jax.unlearn.tasks.downstream import parse_specs
from dualoptim_jax.unlearn.tasks.refusal import get_judge
from dualoptim_jax.unlearn.trainer import PRESETS, finetune, full_precision, unlearn

__all__ = ["Flag", "flag", "RunConfig", "build_parser", "parse_args", "run", "main"]

PROG = "dualoptim-unlearn"
MODEL_SIZES = {"tiny": LlamaConfig.tiny, "small": LlamaConfig.small}
SPLITS = (*D.TOFU_SPLITS, "real_world")
_CACHE_VERSION = "2"  # 2: the model cache is an orbax checkpoint
AUTHORS_UPDATES = 300  # the authors' alternating scripts run 300 updates (--budget authors)


# ------------------------------------------------------------------------------------------------
# The flag table.


@dataclasses.dataclass(frozen=True)
class Flag:
  """How one :class:`RunConfig` field appears on the command line.

  Attributes:
    help: the ``--help`` line (the default is appended).
    group: the ``--help`` section.
    check: ``value -> complaint or None``; the complaint follows the flag's name in the error
      (``"must be >= 1, got 0"`` gives ``--batch-size must be >= 1, got 0``) unless it starts
      with the flag's name itself.
    choices: the allowed strings (argparse lists them in the help and the error).
    parse: ``text -> value``, replacing the parser derived from the field's type.
    run_setting: whether the value shapes a run's result (False for where and how the job runs:
      output, caches, devices, progress, which presets and seeds); a finished run is reused
      only when every run setting matches (:func:`run_settings`).
  """

  help: str
  group: str
  check: Callable[[Any], str | None] | None = None
  choices: Sequence[str] | None = None
  parse: Callable[[str], Any] | None = None
  run_setting: bool = True


def flag(default: Any, help: str, *, group: str, **options: Any) -> Any:
  """A :class:`RunConfig` field with its :class:`Flag` (``options``: the other Flag fields)."""
  return dataclasses.field(default=default, metadata={"flag": Flag(help, group, **options)})


def at_least(low: float) -> Callable[[Any], str | None]:
  return lambda v: None if v is None or v >= low else f"must be >= {low}, got {v}"


def positive(v: Any) -> str | None:
  return None if v is None or (math.isfinite(v) and v > 0) else f"must be > 0, got {v}"


def _known_presets(names: tuple[str, ...]) -> str | None:
  unknown = [p for p in names if p not in PRESETS]
  return f"unknown {unknown}; choose from {', '.join(PRESETS)}" if unknown else None


def _existing_model(spec: str | None) -> str | None:
  try:
    if spec is not None:
      pretrained.resolve_model(spec)
  except (OSError, ValueError) as e:
    return str(e)  # names the flag: "--model '/x.gguf': no such file or directory ..."
  return None


def _coordinator_address(address: str | None) -> str | None:
  try:
    if address is not None:
      distributed.resolve(address, 1, 0, environ={})
  except ValueError as e:
    return str(e)
  return None


def _mesh_fits(spec: str | None) -> str | None:
  try:
    if spec is not None:
      placement.parse_mesh_spec(spec, jax.device_count())
  except ValueError as e:
    return f"--mesh: {e}"
  return None


def _complaint(check: Callable[[Any], Any]) -> Callable[[Any], str | None]:
  """A check from a function that raises ValueError on a bad value."""

  def run(value: Any) -> str | None:
    try:
      check(value)
    except ValueError as e:
      return str(e)
    return None

  return run


TASK, DATA, UNLEARN, MODEL, OUTPUT, DEVICES, PROCESSES = (
  "task",
  "data",
  "unlearning",
  "model",
  "evaluation and output",
  "devices and checkpoints",
  "processes (JAX multi-process runtime)",
)


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Every setting of a run: one field per flag, and the only place a flag is stated.

  To add a flag, add one field here: ``name: type = flag(default, "help", group=...,
  check=..., choices=...)``. The flag is ``--name-with-dashes``; its parser comes from the
  type (``int``, ``float``, ``str``, ``X | None``, ``tuple[X, ...]`` as a comma list; a ``bool``
  is a switch: ``--name`` when the default is False, ``--no-name`` when it is True) unless
  ``parse=`` gives one; ``check`` validates the parsed value (see :class:`Flag`). Pass
  ``run_setting=False`` for a flag that does not change a run's result (where and how the job
  runs: output, caches, devices, processes), so finished runs recorded under another value are
  still reused. A float field of group ``unlearning`` can be swept (:func:`sweepable`).
  :func:`build_parser`, :func:`parse_args`, the validation (``__post_init__``, so a config built
  in Python is checked too) and :func:`run_settings` read the table; settings that involve
  several fields are checked in :meth:`_cross_checks`. Example::

      compile_cache: str | None = flag(
        None, "JAX compilation cache directory", group=DEVICES, run_setting=False
      )
  """

  task: str = flag(
    "tofu",
    "tofu: forget fictitious authors (Table 1); real_world: forget famous people, keep their "
    "neighbours (Table 2); safety: refuse harmful instructions, stay helpful (Table 3); the "
    "last two need --data-dir (docs/tasks.md)",
    group=TASK,
    choices=TASKS,
  )
  downstream: str | None = flag(
    None,
    "downstream utility sets NAME=PATH,...: gsm8k* = GSM8K JSON Lines (exact match of the final "
    "number), any other name = multiple-choice JSON Lines (question, choices, answer index)",
    group=TASK,
    check=_complaint(parse_specs),
  )
  downstream_items: int | None = flag(
    None, "items per downstream set (default: --eval-items)", group=TASK, check=at_least(1)
  )
  safety_utility: str = flag(
    "sft",
    "safety task, objective 1: sft = supervised Alpaca seed tasks, kl = KL to the initial model "
    "on them",
    group=TASK,
    choices=("sft", "kl"),
  )
  judge: str = flag(
    "string_match",
    "safety task: refusal judge (string_match, or one registered with "
    "dualoptim_jax.unlearn.tasks.refusal.register_judge)",
    group=TASK,
    check=_complaint(get_judge),
  )
  data_dir: str | None = flag(
    None,
    "folder with tofu/ and real_world/ JSON Lines (or one of them); default: built-in data",
    group=DATA,
  )
  split: str = flag(
    "forget01", "TOFU split, or real_world (ignored for built-in data)", group=DATA, choices=SPLITS
  )
  task_id: int | None = flag(
    None, "forget task of the split (default 1 for TOFU, all targets for real_world)", group=DATA
  )
  loss: str = flag(
    "IDK+AP", "FORGET+RETAIN, e.g. IDK+AP, ME+GD, NPO+KL, GA+GD, SimNPO+GD, DPO+GD", group=UNLEARN
  )
  presets: tuple[str, ...] = flag(
    tuple(PRESETS),
    f"comma list of {', '.join(PRESETS)}",
    group=UNLEARN,
    check=_known_presets,
    run_setting=False,
  )
  seeds: tuple[int, ...] = flag(
    (0, 1, 2), "comma list of unlearning seeds", group=UNLEARN, run_setting=False
  )
  sweep: sweep_lib.Sweep | None = flag(
    None,
    "NAME=V1,V2,...: run every preset and seed at each value of the float unlearning flag NAME, "
    "e.g. forget_lr_scale=0.5,1,2 or lr=1e-4,3e-4; each run is written to OUT/runs as it ends "
    "and a rerun skips finished runs; an 8-bit preset whose 32-bit method is also in --presets "
    "runs only at that method's best value (chosen on the validation half)",
    group=UNLEARN,
    parse=sweep_lib.parse_sweep,
    run_setting=False,
  )
  budget: str = flag(
    "equal",
    "equal: every preset sees the same forget examples; authors: the authors' budgets (joint "
    f"--epochs epochs, alternating presets {AUTHORS_UPDATES} updates)",
    group=UNLEARN,
    choices=("equal", "authors"),
  )
  steps: int | None = flag(
    None,
    "forget updates per run (default: --epochs over the forget set)",
    group=UNLEARN,
    check=at_least(1),
  )
  epochs: float = flag(
    5.0, "forget-set epochs when --steps is not given", group=UNLEARN, check=positive
  )
  batch_size: int = flag(4, "examples per batch", group=UNLEARN, check=at_least(1))
  lr: float = flag(3e-4, "unlearning learning rate", group=UNLEARN, check=positive)
  forget_lr_scale: float = flag(
    1.0, "forget lr = lr * this (alternating presets)", group=UNLEARN, check=at_least(0)
  )
  retain_lr_scale: float = flag(
    1.0, "retain lr = lr * this (alternating presets)", group=UNLEARN, check=at_least(0)
  )
  forget_steps: int = flag(1, "F_f: consecutive forget updates", group=UNLEARN, check=at_least(1))
  retain_steps: int = flag(5, "F_r: consecutive retain updates", group=UNLEARN, check=at_least(1))
  forget_coef: float = flag(1.0, "c_f: forget loss weight", group=UNLEARN)
  retain_coef: float = flag(1.0, "c_r: retain loss weight", group=UNLEARN)
  beta: float = flag(0.1, "beta of NPO / SimNPO / DPO / AP", group=UNLEARN)
  weight_decay: float = flag(
    0.01, "decoupled weight decay (not on biases and norm scales)", group=UNLEARN, check=at_least(0)
  )
  max_grad_norm: float = flag(
    1.0, "global-norm gradient clipping (0: off)", group=UNLEARN, check=at_least(0)
  )
  warmup_steps: int = flag(
    0, "linear warm-up updates before the linear decay to 0", group=UNLEARN, check=at_least(0)
  )
  careful_rounding: bool = flag(
    False, "DualOptim+: the rounding-careful form of the combined second moment", group=UNLEARN
  )
  model: str | None = flag(
    None,
    "start from a pretrained LM: 'smollm2', a .gguf file or a HF safetensors directory "
    "(then the defaults change to a CPU-sized run: see dualoptim_jax.unlearn.pretrained)",
    group=MODEL,
    check=_existing_model,
  )
  model_layers: int | None = flag(
    None, "keep only the first N blocks of --model (smoke tests)", group=MODEL, check=at_least(1)
  )
  forget_items: int | None = flag(
    None, "first N forget items (0: all)", group=MODEL, check=at_least(0)
  )
  retain_items: int | None = flag(
    None, "first N evaluated retain items (0: all)", group=MODEL, check=at_least(0)
  )
  finetune_epochs: float | None = flag(
    None, "fine-tuning epochs (overrides --finetune-steps)", group=MODEL, check=positive
  )
  model_size: str = flag(
    "small", "Llama trained from scratch", group=MODEL, choices=sorted(MODEL_SIZES)
  )
  vocab_size: int | None = flag(
    None, "BPE vocabulary (default 1024 built-in, 4096 files)", group=MODEL, check=at_least(8)
  )
  max_len: int = flag(256, "longest tokenised question + answer", group=MODEL, check=at_least(8))
  finetune_steps: int = flag(400, "fine-tuning updates", group=MODEL, check=at_least(0))
  finetune_lr: float = flag(2e-3, "fine-tuning peak learning rate", group=MODEL, check=positive)
  finetune_batch_size: int = flag(16, "fine-tuning batch", group=MODEL, check=at_least(1))
  model_seed: int = flag(0, "seed of the from-scratch model and its fine-tuning", group=MODEL)
  eval_items: int = flag(
    300, "items per evaluation split (TOFU: 300)", group=OUTPUT, check=at_least(1)
  )
  max_new_tokens: int | None = flag(
    None,
    "greedy answers run to EOS or this many tokens (default 128 for file data, 48 built-in)",
    group=OUTPUT,
    check=at_least(1),
  )
  cache_dir: str | None = flag(
    None,
    "tokenizer and model cache (default: $XDG_CACHE_HOME/dualoptim_jax)",
    group=OUTPUT,
    run_setting=False,
  )
  out: str = flag(
    "results",
    "where results.json, results.md, results.png, tradeoff.png and runs/ go",
    group=OUTPUT,
    run_setting=False,
  )
  progress: bool = flag(True, "progress bars", group=OUTPUT, run_setting=False)
  mesh: str | None = flag(
    None,
    "train FSDP-sharded on a device mesh, e.g. data=1,fsdp=8 or data=2,fsdp=4 (an axis "
    "left out or -1 takes the remaining devices); default: one device, no sharding",
    group=DEVICES,
    check=_mesh_fits,
    run_setting=False,
  )
  checkpoint_dir: str | None = flag(
    None,
    "checkpoint each unlearning run under DIR/<preset>[/<name>=<value> of --sweep]/seed<k> "
    "(orbax; DIR/<task>/... for real_world and safety)",
    group=DEVICES,
    run_setting=False,
  )
  checkpoint_every: int = flag(
    50,
    "updates between checkpoints (one is always written at the end of a run)",
    group=DEVICES,
    check=at_least(1),
    run_setting=False,
  )
  keep_checkpoints: int = flag(
    3, "latest checkpoints kept per run", group=DEVICES, check=at_least(1), run_setting=False
  )
  resume: bool = flag(
    False,
    "continue each run from its latest checkpoint in --checkpoint-dir (finished runs "
    "are restored, not rerun)",
    group=DEVICES,
    run_setting=False,
  )
  coordinator: str | None = flag(
    None,
    "HOST:PORT of process 0's coordination service, with --num-processes and --process-id; "
    "default: detect SLURM / TPU pods / the local launcher (dualoptim_jax.launch), else one "
    "process",
    group=PROCESSES,
    check=_coordinator_address,
    run_setting=False,
  )
  num_processes: int | None = flag(
    None, "processes in the job", group=PROCESSES, check=at_least(1), run_setting=False
  )
  process_id: int | None = flag(
    None, "this process's index, 0 .. N-1", group=PROCESSES, check=at_least(0), run_setting=False
  )
  distributed_timeout: int = flag(
    distributed.DEFAULT_TIMEOUT,
    "seconds to wait for the other processes to join; a process silent this long is declared "
    "dead and the job stops",
    group=PROCESSES,
    check=at_least(1),
    run_setting=False,
  )

  def __post_init__(self) -> None:
    for f in dataclasses.fields(self):
      check = f.metadata["flag"].check
      complaint = check and check(getattr(self, f.name))
      if complaint:
        name = option(f.name, f.default)
        raise ValueError(complaint if complaint.startswith(name) else f"{name} {complaint}")
    for complaint in self._cross_checks():
      raise ValueError(complaint)

  def _cross_checks(self) -> list[str]:
    """Complaints about settings that involve more than one field."""
    out = []
    if not self.presets:
      out.append("--presets must not be empty")
    if not self.seeds:
      out.append("--seeds must not be empty")
    try:
      make_objective(self.loss, self.forget_coef, self.retain_coef, self.beta)
    except ValueError as e:
      out.append(f"--loss / coefficients: {e}")
    if self.task != "tofu" and self.data_dir is None:
      out.append(f"--task {self.task} needs --data-dir (it has no built-in data)")
    if self.resume and self.checkpoint_dir is None:
      out.append("--resume needs --checkpoint-dir (where the runs' checkpoints are)")
    try:
      if (self.coordinator, self.num_processes, self.process_id) != (None, None, None):
        distributed.resolve(self.coordinator, self.num_processes, self.process_id, environ={})
    except ValueError as e:
      out.append(str(e))
    if self.sweep is not None:
      out += _sweep_complaints(self)
    return out


def sweepable() -> list[str]:
  """The flags ``--sweep`` takes: the float flags of an unlearning run (group
  ``unlearning``). The others do not shape a run from the tuned model: every swept value starts
  from the same tuned model (``finetune_*``, ``model_*``, data subsets) and is evaluated alike
  (``eval_items``, ``max_new_tokens``)."""
  groups = {f.name: f.metadata["flag"].group for f in dataclasses.fields(RunConfig)}
  return [f for f, t in _field_types().items() if t is float and groups[f] == UNLEARN]


def _sweep_complaints(cfg: RunConfig) -> list[str]:
  """Complaints about ``cfg.sweep``: a flag that is not :func:`sweepable`, or a bad value."""
  assert cfg.sweep is not None
  name, values = cfg.sweep
  names = sweepable()
  if name not in names:
    flags = {f.name: f.metadata["flag"] for f in dataclasses.fields(RunConfig)}
    if name not in flags:
      why = "is not a flag"
    elif flags[name].group != UNLEARN or not flags[name].run_setting:
      why = (
        "does not shape an unlearning run: every swept value would start from the same tuned "
        "model and be evaluated alike"
      )
    else:
      why = "is not a float flag"
    return [f"--sweep: {name!r} {why}; sweepable: {', '.join(names)}"]
  out = []
  for value in values:
    try:
      dataclasses.replace(cfg, sweep=None, **{name: value})
    except ValueError as e:
      out.append(f"--sweep {name}={value:g}: {e}")
  return out


def option(name: str, default: Any = None) -> str:
  """The command-line spelling of field ``name`` (``--no-progress`` for a switch on by default)."""
  dashed = name.replace("_", "-")
  return f"--no-{dashed}" if default is True else f"--{dashed}"


_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string"}


def _field_types() -> dict[str, Any]:
  return typing.get_type_hints(RunConfig)


def _converter(tp: Any) -> tuple[Callable[[str], Any], str]:
  """(text -> value, what the text must be) for a field type."""
  args = typing.get_args(tp)
  if typing.get_origin(tp) in (typing.Union, types.UnionType):
    return _converter(next(a for a in args if a is not type(None)))
  if typing.get_origin(tp) is tuple:
    item, word = _converter(args[0])
    plural = word.split(" ", 1)[1] + "s"
    return (lambda text: tuple(item(v.strip()) for v in text.split(",") if v.strip())), (
      f"a comma list of {plural}"
    )
  return tp, _TYPE_WORDS[tp]


class _Parser(argparse.ArgumentParser):
  """argparse with one-line errors: ``dualoptim-unlearn: error: ...`` and exit status 2."""

  def error(self, message: str) -> typing.NoReturn:
    print(f"{self.prog}: error: {message}", file=sys.stderr)
    exit = SystemExit(message)
    exit.code = 2
    raise exit


def build_parser() -> argparse.ArgumentParser:
  """The argparse parser of :class:`RunConfig`'s table; every value is read as text (or a
  switch) and left ``None`` when not given, so :func:`parse_args` knows what was set."""
  p = _Parser(
    prog=PROG,
    description="Fine-tune a small Llama on TOFU-style data, unlearn the forget set with each "
    "optimizer preset, evaluate with the TOFU / closer-look metrics and write results.json, "
    "results.md and results.png. With no flags: the built-in synthetic data.",
  )
  groups: dict[str, argparse._ArgumentGroup] = {}
  types_ = _field_types()
  for f in dataclasses.fields(RunConfig):
    spec: Flag = f.metadata["flag"]
    group = groups.setdefault(spec.group, p.add_argument_group(spec.group))
    shown = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
    help_ = f"{spec.help} (default: {shown})".replace("%", "%%")
    if types_[f.name] is bool:
      group.add_argument(
        option(f.name, f.default),
        dest=f.name,
        action="store_const",
        const=not f.default,
        help=spec.help,
      )
    else:
      group.add_argument(
        option(f.name), dest=f.name, choices=spec.choices, help=help_, metavar=None
      )
  return p


def parse_args(argv: Sequence[str] | None = None) -> RunConfig:
  """Parses and validates the flags into a :class:`RunConfig`; a bad flag exits with one line.

  With ``--model`` the flags not given take :data:`dualoptim_jax.unlearn.pretrained.DEFAULTS`.
  """
  parser = build_parser()
  given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
  types_ = _field_types()
  values: dict[str, Any] = dict(pretrained.DEFAULTS) if "model" in given else {}
  for f in dataclasses.fields(RunConfig):
    if f.name not in given:
      continue
    text, spec = given[f.name], f.metadata["flag"]
    if types_[f.name] is bool:
      values[f.name] = text
      continue
    convert, word = (spec.parse, "valid") if spec.parse else _converter(types_[f.name])
    try:
      values[f.name] = convert(text)
    except ValueError:
      parser.error(f"{option(f.name)} must be {word}, got {text!r}")
  try:
    return RunConfig(**values)
  except ValueError as e:
    parser.error(str(e))


# ------------------------------------------------------------------------------------------------
# Pipeline pieces.


def load_data(cfg: RunConfig) -> D.UnlearningData:
  if cfg.data_dir is None:
    return synthetic_tofu()
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
    path = Path(cfg.cache_dir).expanduser()
  else:
    path = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dualoptim_jax"
  # Absolute: JAX keys its compilation cache by how the directory is spelled, so the same
  # directory reached by another relative path would never hit what an earlier run wrote.
  return path.resolve()


def _digest(*parts: Any) -> str:
  h = hashlib.sha256()
  for part in parts:
    h.update(json.dumps(part, sort_keys=True, default=str).encode())
  return h.hexdigest()[:20]


def _finetune_steps(cfg: RunConfig, num_pairs: int) -> int:
  if cfg.finetune_epochs is None:
    return cfg.finetune_steps
  return pretrained.finetune_steps(num_pairs, cfg.finetune_epochs, cfg.finetune_batch_size)


def tuned_model_path(
  kind: str,
  items: Sequence[D.QAItem],
  tok: Tokenizer,
  cfg: RunConfig,
  cache: Path,
  *,
  init_key: Any = None,
) -> Path:
  """Where :func:`tuned_model` caches the model it makes from these arguments (``init_key``:
  the pretrained weights' key, None for a ``--model-size`` model trained from scratch)."""
  pairs = [(it.question, it.answer) for it in items]
  if init_key is None:
    init_key, name = dataclasses.asdict(MODEL_SIZES[cfg.model_size](tok.vocab_size)), cfg.model_size
  else:
    name = "pretrained"
  key = _digest(
    _CACHE_VERSION,
    kind,
    pairs,
    tok.hf_tokenizer.to_str(),
    init_key,
    _finetune_steps(cfg, len(pairs)),
    cfg.finetune_lr,
    cfg.finetune_batch_size,
    cfg.model_seed,
    cfg.max_len,
  )
  return cache / "models" / f"{kind}-{name}-{key}"


def tuned_model(
  kind: str,
  items: Sequence[D.QAItem],
  tok: Tokenizer,
  cfg: RunConfig,
  cache: Path,
  log=print,
  *,
  init: nnx.Module | None = None,
  init_key: Any = None,
  mesh: Any = None,
  donate_init: bool = False,
) -> nnx.Module:
  """A Llama fine-tuned on ``items`` (answer-token NLL), loaded from cache if there.

  From scratch (a ``--model-size`` Llama), or from ``init`` (a pretrained model, left unchanged
  unless ``donate_init``: then its buffers are trained or overwritten, one copy less in memory)
  whose weights ``init_key`` names in the cache key.
  """
  pairs = [(it.question, it.answer) for it in items]
  steps = _finetune_steps(cfg, len(pairs))
  path = tuned_model_path(kind, items, tok, cfg, cache, init_key=None if init is None else init_key)
  if init is None:
    model = Llama(MODEL_SIZES[cfg.model_size](tok.vocab_size), rngs=nnx.Rngs(cfg.model_seed))
  else:
    model = init
  if distributed.all_true(path.is_dir()):  # every process loads, or every process trains
    if init is not None and not donate_init:  # a copy: the pretrained model stays as it is
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
    donate_model=donate_init or init is None,
  )
  tail = result.losses[-10:].mean() if len(result.losses) else float("nan")
  log(
    f"[{kind}] fine-tuned {steps} steps on {len(items)} QA in {time.perf_counter() - t0:.0f}s "
    f"(final NLL {tail:.3f}); cached at {path}"
  )
  save_params(result.model, path)
  return result.model


BUDGET_RULES = {
  "equal": "every preset sees the same forget batches: F = --steps, or --epochs over the forget "
  "set (ceil(epochs * forget items / batch size)) forget updates; joint makes F updates, an "
  "alternating preset ceil(F / F_f) cycles of F_f forget + F_r retain updates",
  "authors": "the authors' scripts: joint runs --epochs epochs over the forget set "
  f"(ceil(epochs * forget items / batch size) updates), alternating presets {AUTHORS_UPDATES} "
  "updates",
}


def _use_compilation_cache(cache: Path, log=print) -> None:
  """JAX's persistent compilation cache under ``cache/xla``, unless one is configured already
  (``JAX_COMPILATION_CACHE_DIR``; ``JAX_ENABLE_COMPILATION_CACHE=false`` turns it off)."""
  options: Any = jax.config  # the flags are attributes pyright cannot see
  if options.jax_compilation_cache_dir is None and options.jax_enable_compilation_cache:
    jax.config.update("jax_compilation_cache_dir", str(cache / "xla"))
    log(f"compilation cache: {cache / 'xla'}")


def _with_forget_quality(result: dict[str, Any], retain_only_ratios: Any) -> dict[str, Any]:
  """``result`` (an evaluation without forget quality) with it: the retain-only row is its own
  reference evaluation, not evaluated twice."""
  ratios = np.asarray(result["per_item"]["forget"]["truth_ratio"])
  ks = metrics.forget_quality(ratios, np.asarray(retain_only_ratios))
  return {**result, "forget_quality": ks.pvalue, "ks_statistic": ks.statistic}


def _peak_rss_gib() -> float:
  """This process's peak resident set size so far (Linux / macOS), in GiB."""
  import resource

  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak / (2**30 if sys.platform == "darwin" else 2**20)


def num_updates(preset: str, forget_updates: int, cfg: RunConfig) -> int:
  """Optimizer updates of a run that makes ``forget_updates`` forget updates."""
  if PRESETS[preset].mode == "joint":
    return forget_updates
  return math.ceil(forget_updates / cfg.forget_steps) * (cfg.forget_steps + cfg.retain_steps)


def budget(preset: str, cfg: RunConfig, forget_items: int) -> int:
  """The optimizer updates of ``preset``'s run under ``--budget`` (:data:`BUDGET_RULES`)."""
  epochs = max(1, math.ceil(cfg.epochs * forget_items / cfg.batch_size))
  if cfg.budget == "authors":
    return epochs if PRESETS[preset].mode == "joint" else AUTHORS_UPDATES
  return num_updates(preset, cfg.steps or epochs, cfg)


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


def run_settings(cfg: RunConfig) -> dict[str, Any]:
  """The fields of ``cfg`` that shape a run's result (those whose :class:`Flag` has
  ``run_setting``): what a finished run's record is matched on."""
  return {
    f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.metadata["flag"].run_setting
  }


# ------------------------------------------------------------------------------------------------
# The job.


@dataclasses.dataclass
class Setup:
  """What every run of a job shares: the data, tokenizer, both tuned models and the mesh."""

  data: D.UnlearningData
  tok: Tokenizer
  base: nnx.Module
  retain_only: nnx.Module | None  # dropped once the reference evaluations are done
  mesh: Any
  base_path: Path | None = None  # the tuned model's cache: runs may then train its buffers
  retain_path: Path | None = None  # the retain-only model's cache (keys the reference rows)


def prepare(cfg: RunConfig, log=print) -> Setup:
  """Loads the data and the tokenizer and makes (or loads) the tuned and retain-only models."""
  data = load_data(cfg)
  log(data.summary())
  cache = _cache_dir(cfg)
  _use_compilation_cache(cache, log)
  mesh = None if cfg.mesh is None else placement.make_mesh(cfg.mesh)
  if mesh is not None:
    log(f"mesh: {dict(mesh.shape)} over {mesh.size} devices (FSDP)")
  if cfg.model is None:
    vocab = cfg.vocab_size or (1024 if cfg.data_dir is None else 4096)
    tok = Tokenizer.train(corpus(data), vocab_size=vocab, cache_path=cache / "tokenizers")
    log(f"tokenizer: {tok.vocab_size} tokens; model: Llama {cfg.model_size}; {jax.devices()}")
    general = data.real_authors + data.world_facts
    full_items, retain_items = data.forget + data.retain + general, data.retain + general
    init: dict[str, Any] = {}
  else:
    # A pretrained LM brings its general knowledge: tune on forget + retain only.
    data = pretrained.subset(data, cfg.forget_items, cfg.retain_items)
    log(data.summary())
    start, tok, key = pretrained.load_model(cfg.model, n_layers=cfg.model_layers)
    log(pretrained.describe(start, cfg.model, key) + f"; devices: {jax.devices()}")
    full_items, retain_items = data.forget + data.retain, data.retain
    init = {"init": start, "init_key": key}
  tune = lambda kind, items, donate=False: tuned_model(
    kind, items, tok, cfg, cache, log, mesh=mesh, donate_init=donate, **init
  )
  path = lambda kind, items: tuned_model_path(
    kind, items, tok, cfg, cache, init_key=init.get("init_key")
  )
  base = tune("full", full_items)
  # The last use of a pretrained model: the retain-only fine-tune trains its buffers (a model
  # trained from scratch is always its own).
  retain_only = tune("retain", retain_items, donate=True)
  return Setup(
    data,
    tok,
    base,
    retain_only,
    mesh,
    path("full", full_items),
    path("retain", retain_items),
  )


def evaluation_settings(cfg: RunConfig) -> dict[str, Any]:
  """The keywords of :func:`dualoptim_jax.unlearn.metrics.evaluate` that every forget / retain
  task (TOFU, real-world) evaluates with: greedy answers of ``--max-new-tokens`` (default 48 new
  tokens on the built-in data, 128 on file data), ``--eval-items`` per split, and token entropy
  counted in model utility, as the authors count it."""
  return dict(
    max_new_tokens=cfg.max_new_tokens or (48 if cfg.data_dir is None else 128),
    max_len=cfg.max_len,
    max_items=cfg.eval_items,
    extra_metrics=("token_entropy",),
    progress=cfg.progress,
  )


def evaluate(setup: Setup, cfg: RunConfig, model: nnx.Module, ratios=None) -> dict[str, Any]:
  """:func:`dualoptim_jax.unlearn.metrics.evaluate` with the job's settings
  (:func:`evaluation_settings`)."""
  return metrics.evaluate(
    model, setup.tok, setup.data, retain_only_truth_ratios=ratios, **evaluation_settings(cfg)
  )


def recipe(cfg: RunConfig) -> dict[str, Any]:
  """The keywords of :func:`~dualoptim_jax.unlearn.trainer.unlearn` that every task's runs share:
  the recipe (learning rates, schedule, clipping, decay, rounding) and the F_f/F_r cycle."""
  return dict(
    learning_rate=cfg.lr,
    forget_steps=cfg.forget_steps,
    retain_steps=cfg.retain_steps,
    progress=cfg.progress,
    forget_lr_scale=cfg.forget_lr_scale,
    retain_lr_scale=cfg.retain_lr_scale,
    weight_decay=cfg.weight_decay,
    max_grad_norm=cfg.max_grad_norm,
    warmup_steps=cfg.warmup_steps,
    careful_rounding=cfg.careful_rounding,
  )


def run_objective(base: Any, cfg: RunConfig, preset: str) -> Any:
  """``base``, any objective with ``forget_coef`` / ``retain_coef`` fields (an
  :class:`~dualoptim_jax.unlearn.losses.UnlearningLoss`, a task's supervised objective), under
  the run's settings: the coefficients ``c_f``, ``c_r`` (and ``beta``, where the loss has one)
  of ``cfg``, so a sweep of them reaches every task's objective.

  ``joint`` has one learning rate for both objectives, so there the lr scales weight the losses
  instead: to first order (SGD) a forget step at ``lr * s`` and a forget loss weighted ``s``
  move the parameters alike, which keeps a ``forget_lr_scale`` sweep meaningful for every
  preset. The alternating presets apply the scales to their learning rates (:func:`recipe`).
  """
  f, r = (cfg.forget_lr_scale, cfg.retain_lr_scale) if PRESETS[preset].mode == "joint" else (1, 1)
  fields = {field.name for field in dataclasses.fields(base)}
  extra = {"beta": cfg.beta} if "beta" in fields else {}
  return dataclasses.replace(
    base, forget_coef=float(cfg.forget_coef * f), retain_coef=float(cfg.retain_coef * r), **extra
  )


def objective(cfg: RunConfig, preset: str) -> Any:
  """The TOFU job's loss (``--loss``) under the run's settings (:func:`run_objective`)."""
  return run_objective(make_objective(cfg.loss, beta=cfg.beta), cfg, preset)


def run_checkpointer(
  cfg: RunConfig, preset: str, seed: int, fingerprint_extra: dict[str, Any], log=print, *, under=""
) -> RunCheckpointer | None:
  """The run's checkpointer under ``--checkpoint-dir``, or None without one:
  ``DIR[/under]/<preset>[/<name>=<value>]/seed<k>``, one directory per swept setting."""
  if cfg.checkpoint_dir is None:
    return None
  setting = sweep_lib.setting_dir(preset, cfg.sweep, sweep_lib.swept_value(cfg))
  return RunCheckpointer(
    Path(cfg.checkpoint_dir) / under / setting / f"seed{seed}",
    every=cfg.checkpoint_every,
    keep=cfg.keep_checkpoints,
    resume=cfg.resume,
    fingerprint_extra=fingerprint_extra,
    log=log,
  )


def unlearn_and_evaluate(
  cfg: RunConfig,
  preset: str,
  seed: int,
  *,
  base: nnx.Module,
  objective: Any,
  batches: tuple[Any, Any],
  objective0_size: int,
  evaluate: Callable[[nnx.Module], dict[str, Any]],
  mesh: Any = None,
  checkpointer: RunCheckpointer | None = None,
  base_path: Path | None = None,
) -> dict[str, Any]:
  """One run of any task, as its record: unlearns ``base`` with ``preset`` on the two
  objectives' ``batches`` under ``cfg``'s recipe (:func:`recipe`), loss weights
  (:func:`run_objective`) and budget (:func:`budget` of ``objective0_size`` examples), then
  ``evaluate(model)``. The record holds ``result`` (the metrics, the seed and the update
  stability), ``history``, ``run`` (the optimizer settings and update counts) and timings.

  With ``base_path`` (where ``base``'s parameters are saved, :func:`tuned_model_path`), a run
  on one device whose objective needs no frozen reference trains ``base``'s own buffers, and
  ``base`` is read back from ``base_path`` after the evaluation: one copy of the model less in
  memory while the optimizer state is alive."""
  t0 = time.perf_counter()
  updates = budget(preset, cfg, objective0_size)
  loss = run_objective(objective, cfg, preset)
  lend = base_path is not None and mesh is None and not loss.needs_reference
  out = unlearn(
    base,
    loss,
    *batches,
    preset=preset,
    num_updates=updates,
    mesh=mesh,
    checkpointer=checkpointer,
    donate_model=lend,
    **recipe(cfg),
  )
  t_eval = time.perf_counter()
  result = {**evaluate(out.model), "seed": seed, **out.stability}
  eval_s = time.perf_counter() - t_eval
  record = {
    "result": result,
    "history": out.history.series(),
    "run": {
      **out.config,
      "updates": updates,
      "forget_updates": int(np.sum(out.history.objective != 1)),
    },
  }
  if lend:
    assert base_path is not None
    del out  # the trained model goes before the tuned one comes back
    memory.release_freed_memory()
    load_params(base, base_path)
  return {**record, "seconds": time.perf_counter() - t0, "eval_seconds": eval_s}


def one_run(
  setup: Setup, cfg: RunConfig, preset: str, seed: int, ratios: Any, log=print
) -> dict[str, Any]:
  """Unlearns TOFU with ``preset`` and ``seed`` under ``cfg`` and evaluates: the run's record."""
  tok, data = setup.tok, setup.data
  arrays = lambda items, k: D.tokenize_unlearning_set(
    tok, items, data.idk_answers, cfg.max_len, seed=k
  )
  fingerprint = _run_fingerprint(cfg, data, tok, seed)
  return unlearn_and_evaluate(
    cfg,
    preset,
    seed,
    base=setup.base,
    objective=make_objective(cfg.loss, beta=cfg.beta),
    batches=(
      D.BatchIterator(arrays(data.forget, 2 * seed), cfg.batch_size, seed=2 * seed),
      D.BatchIterator(arrays(data.retain, 2 * seed + 1), cfg.batch_size, seed=2 * seed + 1),
    ),
    objective0_size=len(data.forget),
    evaluate=lambda model: evaluate(setup, cfg, model, ratios),
    mesh=setup.mesh,
    checkpointer=run_checkpointer(cfg, preset, seed, fingerprint, log),
    base_path=setup.base_path,
  )


RunFn = Callable[[RunConfig, str, int], dict[str, Any]]
"""``run(run_cfg, preset, seed) -> record``: one run of a sweep (:func:`unlearn_and_evaluate`)."""
Runs = dict[str, list[tuple[float | None, list[dict[str, Any]]]]]
"""``{preset: [(swept value or None, [per-seed records])]}``: a sweep's records."""


def sweep_runs(
  cfg: RunConfig,
  run: RunFn,
  *,
  data: str,
  describe: Callable[[dict], str],
  summarize: sweep_lib.HalfSummary | None = None,
  log=print,
) -> Runs:
  """Every (preset, value, seed) record of ``cfg``'s presets, sweep and seeds, for any task:
  loaded from ``OUT/runs`` if finished under the same settings (``data`` names the data in the
  fingerprint), else made by ``run(run_cfg, preset, seed)`` (``run_cfg``: ``cfg`` with the
  swept flag at its value) and written at once. Seeds are the outer loop, so a sweep stopped
  part-way has the same seeds for every preset and value. ``describe(result)`` is the log line
  of a finished run.

  With ``summarize`` (the task's evaluation halves), an 8-bit preset whose 32-bit method is also
  swept is not swept itself: once the sweep is done it runs every seed at that method's best
  value, chosen on the validation half (:func:`dualoptim_jax.unlearn.sweep.best_settings`)."""
  at_best = _runs_at_best(cfg, summarize)
  swept = [p for p in cfg.presets if p not in at_best]
  values = sweep_lib.sweep_values(cfg.sweep)
  runs = _runs_at(cfg, run, {p: values for p in swept}, data, describe, log)
  if at_best:
    assert summarize is not None
    results = {p: [(v, [r["result"] for r in rs]) for v, rs in runs[p]] for p in at_best.values()}
    best = sweep_lib.best_settings(results, summarize)
    for preset, method in at_best.items():
      log(f"[{preset}] runs at {sweep_lib.label(method, cfg.sweep, best[method][0])}'s value")
    chosen = {p: [best[m][0]] for p, m in at_best.items()}
    runs.update(_runs_at(cfg, run, chosen, data, describe, log))
  return {p: runs[p] for p in cfg.presets}


def _runs_at_best(cfg: RunConfig, summarize: Any) -> dict[str, str]:
  """``{8-bit preset: its 32-bit preset}`` for the presets that run at their method's best swept
  value (:func:`sweep_runs`)."""
  if cfg.sweep is None or summarize is None:
    return {}
  methods = {p: full_precision(p) for p in cfg.presets}
  return {p: m for p, m in methods.items() if m != p and m in cfg.presets}


def _runs_at(cfg: RunConfig, run: RunFn, values: dict[str, list], data: str, describe, log) -> Runs:
  """The records of each preset at its ``values`` for every seed (seed-major)."""
  records: dict[tuple[str, Any], list[dict[str, Any]]] = {}
  for seed in cfg.seeds:
    for preset, options in values.items():
      for value in options:
        run_cfg = cfg
        if cfg.sweep is not None and value is not None:
          run_cfg = dataclasses.replace(cfg, **{cfg.sweep[0]: value})
        record = _sweep_run(run_cfg, run, preset, seed, data, describe, log)
        records.setdefault((preset, value), []).append(record)
  return {p: [(v, records[p, v]) for v in options] for p, options in values.items()}


def _sweep_run(
  cfg: RunConfig, run: RunFn, preset: str, seed: int, data: str, describe, log
) -> dict[str, Any]:
  """One (preset, value, seed) record: loaded if it is finished, else run and written."""
  value = sweep_lib.swept_value(cfg)
  path = sweep_lib.record_path(cfg.out, preset, cfg.sweep, value, seed)
  fp = {**run_settings(cfg), "preset": preset, "seed": seed, "data": data}
  # Every process decides alike (a record on host 0's disk only means: all run it).
  finished = distributed.all_true(path.is_file())
  record = sweep_lib.load_record(path, fp) if finished else None
  name = f"{sweep_lib.label(preset, cfg.sweep, value)} seed {seed}"
  if record is not None:
    log(f"[{name}] finished earlier: {path}")
    return record
  record = {"fingerprint": fp, **run(cfg, preset, seed)}
  gc.collect()  # the run's model and optimizer state: free them before the next run allocates
  memory.release_freed_memory()
  if distributed.is_primary():  # one writer: the processes hold the same record
    sweep_lib.save_record(path, record)
  r = record["result"]
  log(
    f"[{name}] {describe(r)}, max |update|/lr {r['max_update_ratio']:.3g} "
    f"({record['seconds']:.0f}s)"
  )
  return record


def _describe_tofu(result: dict[str, Any]) -> str:
  return f"UFE {result['forget_efficacy']:.3f}, MU {result['model_utility']:.3f}"


def reference_rows_path(setup: Setup, cfg: RunConfig) -> Path | None:
  """Where :func:`_reference_rows` caches the Initial and Retain-only rows: keyed by both tuned
  models' cache entries, the evaluated items, the evaluation settings and what can change the
  last bits of a result (devices, processes, JAX version). None without both models' entries."""
  if setup.base_path is None or setup.retain_path is None:
    return None
  settings = {k: v for k, v in evaluation_settings(cfg).items() if k != "progress"}
  items = {
    f: [dataclasses.asdict(it) for it in getattr(setup.data, f)]
    for f in metrics.SPLIT_FIELDS.values()
  }
  key = _digest(
    _CACHE_VERSION,
    setup.base_path.name,
    setup.retain_path.name,
    items,
    settings,
    cfg.mesh,
    jax.process_count(),
    jax.__version__,
    str(jax.devices()[0].device_kind),
  )
  return _cache_dir(cfg) / "evaluations" / f"tofu-{key}.json"


def _reference_rows(setup: Setup, cfg: RunConfig, log=print) -> tuple[dict[str, list], Any]:
  """The Initial and Retain-only rows, and the retain-only forget truth ratios (forget quality's
  reference), read from their cache (:func:`reference_rows_path`) when a run of the same models
  and settings made them. The retain-only model is dropped afterwards: nothing else needs it."""
  assert setup.retain_only is not None
  path = reference_rows_path(setup, cfg)
  if path is not None and distributed.all_true(path.is_file()):
    references, ratios = json.loads(path.read_text())
    log(f"reference rows: loaded cached evaluations {path}")
  else:
    reference = evaluate(setup, cfg, setup.retain_only)
    ratios = reference["per_item"]["forget"]["truth_ratio"]
    references = {
      "Initial": [evaluate(setup, cfg, setup.base, ratios)],
      "Retain-only": [_with_forget_quality(reference, ratios)],
    }
    if path is not None and distributed.is_primary():
      path.parent.mkdir(parents=True, exist_ok=True)
      # Plain JSON with NaN kept (``json`` writes and reads it), so a cached row is the row.
      tmp = path.with_suffix(".tmp")
      tmp.write_text(json.dumps([references, ratios]))
      tmp.replace(path)
  setup.retain_only = None
  memory.release_freed_memory()
  return references, ratios


def tabulate(references: dict[str, list], runs: Runs, cfg: RunConfig):
  """Rows of any task's report (the ``references`` rows, then one per preset and swept value:
  :func:`dualoptim_jax.unlearn.sweep.label`), their loss histories, and the trade-off plot's
  curves (one per preset, through its sweep values)."""
  results = dict(references)
  histories, curves = {}, {}
  for preset, settings in runs.items():
    curves[preset] = []
    for value, records in settings:
      row = sweep_lib.label(preset, cfg.sweep, value)
      results[row] = [{**r["result"], "run": r["run"]} for r in records]
      histories[row] = [r["history"] for r in records]
      curves[preset].append((row.removeprefix(preset).strip(" []") or preset, results[row]))
  return results, histories, curves


def best_and_paired(
  runs: Runs,
  references: dict[str, list],
  cfg: RunConfig,
  summarize: sweep_lib.HalfSummary,
  columns: Sequence[tuple[str, str]] = report.TABLE_COLUMNS,
) -> tuple[list[str], dict[str, Any]]:
  """The report's best setting per method (chosen on the validation half by mean OVR, reported
  on the test half beside the ``references`` rows' test halves) and the paired comparison of
  DualOptim+ against every baseline, for any task whose evaluation ``summarize`` halves
  (:func:`dualoptim_jax.unlearn.sweep.best_settings`): (results.md sections, results.json
  entries)."""
  best = sweep_lib.best_settings(
    {p: [(v, [r["result"] for r in recs]) for v, recs in s] for p, s in runs.items()}, summarize
  )
  halves = {k: [summarize(r, "test") for r in v] for k, v in references.items()}
  return sweep_lib.sections(best, cfg.sweep, halves, columns)


def run(cfg: RunConfig, log=print) -> dict[str, Any]:
  """Runs the experiment of ``cfg`` and writes the report; returns the results.json document.

  In a multi-process job every process runs this; process 0 alone logs, shows progress and
  writes the report (the others return the document without writing it). ``--task real_world`` /
  ``safety`` run through the task job (:func:`dualoptim_jax.unlearn.tasks.job.run_task`), with
  the same sweep, records, budgets, loss weighting and best-setting / paired-comparison
  sections (:func:`sweep_runs`, :func:`unlearn_and_evaluate`, :func:`best_and_paired`);
  ``tofu`` runs here.
  """
  if cfg.task != "tofu":
    from dualoptim_jax.unlearn.tasks.job import run_task

    return run_task(make_task(cfg), cfg, log)
  t_start = time.perf_counter()
  if not distributed.is_primary():
    cfg = dataclasses.replace(cfg, progress=False)
    log = lambda *args, **kwargs: None  # noqa: E731
  memory.limit_heap_growth()  # freed parameter-sized buffers go back to the system
  compiled: dict[str, Any] = {}
  start = compiles.snapshot()
  setup = prepare(cfg, log)
  after_models = compiles.snapshot()
  compiled["models"] = after_models.since(start).as_dict()
  t_eval = time.perf_counter()
  references, ratios = _reference_rows(setup, cfg, log)
  eval_s = time.perf_counter() - t_eval
  after_reference = compiles.snapshot()
  compiled["reference_eval"] = after_reference.since(after_models).as_dict()
  run_fn: RunFn = lambda run_cfg, preset, seed: one_run(setup, run_cfg, preset, seed, ratios, log)
  halves = sweep_lib.tofu_halves(ratios)
  runs = sweep_runs(
    cfg, run_fn, data=setup.data.name, describe=_describe_tofu, summarize=halves, log=log
  )
  compiled["runs"] = compiles.snapshot().since(after_reference).as_dict()
  compiled["total"] = compiles.snapshot().since(start).as_dict()
  eval_s += sum(r.get("eval_seconds", 0.0) for s in runs.values() for _, rs in s for r in rs)
  results, histories, curves = tabulate(references, runs, cfg)
  sections, extra = best_and_paired(runs, references, cfg, halves)
  config = {
    **{k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()},
    "data": setup.data.summary(),
    "budget_rule": BUDGET_RULES[cfg.budget],
    "updates": {p: budget(p, cfg, len(setup.data.forget)) for p in cfg.presets},
    "tokenizer_vocab": setup.tok.vocab_size,
    "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, {jax.devices()}",
    "wall_s": round(time.perf_counter() - t_start, 1),
    "evaluation_share": round(eval_s / (time.perf_counter() - t_start), 3),
    "compiles": compiled,
    "peak_rss_gib": round(_peak_rss_gib(), 2),
  }
  if not distributed.is_primary():
    doc = report.results_json(results, loss_histories=histories, config=config)
    return json.loads(json.dumps({**doc, **dict(extra or {})}))
  files = report.write_report(
    cfg.out,
    results,
    loss_histories=histories,
    config=config,
    title=f"Unlearning {setup.data.name} with {cfg.loss}",
    sections=sections,
    extra_json=extra,
    tradeoff=curves,
  )
  log(f"wrote {files.json}, {files.markdown}, {files.plot} in {config['wall_s']:.0f}s")
  return json.loads(files.json.read_text())


def _one_line(message: str) -> str:
  """A multi-line message (a checkpoint mismatch lists its differences) as one line."""
  first, *rest = [line.strip() for line in message.splitlines() if line.strip()] or [""]
  return " ".join([first, "; ".join(rest)]) if rest else first


def join_processes(argv: Sequence[str] | None = None) -> distributed.ProcessSetup:
  """Joins the multi-process job the flags (or the environment) describe, before any JAX work
  (the flags are validated again with the rest by :func:`parse_args`)."""
  a, _ = build_parser().parse_known_args(argv)
  try:
    to_int = lambda text: None if text is None else int(text)  # noqa: E731
    timeout = to_int(a.distributed_timeout) or distributed.DEFAULT_TIMEOUT
    return distributed.initialize(
      a.coordinator, to_int(a.num_processes), to_int(a.process_id), timeout=timeout
    )
  except ValueError as e:
    print(f"{PROG}: error: {_one_line(str(e))}", file=sys.stderr)
    raise SystemExit(2) from None


def main(argv: Sequence[str] | None = None) -> int:
  """The command: exit status 0, or 2 with one line on stderr for a bad flag or input (a data
  file, a model path, a checkpoint of another run). Set ``DUALOPTIM_TRACEBACK=1`` to see the
  traceback of an input error instead."""
  join_processes(argv)
  cfg = parse_args(argv)
  try:
    run(cfg)
  except jax.errors.JaxRuntimeError as e:
    if jax.process_count() == 1:
      raise
    # A collective failed: in a multi-process job, almost always a peer that died.
    print(
      f"{PROG}: error: process {jax.process_index()}: a collective with the other processes "
      f"failed, so one of them has most likely died; stopping ({_one_line(str(e))[:300]})",
      file=sys.stderr,
    )
    return 3
  except (OSError, ValueError) as e:  # DataFormatError and CheckpointMismatchError are ValueErrors
    if os.environ.get("DUALOPTIM_TRACEBACK"):
      raise
    print(f"{PROG}: error: {_one_line(str(e))}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"{PROG}: interrupted", file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
