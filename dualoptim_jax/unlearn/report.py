"""Write the results of an unlearning comparison: results.json, results.md and a PNG plot.

Input is ``{row: [per-seed metric dicts]}`` (the dicts :func:`dualoptim_jax.unlearn.metrics.evaluate`
returns; rows in display order, e.g. ``"Initial"`` then one per optimizer preset) and optional
loss histories ``{row: [per-seed {series name: losses}]}``. The markdown table mirrors Table 1 of
DualOptim (Zhong et al., 2025): mean ± sample standard deviation over seeds (``ddof=1``, as the
authors' ``parse_output.py`` computes with pandas).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from scipy import stats as scipy_stats

from dualoptim_jax.unlearn.jsonable import jsonable

# (result key, column header) of the Table-1-style summary.
TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
  ("forget_prob", "Forget Prob. ↓"),
  ("forget_rouge", "Forget ROUGE ↓"),
  ("forget_truth_ratio", "Forget TR"),
  ("forget_efficacy", "UFE ↑"),
  ("model_utility", "MU ↑"),
  ("forget_quality", "FQ ↑"),
  ("overall", "OVR (ours) ↑"),
)
# Per-run stability of the optimizer (Unlearner.stability).
STABILITY_COLUMNS: tuple[tuple[str, str], ...] = (
  ("max_update_ratio", "max abs(update) / lr"),
  ("elements_over_10x_lr", "elements > 10 lr"),
)
# Per-item outputs are large and belong to one evaluation, not to the comparison.
_DROPPED_KEYS: frozenset[str] = frozenset({"per_item"})


class Stat(NamedTuple):
  """Mean, sample standard deviation and 95 % confidence interval of one metric over seeds."""

  mean: float | None  # None when no seed has the value
  std: float | None  # None for fewer than two values
  n: int  # number of seeds with a value
  ci_low: float | None = None  # mean -/+ t_{0.975, n-1} std / sqrt(n); None for n < 2
  ci_high: float | None = None


def confidence_interval(values: Any, level: float = 0.95) -> tuple[float, float] | None:
  """Student-t interval ``mean -/+ t_{(1+level)/2, n-1} s / sqrt(n)`` of the mean (None, n < 2)."""
  v = np.asarray(values, np.float64)
  if v.size < 2:
    return None
  half = scipy_stats.t.ppf((1 + level) / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size)
  return float(v.mean() - half), float(v.mean() + half)


class ReportFiles(NamedTuple):
  """Paths of the written files."""

  json: Path
  markdown: Path
  plot: Path


def seed_stats(runs: Sequence[Mapping[str, Any]]) -> dict[str, Stat]:
  """Mean ± sample std (``ddof=1``) over seeds of every numeric top-level value.

  Values that are ``None`` or non-finite in a seed (forget quality without a retain-only model)
  are left out of that value's statistics rather than poisoning them.
  """
  keys = [k for run in runs for k, v in run.items() if _is_number(v)]
  out: dict[str, Stat] = {}
  for key in dict.fromkeys(keys):
    vals = np.array([float(run[key]) for run in runs if _is_number(run.get(key))], np.float64)
    vals = vals[np.isfinite(vals)]
    mean = float(vals.mean()) if vals.size else None
    std = float(vals.std(ddof=1)) if vals.size > 1 else None
    out[key] = Stat(mean, std, int(vals.size), *(confidence_interval(vals) or (None, None)))
  return out


def _is_number(v: Any) -> bool:
  return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def format_value(x: float | None) -> str:
  """Four decimals; scientific notation for small non-zero values (forget quality); "–" for none."""
  if x is None or not math.isfinite(x):
    return "–"
  if x != 0 and abs(x) < 1e-3:
    return f"{x:.2e}"
  return f"{x:.4f}"


def format_stat(stat: Stat | None) -> str:
  """``mean ± std [ci_low, ci_high]`` (just ``mean`` for a single seed); std and interval take
  the mean's notation."""
  if stat is None or stat.mean is None:
    return "–"
  mean = format_value(stat.mean)
  if stat.std is None:
    return mean
  # A round-off std (1e-17) must not switch to scientific notation beside a plain mean.
  fmt = (lambda x: f"{x:.2e}") if "e" in mean else (lambda x: f"{x:.4f}")
  if stat.ci_low is None or stat.ci_high is None:
    return f"{mean} ± {fmt(stat.std)}"
  return f"{mean} ± {fmt(stat.std)} [{fmt(stat.ci_low)}, {fmt(stat.ci_high)}]"


