"""The job of ``dualoptim-unlearn`` for any :class:`~dualoptim_jax.unlearn.tasks.Task`.

Tokenizer and starting model (built-in: a byte-level BPE trained on the task's texts and a Llama
of ``--model-size``; ``--model``: the checkpoint's own) and the task's initial rows; then the
TOFU job's own sweep (:func:`~dualoptim_jax.unlearn.cli.sweep_runs`): every preset in
``--presets``, value of ``--sweep`` and seed in ``--seeds`` from the ``Initial`` model through
:func:`~dualoptim_jax.unlearn.cli.unlearn_and_evaluate` (the same trainer, presets, recipe,
``--budget``, loss weighting and checkpoints as the TOFU job), each run recorded in ``OUT/runs``
as it ends and reused on a rerun; then the report with the task's columns, one row per preset
and swept value (results.md / results.json / results.png / tradeoff.png / per_item.jsonl in
``--out``), and, for a task that halves its evaluation (:meth:`Task.summarize_half`: real_world,
safety), the TOFU job's best setting per method (validation half) on the test half and the
paired comparison of DualOptim+ against every baseline.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jax

from dualoptim_jax.models.tokenizer import Tokenizer
from dualoptim_jax.unlearn import distributed, placement, pretrained, report
from dualoptim_jax.unlearn.jsonable import jsonable
from dualoptim_jax.unlearn.tasks import Task

__all__ = ["run_task"]


def _start(task: Task, cfg: Any, cache: Path, log) -> tuple[Any, Tokenizer, str | None]:
  """(pretrained model or None, tokenizer, cache key of the pretrained weights)."""
  if cfg.model is None:
    vocab = cfg.vocab_size or (1024 if cfg.data_dir is None else 4096)
    tok = Tokenizer.train(task.corpus(), vocab_size=vocab, cache_path=cache / "tokenizers")
    log(f"tokenizer: {tok.vocab_size} tokens; model: Llama {cfg.model_size}; {jax.devices()}")
    return None, tok, None
  start, tok, key = pretrained.load_model(cfg.model, n_layers=cfg.model_layers)
  log(pretrained.describe(start, cfg.model, key) + f"; devices: {jax.devices()}")
  return start, tok, key


def _fingerprint(cli: Any, cfg: Any, task: Task, tok: Tokenizer, seed: int) -> dict[str, Any]:
  """What a run's checkpoints are tied to besides model, optimizer, loss and schedule."""
  out = cli._run_fingerprint(cfg, SimpleNamespace(name=task.data_name), tok, seed)
  if task.name != "tofu":
    out["task"] = task.name
  return out


def _write_per_item(path: Path, results: dict[str, list[dict[str, Any]]]) -> Path:
  """One JSON line per evaluated model: its row, seed and per-item outputs (the greedy responses
  and their verdicts), which results.json leaves out, so they can be audited or re-judged."""
  with path.open("w", encoding="utf-8") as f:
    for row, runs in results.items():
      for res in runs:
        line = {"row": row, "seed": res.get("seed"), "per_item": res.get("per_item", {})}
        f.write(json.dumps(jsonable(line), allow_nan=False) + "\n")
  return path


def _run_fn(task: Task, base, tok: Tokenizer, mesh, log):
  """``run(run_cfg, preset, seed) -> record``: one unlearning run of ``task`` from ``base``
  (:func:`~dualoptim_jax.unlearn.cli.unlearn_and_evaluate`, the TOFU job's run), checkpointed
  under ``--checkpoint-dir``/<task>."""
  from dualoptim_jax.unlearn import cli

  under = "" if task.name == "tofu" else task.name  # TOFU's checkpoints: where they always were

  def run(run_cfg: Any, preset: str, seed: int) -> dict[str, Any]:
    fingerprint = _fingerprint(cli, run_cfg, task, tok, seed)
    return cli.unlearn_and_evaluate(
      run_cfg,
      preset,
      seed,
      base=base,
      objective=task.objective,
      batches=task.batches(tok, seed),
      objective0_size=task.objective0_size,
      evaluate=lambda model: task.evaluate(model, tok),
      mesh=mesh,
      checkpointer=cli.run_checkpointer(run_cfg, preset, seed, fingerprint, log, under=under),
    )

  return run


def _initial_rows(task: Task, cfg: Any, mesh, log) -> tuple[dict[str, Any], Tokenizer]:
  """The task's initial models (``"Initial"`` first) and the tokenizer."""
  from dualoptim_jax.unlearn import cli  # the TOFU job's model cache

  cache = cli._cache_dir(cfg)
  cli._use_compilation_cache(cache, log)
  start, tok, start_key = _start(task, cfg, cache, log)

  def tune(kind: str, items):
    if start is None:
      return cli.tuned_model(kind, items, tok, cfg, cache, log, mesh=mesh)
    return cli.tuned_model(
      kind, items, tok, cfg, cache, log, init=start, init_key=start_key, mesh=mesh
    )

  return task.initial_models(tune, start, tok), tok


