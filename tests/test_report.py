"""Tests of dualoptim_jax.unlearn.report: results.json, results.md and the PNG."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from dualoptim_jax.unlearn import report as R
from dualoptim_jax.unlearn.jsonable import jsonable

COMPONENTS = {
  "model_utility": ["retain_prob", "retain_rouge"],
  "forget_efficacy": ["forget_prob", "forget_rouge", "1 - forget_truth_ratio"],
  "not_included": ["entailment_score"],
}


def _run(seed: int, *, fq=0.5, ufe=0.6):
  return {
    "seed": seed,
    "forget_prob": 0.1 * (seed + 1),
    "forget_rouge": 0.2,
    "forget_truth_ratio": 0.7,
    "forget_efficacy": ufe,
    "model_utility": 0.5,
    "forget_quality": fq,
    "overall": (ufe + 0.5) / 2,
    "components": COMPONENTS,
    "per_item": {"forget": {"truth_ratio": [0.1] * 1000}},
  }


def _results():
  return {
    "Initial": [_run(0, fq=None, ufe=0.2)],
    "joint": [_run(0), _run(1), _run(2, fq=2e-5)],
    "dualoptim_plus": [_run(0, fq=0.9), _run(1, fq=0.7)],
  }


def _histories():
  return {
    "joint": [
      {"forget": [3.0, 2.0, 1.0], "retain": [1.0, 0.9]},
      {"forget": [3.5, 2.5, 1.5], "retain": [1.1, 1.0]},
    ],
    # (step, value) pairs and seeds of different lengths are both accepted.
    "dualoptim_plus": [
      {"forget": [[0, 3.0], [6, 1.0]], "retain": [[1, 1.0], [2, 0.8], [3, 0.7]]},
      {"forget": [[0, 3.0]], "retain": [[1, 1.2]]},
    ],
  }


def test_seed_stats_sample_std_and_missing_values():
  stats = R.seed_stats([_run(0), _run(1), _run(2)])
  assert stats["forget_prob"].mean == pytest.approx(0.2)
  assert stats["forget_prob"].std == pytest.approx(0.1)  # sample std (ddof=1) of 0.1, 0.2, 0.3
  assert stats["forget_prob"].n == 3
  one = R.seed_stats([_run(0, fq=None)])
  assert one["forget_prob"].std is None
  assert "forget_quality" not in one  # None in every seed: no statistic at all
  partial = R.seed_stats([_run(0, fq=None), _run(1, fq=0.4), _run(2, fq=float("nan"))])
  assert partial["forget_quality"] == R.Stat(0.4, None, 1)


def test_format():
  assert R.format_value(0.123456) == "0.1235"
  assert R.format_value(2e-5) == "2.00e-05"
  assert R.format_value(0.0) == "0.0000"
  assert R.format_value(None) == "–" and R.format_value(float("nan")) == "–"
  assert R.format_stat(R.Stat(0.5, 0.01, 2)) == "0.5000 ± 0.0100"
  assert R.format_stat(R.Stat(0.5, None, 1)) == "0.5000"


def test_markdown_table_rows_columns_values():
  table = R.markdown_table(_results())
  lines = table.splitlines()
  header = [c.strip() for c in lines[0].strip("|").split("|")]
  assert header == ["Method", "Seeds"] + [title for _, title in R.TABLE_COLUMNS]
  assert len(lines) == 2 + 3
  rows = {
    line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
    for line in lines[2:]
  }
  assert list(rows) == ["Initial", "joint", "dualoptim_plus"]  # input order kept
  col = {key: i + 2 for i, (key, _) in enumerate(R.TABLE_COLUMNS)}
  assert rows["Initial"][1] == "1"
  assert rows["Initial"][col["forget_quality"]] == "–"
  assert rows["Initial"][col["forget_efficacy"]] == "0.2000"

  def cell(values):  # mean ± std [95 % Student-t interval], computed independently
    m, s = np.mean(values), np.std(values, ddof=1)
    lo, hi = stats.t.interval(0.95, len(values) - 1, loc=m, scale=s / np.sqrt(len(values)))
    return f"{m:.4f} ± {s:.4f} [{lo:.4f}, {hi:.4f}]"

  assert rows["joint"][col["forget_prob"]] == cell([0.1, 0.2, 0.3])
  assert rows["joint"][col["forget_prob"]].startswith("0.2000 ± 0.1000 [")
  assert rows["joint"][col["forget_quality"]] == cell([0.5, 0.5, 2e-5])
  assert rows["dualoptim_plus"][col["forget_quality"]] == cell([0.9, 0.7])


def test_write_report_files(tmp_path, capsys):
  files = R.write_report(
    tmp_path / "out",
    _results(),
    loss_histories=_histories(),
    config={"loss": "NPO+GD", "steps": 10},
  )
  # results.json: strict JSON (no NaN), per-item lists dropped, mean/std per row.
  doc = json.loads(
    files.json.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")
  )
  assert list(doc["rows"]) == ["Initial", "joint", "dualoptim_plus"]
  assert doc["columns"] == [key for key, _ in R.TABLE_COLUMNS]
  assert doc["components"] == COMPONENTS
  assert doc["config"] == {"loss": "NPO+GD", "steps": 10}
  joint = doc["rows"]["joint"]
  assert len(joint["seeds"]) == 3 and "per_item" not in joint["seeds"][0]
  assert joint["mean"]["forget_prob"] == pytest.approx(0.2)
  assert joint["std"]["forget_prob"] == pytest.approx(0.1)
  assert doc["rows"]["Initial"]["seeds"][0]["forget_quality"] is None
  assert doc["loss_histories"]["joint"][1]["forget"] == [3.5, 2.5, 1.5]
  # results.md: title, the same table, legend, components, config.
  md = files.markdown.read_text()
  assert md.startswith("# Unlearning results\n")
  assert R.markdown_table(_results()) in md
  assert "closer-look components not included: entailment_score" in md
  assert "- loss: NPO+GD" in md
  # results.png: a real PNG image.
  png = files.plot.read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
  # stdout carries the table.
  assert R.markdown_table(_results()) in capsys.readouterr().out


def test_plot_without_histories(tmp_path):
  path = R.plot_results(tmp_path / "p.png", {"only": [_run(0)]})
  assert path.read_bytes()[:4] == b"\x89PNG"


def test_jsonable_numpy_and_nan():
  doc = jsonable(
    {
      "a": np.float32(0.5),
      "b": np.array([1, 2]),
      "c": math.inf,
      "d": (np.int64(3),),
      "e": np.bool_(True),
    }
  )
  assert doc == {"a": 0.5, "b": [1, 2], "c": None, "d": [3], "e": True}
  json.dumps(doc, allow_nan=False)


def test_write_report_rejects_empty(tmp_path):
  with pytest.raises(ValueError, match="empty"):
    R.write_report(tmp_path, {})
  with pytest.raises(ValueError, match="row 'joint' has no runs"):
    R.write_report(tmp_path, {"joint": []})


def test_format_stat_std_follows_mean_notation():
  assert R.format_stat(R.Stat(0.2, 3.4e-17, 3)) == "0.2000 ± 0.0000"
  assert R.format_stat(R.Stat(2e-5, 1e-5, 3)) == "2.00e-05 ± 1.00e-05"


def test_histories_with_series_method(tmp_path):
  class History:  # the shape of trainer.LossHistory: series() -> {name: [(update, loss), ...]}
    def series(self):
      return {"forget": [(0, 2.0), (6, 1.5)], "retain": [(1, 1.0), (2, 0.9)]}

  files = R.write_report(
    tmp_path, {"joint": [_run(0)]}, loss_histories={"joint": [History()]}, echo=False
  )
  doc = json.loads(files.json.read_text())
  assert doc["loss_histories"]["joint"][0]["forget"] == [[0, 2.0], [6, 1.5]]
  assert files.plot.read_bytes()[:4] == b"\x89PNG"


def test_paired_comparison_by_hand():
  results = {
    "dualoptim_plus": [{"seed": s, "overall": v} for s, v in ((0, 0.6), (1, 0.7), (2, 0.65))],
    "joint": [{"seed": s, "overall": v} for s, v in ((0, 0.5), (1, 0.62), (2, 0.5))],
    "Initial": [{"overall": 0.3}],  # no seed in common: left out
  }
  (c,) = R.paired_comparison(results, "dualoptim_plus")
  d = [0.1, 0.08, 0.15]
  assert c["baseline"] == "joint" and c["seeds"] == 3
  assert c["mean_difference"] == pytest.approx(np.mean(d))
  assert c["p_value"] == pytest.approx(stats.ttest_1samp(d, 0.0).pvalue)
  assert c["ci"][0] < np.mean(d) < c["ci"][1]
  assert "| joint | 3 | +0.1100 |" in R.comparison_markdown([c], "dualoptim_plus")


def test_pareto_front_and_tradeoff_plot(tmp_path):
  assert R.pareto_front([(0.5, 0.5), (0.6, 0.4), (0.4, 0.4), (0.5, 0.6)]) == [1, 3]
  runs = lambda mu, ufe: [{"model_utility": mu + e, "forget_efficacy": ufe - e} for e in (0, 0.02)]
  curves = {"a": [("x=1", runs(0.5, 0.5)), ("x=2", runs(0.4, 0.7))], "b": [("x=1", runs(0.3, 0.3))]}
  png = R.plot_tradeoff(tmp_path / "t.png", curves).read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