def markdown_table(
  results: Mapping[str, Sequence[Mapping[str, Any]]],
  columns: Sequence[tuple[str, str]] = TABLE_COLUMNS,
) -> str:
  """A markdown table: one row per ``results`` entry, one column per ``columns`` entry."""
  header = ["Method", "Seeds"] + [title for _, title in columns]
  lines = [
    "| " + " | ".join(header) + " |",
    "|" + "|".join([" --- "] + [" ---: "] * (len(header) - 1)) + "|",
  ]
  for row, runs in results.items():
    stats = seed_stats(runs)
    cells = [str(row), str(len(runs))] + [format_stat(stats.get(key)) for key, _ in columns]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _components(results: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, Any] | None:
  for runs in results.values():
    for run in runs:
      if "components" in run:
        return run["components"]
  return None


def _components_note(components: Mapping[str, Any] | None) -> str:
  if not components:
    return ""
  lines = [
    "Components:",
    f"- MU = harmonic mean of {', '.join(components.get('model_utility', []))}",
    f"- UFE = 1 − mean of {', '.join(components.get('forget_efficacy', []))}",
  ]
  if components.get("not_included"):
    lines.append(
      f"- closer-look components not included: {', '.join(components['not_included'])} "
      "(see docs/metrics.md)"
    )
  return "\n".join(lines)


_LEGEND = (
  "Forget Prob. = mean p(a|q)^(1/|a|) on the forget set; Forget ROUGE = ROUGE-L recall of greedy "
  "answers; Forget TR = TOFU's mean min(R, 1/R) (1 = cannot tell right from wrong answers); "
  "UFE = untargeted forget efficacy; MU = model utility; FQ = forget quality (KS-test p-value "
  "against the retain-only model); OVR (ours) = (UFE + MU) / 2 over the components listed below: "
  "our summary, not the paper's OVR, which also counts embedding and entailment scores. Cells: "
  "mean ± sample std [95 % Student-t confidence interval of the mean] over seeds."
)


LEGEND = _LEGEND  # the TOFU table's legend (tasks with other columns pass their own)


def paired_comparison(
  results: Mapping[str, Sequence[Mapping[str, Any]]],
  reference: str,
  *,
  metric: str = "overall",
) -> list[dict[str, Any]]:
  """``reference`` against every other row, paired by seed: per-seed differences of ``metric``
  (reference minus baseline), their mean, 95 % CI and the two-sided paired t-test p-value
  (``scipy.stats.ttest_rel``; None with fewer than two paired seeds)."""
  mine = {run.get("seed"): run.get(metric) for run in results[reference]}
  out = []
  for row, runs in results.items():
    if row == reference:
      continue
    candidates: list[tuple[Any, Any]] = [
      (mine[r.get("seed")], r.get(metric)) for r in runs if r.get("seed") in mine
    ]
    pairs = [(float(a), float(b)) for a, b in candidates if _is_number(a) and _is_number(b)]
    if not pairs:
      continue
    diffs = [a - b for a, b in pairs]
    p = None
    if len(pairs) > 1 and np.std(diffs) > 0:
      p = float(scipy_stats.ttest_rel([a for a, _ in pairs], [b for _, b in pairs]).pvalue)
    ci = confidence_interval(diffs)
    out.append(
      {
        "baseline": row,
        "seeds": len(pairs),
        "differences": diffs,
        "mean_difference": float(np.mean(diffs)),
        "ci": list(ci) if ci else None,
        "p_value": p,
      }
    )
  return out


