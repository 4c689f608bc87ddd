"""Sweeps of the main job: one record per (preset, swept value, seed), written as it finishes.

``dualoptim-unlearn --sweep forget_lr_scale=0.5,1,2`` runs every preset and seed at each value, for
every ``--task`` (the loop: :func:`dualoptim_jax.unlearn.cli.sweep_runs`).
Each run's record, its evaluation (per-item outputs included), loss history, optimizer settings
and stability, is written to ``OUT/runs/<preset>/<name>=<value>/seed<k>.json`` the moment the run
ends, with a fingerprint of every setting that shapes it; rerunning the same command loads the
finished records instead of running them again, so a sweep can span sessions and a killed job
loses at most one run. A record written under other settings is refused, never overwritten.

From the records this module builds the report's pieces: the table rows, the trade-off curves,
the best setting per method (chosen on the validation half of the evaluation items by mean OVR,
reported on the other half, :func:`dualoptim_jax.unlearn.metrics.summarize_half`) and the paired
comparison of DualOptim+ against every baseline.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dualoptim_jax.unlearn import metrics, report
from dualoptim_jax.unlearn.jsonable import jsonable

__all__ = [
  "Sweep",
  "parse_sweep",
  "sweep_values",
  "label",
  "swept_value",
  "setting_dir",
  "record_path",
  "load_record",
  "save_record",
  "HalfSummary",
  "tofu_halves",
  "best_settings",
  "sections",
]

Sweep = tuple[str, tuple[float, ...]]
REFERENCE = "dualoptim_plus"  # the method the paired comparison is about


def parse_sweep(text: str) -> Sweep:
  """``"NAME=V1,V2,..."`` -> ``(name, (v1, v2, ...))``; dashes in the name read as underscores."""
  name, sep, values = text.partition("=")
  parsed = tuple(float(v) for v in values.split(",") if v.strip())
  if not sep or not name.strip() or not parsed:
    raise ValueError(text)
  return name.strip().replace("-", "_"), parsed


def sweep_values(sweep: Sweep | None) -> list[float | None]:
  """The swept values, or ``[None]`` (one setting) without a sweep."""
  return [None] if sweep is None else list(sweep[1])


def label(preset: str, sweep: Sweep | None, value: float | None) -> str:
  """The report row of a setting: ``preset`` or ``preset [name=value]``."""
  return preset if sweep is None or value is None else f"{preset} [{sweep[0]}={value:g}]"


def swept_value(cfg: Any) -> float | None:
  """The value of the swept flag in a run's config (one the sweep made, with ``name=value``
  replaced), or None without ``--sweep``."""
  return None if cfg.sweep is None else getattr(cfg, cfg.sweep[0])


def setting_dir(preset: str, sweep: Sweep | None, value: float | None) -> Path:
  """``<preset>[/<name>=<value>]``: where one setting's runs go, below ``OUT/runs`` (records)
  and ``--checkpoint-dir`` (checkpoints), so no two settings share a file."""
  base = Path(preset)
  return base if sweep is None or value is None else base / f"{sweep[0]}={value:g}"


def record_path(out: str | Path, preset: str, sweep: Sweep | None, value: float | None, seed: int):
  """``OUT/runs/<preset>[/<name>=<value>]/seed<k>.json``."""
  return Path(out) / "runs" / setting_dir(preset, sweep, value) / f"seed{seed}.json"


def load_record(path: Path, fingerprint: Mapping[str, Any]) -> dict[str, Any] | None:
  """The finished run at ``path``, or None if there is none.

  Raises:
    ValueError: the record was written by a run with other settings (named).
  """
  if not path.is_file():
    return None
  record = json.loads(path.read_text())
  saved, now = record.get("fingerprint", {}), jsonable(dict(fingerprint))
  diffs = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
  if diffs:
    shown = ", ".join(f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in diffs[:3])
    raise ValueError(
      f"{path} was written by a run with other settings ({shown}); choose another --out"
    )
  return record


def save_record(path: Path, record: Mapping[str, Any]) -> None:
  """Writes a run record atomically (a killed job leaves no half-written record)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(jsonable(dict(record)), allow_nan=False) + "\n")
  os.replace(tmp, path)


def _mean(runs: Sequence[Mapping[str, Any]], key: str) -> float:
  values = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
  return float(np.mean(values)) if values else -math.inf


HalfSummary = Callable[[Mapping[str, Any], str], dict[str, Any]]
"""``summarize(result, which) -> metrics``: a task's metrics (``overall`` among them) on one half
(``"validation"`` / ``"test"``, :func:`dualoptim_jax.unlearn.metrics.half`) of every evaluation
set of ``result``, from its per-item outputs."""


def tofu_halves(retain_only_ratios: Sequence[float] | None) -> HalfSummary:
  """TOFU's :data:`HalfSummary`: :func:`dualoptim_jax.unlearn.metrics.summarize_half`, forget
  quality against the retain-only model's truth ratios of the same half."""
  return lambda result, which: metrics.summarize_half(
    result, which, retain_only_truth_ratios=retain_only_ratios
  )


def best_settings(
  settings: Mapping[str, Sequence[tuple[float | None, Sequence[Mapping[str, Any]]]]],
  summarize: HalfSummary,
) -> dict[str, tuple[float | None, list[dict[str, Any]]]]:
  """Per method, the setting with the best mean OVR on the validation half, and its seeds'
  metrics on the test half (``summarize``, e.g. :func:`tofu_halves`):
  ``{method: (value, [test-half results])}``."""
  out = {}
  for method, options in settings.items():
    halves = {
      value: [
        {
          "validation": summarize(r, "validation"),
          "test": summarize(r, "test"),
          "seed": r.get("seed"),
        }
        for r in runs
      ]
      for value, runs in options
    }
    value = max(halves, key=lambda v: _mean([h["validation"] for h in halves[v]], "overall"))
    out[method] = (value, [{**h["test"], "seed": h["seed"]} for h in halves[value]])
  return out


def sections(
  best: Mapping[str, tuple[float | None, Sequence[Mapping[str, Any]]]],
  sweep: Sweep | None,
  references: Mapping[str, Sequence[Mapping[str, Any]]],
  columns: Sequence[tuple[str, str]] = report.TABLE_COLUMNS,
) -> tuple[list[str], dict[str, Any]]:
  """The results.md sections (best setting per method with ``columns``, paired comparison of
  OVR) and their JSON."""
  rows = {name: list(runs) for name, runs in references.items()}
  rows.update({label(m, sweep, v): list(runs) for m, (v, runs) in best.items()})
  name = "the value" if sweep is None else f"{sweep[0]}"
  text = [
    "Best setting per method: "
    + (
      f"{name} with the best mean OVR on the validation half of every evaluation set (even "
      "items), reported on the test half (odd items), so selection does not leak into the "
      "numbers:"
      if sweep
      else "(one setting; test half of every evaluation set):"
    )
    + "\n\n"
    + report.markdown_table(rows, columns)
  ]
  by_method = {m: list(runs) for m, (_, runs) in best.items()}
  doc: dict[str, Any] = {
    "best_settings": {m: {"value": v, "test_half": runs} for m, (v, runs) in best.items()}
  }
  if REFERENCE in by_method and len(by_method) > 1:
    comparisons = report.paired_comparison(by_method, REFERENCE)
    doc["paired_comparison"] = {"reference": REFERENCE, "metric": "overall", "rows": comparisons}
    text.append(
      f"Paired comparison on the test half at each method's best setting: {REFERENCE} minus the "
      "baseline, per seed, OVR (ours):\n\n" + report.comparison_markdown(comparisons, REFERENCE)
    )
  return text, doc
