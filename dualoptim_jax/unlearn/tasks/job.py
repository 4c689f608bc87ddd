"""The job of ``dualoptim-unlearn`` for any :class:`~dualoptim_jax.unlearn.tasks.Task`.

Tokenizer and starting model (built-in: a byte-level BPE trained on the task's texts and a Llama
of ``--model-size``; ``--model``: the checkpoint's own), the task's initial rows, then every
preset in ``--presets`` and seed in ``--seeds`` from the ``Initial`` model through
:func:`~dualoptim_jax.unlearn.trainer.unlearn` (the same trainer, presets,
schedule and checkpoints as the TOFU job), the task's evaluation of each run, and the report
with the task's columns (results.md / results.json / results.png in ``--out``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jax

from dualoptim_jax.models.tokenizer import Tokenizer
from dualoptim_jax.unlearn import placement, pretrained, report
from dualoptim_jax.unlearn.checkpoint import RunCheckpointer
from dualoptim_jax.unlearn.jsonable import jsonable
from dualoptim_jax.unlearn.tasks import Task
from dualoptim_jax.unlearn.trainer import unlearn

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


def _checkpoint_dir(cfg: Any, task: Task, preset: str, seed: int) -> Path | None:
  """``DIR/<preset>/seed<k>`` for TOFU (as before tasks existed), ``DIR/<task>/...`` otherwise."""
  if cfg.checkpoint_dir is None:
    return None
  root = Path(cfg.checkpoint_dir)
  return (root if task.name == "tofu" else root / task.name) / preset / f"seed{seed}"


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


def _one_run(
  task: Task, cfg: Any, base, tok, preset: str, seed: int, forget_updates: int, mesh, log
) -> tuple[dict[str, Any], dict[str, Any]]:
  """Unlearns with ``preset`` and ``seed`` on ``task`` and evaluates: (result, loss history)."""
  from dualoptim_jax.unlearn import cli

  batches0, batches1 = task.batches(tok, seed)
  path = _checkpoint_dir(cfg, task, preset, seed)
  checkpointer = None
  if path is not None:
    checkpointer = RunCheckpointer(
      path,
      every=cfg.checkpoint_every,
      keep=cfg.keep_checkpoints,
      resume=cfg.resume,
      fingerprint_extra=_fingerprint(cli, cfg, task, tok, seed),
      log=log,
    )
  out = unlearn(
    base,
    task.objective,
    batches0,
    batches1,
    preset=preset,
    num_updates=cli.num_updates(preset, forget_updates, cfg),
    mesh=mesh,
    checkpointer=checkpointer,
    **cli.recipe(cfg),
  )
  res = {**task.evaluate(out.model, tok), "seed": seed, **out.stability}
  log(f"[{preset} seed {seed}] {task.describe_run(res)}")
  return res, out.history.series()


def run_task(task: Task, cfg: Any, log=print) -> dict[str, Any]:
  """Runs the comparison of ``cfg`` on ``task`` and writes the report; returns results.json."""
  from dualoptim_jax.unlearn import cli  # the TOFU job's model cache and update counts

  t_start = time.perf_counter()
  log(task.summary())
  cache = cli._cache_dir(cfg)
  mesh = None if cfg.mesh is None else placement.make_mesh(cfg.mesh)
  if mesh is not None:
    log(f"mesh: {dict(mesh.shape)} over {mesh.size} devices (FSDP)")
  timings: dict[str, float] = {}
  t0 = time.perf_counter()
  start, tok, start_key = _start(task, cfg, cache, log)

  def tune(kind: str, items):
    if start is None:
      return cli.tuned_model(kind, items, tok, cfg, cache, log, mesh=mesh)
    return cli.tuned_model(
      kind, items, tok, cfg, cache, log, init=start, init_key=start_key, mesh=mesh
    )

  rows = task.initial_models(tune, start, tok)
  base = rows["Initial"]
  timings["models_s"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  task.prepare(tok, rows)
  results: dict[str, list[dict[str, Any]]] = {
    name: [task.evaluate(m, tok)] for name, m in rows.items()
  }
  for name, runs in results.items():
    log(f"[{name}] {task.describe_run(runs[0])}")
  timings["reference_eval_s"] = time.perf_counter() - t0

  forget_updates = cfg.steps or max(
    1, math.ceil(cfg.epochs * task.objective0_size / cfg.batch_size)
  )
  presets = list(cfg.presets)
  histories: dict[str, list[dict[str, Any]]] = {}
  for preset in presets:
    results[preset], histories[preset] = [], []
    t0 = time.perf_counter()
    for seed in cfg.seeds:
      res, history = _one_run(task, cfg, base, tok, preset, seed, forget_updates, mesh, log)
      results[preset].append(res)
      histories[preset].append(history)
    timings[f"{preset}_s"] = time.perf_counter() - t0

  timings["total_s"] = time.perf_counter() - t_start
  config = {
    **{k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()},
    "data": task.summary(),
    "objective": task.objective.name,
    "forget_updates": forget_updates,
    "presets_run": presets,
    "tokenizer_vocab": tok.vocab_size,
    "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, "
    f"jax devices {jax.devices()}",
    "timings": {k: round(v, 1) for k, v in timings.items()},
  }
  files = report.write_report(
    cfg.out,
    results,
    loss_histories=histories,
    config=config,
    title=task.title,
    columns=task.columns,
    legend=task.legend,
  )
  responses = _write_per_item(Path(cfg.out) / "per_item.jsonl", results)
  log(
    f"wrote {files.json}, {files.markdown}, {files.plot}, {responses} in {timings['total_s']:.0f}s"
  )
  return json.loads(files.json.read_text())