def comparison_markdown(comparisons: Sequence[Mapping[str, Any]], reference: str) -> str:
  """A markdown table of :func:`paired_comparison`."""
  lines = [
    f"| {reference} vs | Seeds | Mean OVR difference | 95 % CI | p (paired t) |",
    "| --- | ---: | ---: | ---: | ---: |",
  ]
  for c in comparisons:
    ci = "–" if c["ci"] is None else f"[{c['ci'][0]:.4f}, {c['ci'][1]:.4f}]"
    p = "–" if c["p_value"] is None else f"{c['p_value']:.3g}"
    lines.append(f"| {c['baseline']} | {c['seeds']} | {c['mean_difference']:+.4f} | {ci} | {p} |")
  return "\n".join(lines)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
  """Indices of the points no other point beats on both coordinates (higher is better)."""
  return [
    i
    for i, (x, y) in enumerate(points)
    if not any((a >= x and b >= y) and (a > x or b > y) for a, b in points)
  ]


TradeoffAxes = tuple[tuple[str, str], tuple[str, str]]
"""``((x key, x label), (y key, y label))`` of a trade-off plot: utility across, forgetting up."""
TRADEOFF_AXES: TradeoffAxes = (
  ("model_utility", "model utility (MU) ↑"),
  ("forget_efficacy", "forget efficacy (UFE) ↑"),
)


def plot_tradeoff(
  path: str | Path,
  curves: Mapping[str, Sequence[tuple[str, Sequence[Mapping[str, Any]]]]],
  *,
  axes: TradeoffAxes = TRADEOFF_AXES,
) -> Path:
  """PNG: forget efficacy (UFE) against model utility (or the ``axes`` of another task, both
  higher-is-better), one curve per method through its settings (``curves = {method: [(setting
  label, per-seed results), ...]}``), mean ± std over seeds as error bars, the Pareto front of
  all settings' means marked."""
  (x, x_label), (y, y_label) = axes
  from matplotlib.figure import Figure

  fig = Figure(figsize=(7, 5.5), layout="constrained")
  ax = fig.subplots()
  means: list[tuple[float, float]] = []
  for i, (method, settings) in enumerate(curves.items()):
    xs, ys, xe, ye = [], [], [], []
    for label, runs in settings:
      sx, sy = seed_stats(runs).get(x), seed_stats(runs).get(y)
      if sx is None or sy is None or sx.mean is None or sy.mean is None:
        continue
      xs.append(sx.mean)
      ys.append(sy.mean)
      xe.append(sx.std or 0.0)
      ye.append(sy.std or 0.0)
      means.append((sx.mean, sy.mean))
      ax.annotate(
        label, (sx.mean, sy.mean), fontsize="x-small", xytext=(3, 3), textcoords="offset points"
      )
    ax.errorbar(xs, ys, xerr=xe, yerr=ye, marker="o", capsize=2, label=method, color=f"C{i % 10}")
  front = sorted(means[i] for i in pareto_front(means))
  if front:
    ax.plot(*zip(*front), "k--", lw=1, label="Pareto front")
    ax.scatter(*zip(*front), s=150, facecolors="none", edgecolors="k")
  ax.set_xlabel(x_label)
  ax.set_ylabel(y_label)
  ax.set_title("Trade-off: mean ± std over seeds")
  ax.legend(fontsize="small")
  path = Path(path)
  fig.savefig(path, dpi=110)
  return path


def render_markdown(
  results: Mapping[str, Sequence[Mapping[str, Any]]],
  *,
  title: str = "Unlearning results",
  config: Mapping[str, Any] | None = None,
  sections: Sequence[str] = (),
  columns: Sequence[tuple[str, str]] = TABLE_COLUMNS,
  legend: str = _LEGEND,
) -> str:
  """The whole results.md: title, table, stability, ``sections`` (best settings, comparisons),
  legend, included components and the run configuration."""
  parts = [f"# {title}", markdown_table(results, columns)]
  if any(key in run for runs in results.values() for run in runs for key, _ in STABILITY_COLUMNS):
    parts.append("Stability of the updates:\n\n" + markdown_table(results, STABILITY_COLUMNS))
  parts += [*sections, legend]
  note = _components_note(_components(results))
  if note:
    parts.append(note)
  if config:
    parts.append("Configuration:\n" + "\n".join(f"- {k}: {v}" for k, v in config.items()))
  return "\n\n".join(parts) + "\n"