def _config(task: Task, cfg: Any, tok: Tokenizer, timings: dict[str, float]) -> dict[str, Any]:
  """results.json's ``config``: the flags, the data, the budgets and where and how long it ran."""
  from dualoptim_jax.unlearn import cli

  return {
    **{k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()},
    "data": task.summary(),
    "objective": task.objective.name,
    "budget_rule": cli.BUDGET_RULES[cfg.budget],
    "updates": {p: cli.budget(p, cfg, task.objective0_size) for p in cfg.presets},
    "tokenizer_vocab": tok.vocab_size,
    "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, "
    f"jax devices {jax.devices()}",
    "timings": {k: round(v, 1) for k, v in timings.items()},
  }


def _halves(task: Task, cfg: Any, log=print) -> Any:
  """The task's :data:`~dualoptim_jax.unlearn.sweep.HalfSummary` (:meth:`Task.summarize_half`),
  or None for a task that cannot halve its evaluation, or with fewer than two evaluation items
  (no test half: said in the log, not raised at the end of the runs)."""
  if type(task).summarize_half is Task.summarize_half:  # the default: no halves
    return None
  if cfg.eval_items < 2:
    log("no best setting per method or paired comparison: --eval-items < 2 leaves no test half")
    return None

  def summarize(result: Any, which: str) -> dict[str, Any]:
    out = task.summarize_half(result, which)
    assert out is not None
    return out

  return summarize


def _best_and_paired(
  task: Task, references: dict[str, list], runs: Any, cfg: Any, summarize: Any
) -> tuple[list[str], dict[str, Any]]:
  """The TOFU job's best setting per method and paired comparison
  (:func:`~dualoptim_jax.unlearn.cli.best_and_paired`) on the task's halves ``summarize``
  (:func:`_halves`); none without them."""
  from dualoptim_jax.unlearn import cli

  if summarize is None:
    return [], {}
  return cli.best_and_paired(runs, references, cfg, summarize, task.columns)


def run_task(task: Task, cfg: Any, log=print) -> dict[str, Any]:
  """Runs the comparison of ``cfg`` on ``task`` and writes the report; returns results.json.

  In a multi-process job every process runs this; process 0 alone logs and writes the records
  and the report."""
  from dualoptim_jax.unlearn import cli  # the sweep, budgets and tables of the TOFU job

  t_start = time.perf_counter()
  if not distributed.is_primary():
    cfg = dataclasses.replace(cfg, progress=False)
    log = lambda *args, **kwargs: None  # noqa: E731
  log(task.summary())
  mesh = None if cfg.mesh is None else placement.make_mesh(cfg.mesh)
  if mesh is not None:
    log(f"mesh: {dict(mesh.shape)} over {mesh.size} devices (FSDP)")
  timings: dict[str, float] = {}
  rows, tok = _initial_rows(task, cfg, mesh, log)
  base = rows["Initial"]
  timings["models_s"] = time.perf_counter() - t_start
  t0 = time.perf_counter()
  task.prepare(tok, rows)
  references = {name: [task.evaluate(m, tok)] for name, m in rows.items()}
  del rows  # only the start of the runs is needed from here on
  for name, runs in references.items():
    log(f"[{name}] {task.describe_run(runs[0])}")
  timings["reference_eval_s"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  run = _run_fn(task, base, tok, mesh, log)
  halves = _halves(task, cfg, log)
  runs = cli.sweep_runs(
    cfg, run, data=task.data_name, describe=task.describe_run, summarize=halves, log=log
  )
  timings["runs_s"] = time.perf_counter() - t0
  results, histories, curves = cli.tabulate(references, runs, cfg)
  sections, extra = _best_and_paired(task, references, runs, cfg, halves)
  timings["total_s"] = time.perf_counter() - t_start
  config = _config(task, cfg, tok, timings)
  if not distributed.is_primary():
    doc = report.results_json(results, loss_histories=histories, config=config)
    return json.loads(json.dumps({**doc, **extra}))
  files = report.write_report(
    cfg.out,
    results,
    loss_histories=histories,
    config=config,
    title=task.title,
    sections=sections,
    extra_json=extra,
    columns=task.columns,
    legend=task.legend,
    tradeoff=curves if task.tradeoff_axes else None,
    tradeoff_axes=task.tradeoff_axes or report.TRADEOFF_AXES,
  )
  responses = _write_per_item(Path(cfg.out) / "per_item.jsonl", results)
  log(
    f"wrote {files.json}, {files.markdown}, {files.plot}, {responses} in {timings['total_s']:.0f}s"
  )
  return json.loads(files.json.read_text())