def results_json(
  results: Mapping[str, Sequence[Mapping[str, Any]]],
  *,
  loss_histories: Mapping[str, Sequence[Any]] | None = None,
  config: Mapping[str, Any] | None = None,
  columns: Sequence[tuple[str, str]] = TABLE_COLUMNS,
) -> dict[str, Any]:
  """The results.json document: per row the seeds' metrics (per-item lists dropped) and their mean/std."""
  rows = {}
  for row, runs in results.items():
    stats = seed_stats(runs)
    rows[row] = {
      "seeds": [{k: v for k, v in run.items() if k not in _DROPPED_KEYS} for run in runs],
      "mean": {k: s.mean for k, s in stats.items()},
      "std": {k: s.std for k, s in stats.items()},
      "ci95": {k: None if s.ci_low is None else [s.ci_low, s.ci_high] for k, s in stats.items()},
    }
  doc = {
    "columns": [key for key, _ in columns],
    "components": _components(results),
    "config": dict(config or {}),
    "rows": rows,
    "loss_histories": _histories(loss_histories),
  }
  return jsonable(doc)


def _histories(
  loss_histories: Mapping[str, Sequence[Any]] | None,
) -> dict[str, list[dict[str, Any]]]:
  """Per-seed histories as ``{series: values}`` dicts; objects with ``.series()`` (the trainer's
  ``LossHistory``) are converted, so results can be reported straight from training."""
  return {
    str(row): [dict(h.series()) if hasattr(h, "series") else dict(h) for h in runs]
    for row, runs in (loss_histories or {}).items()
  }


def _series_xy(series: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
  """A loss series as (x, y): plain values are indexed 0..n-1, (step, value) pairs keep their steps."""
  arr = np.asarray(series, np.float64)
  if arr.ndim == 2 and arr.shape[1] == 2:
    return arr[:, 0], arr[:, 1]
  return np.arange(arr.size, dtype=np.float64), arr.reshape(-1)


def plot_results(
  path: str | Path,
  results: Mapping[str, Sequence[Mapping[str, Any]]],
  loss_histories: Mapping[str, Sequence[Any]] | None = None,
  columns: Sequence[tuple[str, str]] = TABLE_COLUMNS,
) -> Path:
  """PNG: grouped metric bars per row (± std), then one panel per loss series (forget, retain, ...).

  Uses the Agg canvas directly (``matplotlib.figure.Figure``), never pyplot's global state, so it
  works headless and from threads. Seeds of equal length are averaged (mean line, ±std band);
  otherwise each seed is drawn.
  """
  from matplotlib.figure import Figure

  histories = {k: v for k, v in _histories(loss_histories).items() if v}
  series_names = list(
    dict.fromkeys(name for runs in histories.values() for h in runs for name in h)
  )
  # forget first, then retain, then anything else, so panels read like the table.
  series_names.sort(key=lambda n: 0 if "forget" in n else 1 if "retain" in n else 2)
  n_panels = 1 + len(series_names)
  fig = Figure(figsize=(6.5 + 4.5 * len(series_names), 4.5), layout="constrained")
  axes = fig.subplots(1, n_panels, squeeze=False, width_ratios=[1.5] + [1] * len(series_names))[0]

  ax = axes[0]
  rows = list(results)
  # One colour per row in every panel.
  colors = {row: f"C{i % 10}" for i, row in enumerate(dict.fromkeys(rows + list(histories)))}
  width = 0.8 / max(len(rows), 1)
  x = np.arange(len(columns))
  for i, row in enumerate(rows):
    stats = seed_stats(results[row])
    means = [
      stats[k].mean if k in stats and stats[k].mean is not None else np.nan for k, _ in columns
    ]
    stds = [stats[k].std if k in stats and stats[k].std is not None else 0.0 for k, _ in columns]
    ax.bar(
      x + (i - (len(rows) - 1) / 2) * width,
      means,
      width,
      yerr=stds,
      label=str(row),
      capsize=2,
      color=colors[row],
    )
  ax.set_xticks(x, [title for _, title in columns], rotation=30, ha="right")
  ax.set_ylim(0, 1.05)
  ax.set_title("Metrics (mean ± std over seeds)")
  ax.legend(fontsize="small")

  for ax, name in zip(axes[1:], series_names):
    for row, runs in histories.items():
      curves = [_series_xy(h[name]) for h in runs if name in h and len(h[name])]
      if not curves:
        continue
      if len({c[1].size for c in curves}) == 1:
        xs, ys = curves[0][0], np.stack([c[1] for c in curves])
        ax.plot(xs, ys.mean(0), label=str(row), color=colors[row])
        if len(curves) > 1:
          ax.fill_between(
            xs, ys.mean(0) - ys.std(0), ys.mean(0) + ys.std(0), alpha=0.2, color=colors[row]
          )
      else:
        for j, (xs, ys) in enumerate(curves):
          ax.plot(xs, ys, color=colors[row], label=str(row) if j == 0 else None)
    ax.set_title(f"{name} loss")
    ax.set_xlabel("step")
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize="small")

  path = Path(path)
  fig.savefig(path, dpi=110)
  return path


def write_report(
  out_dir: str | Path,
  results: Mapping[str, Sequence[Mapping[str, Any]]],
  *,
  loss_histories: Mapping[str, Sequence[Any]] | None = None,
  config: Mapping[str, Any] | None = None,
  title: str = "Unlearning results",
  echo: bool = True,
  sections: Sequence[str] = (),
  extra_json: Mapping[str, Any] | None = None,
  tradeoff: Mapping[str, Sequence[tuple[str, Sequence[Mapping[str, Any]]]]] | None = None,
  columns: Sequence[tuple[str, str]] = TABLE_COLUMNS,
  legend: str = _LEGEND,
  tradeoff_axes: TradeoffAxes = TRADEOFF_AXES,
) -> ReportFiles:
  """Write ``results.json``, ``results.md`` and ``results.png`` into ``out_dir`` (created).

  Args:
    out_dir: destination folder.
    results: ``{row: [per-seed metric dicts]}``, rows in display order (e.g. ``"Initial"`` first).
    loss_histories: ``{row: [per-seed {series: losses}]}``; a series is a list of floats (indexed
      by its own step count) or of ``(step, value)`` pairs, e.g. ``{"forget": [...], "retain": [...]}``;
      an object with a ``series()`` method giving such a dict (``trainer.LossHistory``) works too.
    config: run settings recorded in both the JSON and the markdown.
    title: markdown heading.
    echo: print the table (with its legend) to stdout.
    sections: more markdown sections (best settings, paired comparisons), after the tables.
    extra_json: more top-level entries of results.json.
    tradeoff: ``{method: [(setting, per-seed results), ...]}``: also writes ``tradeoff.png``
      (:func:`plot_tradeoff`).
    tradeoff_axes: the trade-off plot's axes (default: MU across, UFE up).
    columns: ``(result key, header)`` of the table and the plot (default: the TOFU columns).
    legend: the text under the table.
  """
  if not results:
    raise ValueError("results is empty: nothing to report")
  for row, runs in results.items():
    if not runs:
      raise ValueError(f"row {row!r} has no runs")
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  files = ReportFiles(out / "results.json", out / "results.md", out / "results.png")
  doc = {**results_json(results, loss_histories=loss_histories, config=config, columns=columns)}
  doc.update(jsonable(dict(extra_json or {})))
  files.json.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
  markdown = render_markdown(
    results, title=title, config=config, sections=sections, columns=columns, legend=legend
  )
  files.markdown.write_text(markdown)
  plot_results(files.plot, results, loss_histories, columns)
  if tradeoff:
    plot_tradeoff(out / "tradeoff.png", tradeoff, axes=tradeoff_axes)
  if echo:
    print(markdown_table(results, columns))
    print()
    print(legend)
  return files
