"""The task job's best setting per method and paired comparison (the TOFU job's, on a task's
halves)."""

import numpy as np
import pytest

from dualoptim_jax.unlearn import cli, metrics
from dualoptim_jax.unlearn.tasks import Task, job


class UnhalvedTask(Task):
  """A task that keeps the default summarize_half (no halves)."""

  columns = (("overall", "OVR ↑"),)
  summary = corpus = initial_models = objective = batches = objective0_size = evaluate = None


class HalvedTask(UnhalvedTask):
  """A task whose OVR is the mean of one per-item list."""

  def summarize_half(self, result, which):
    x = np.asarray(result["per_item"]["x"])
    return {"overall": float(x[metrics.half(x.size, which)].mean())}


def _records(validation, test, shift=0.02, seeds=(0, 1)):
  """Per-seed records whose items are (validation, test); seed s adds s * shift to the test item."""
  return [{"result": {"seed": s, "per_item": {"x": [validation, test + shift * s]}}} for s in seeds]


def test_best_setting_is_chosen_on_validation_and_reported_on_test():
  cfg = cli.RunConfig(sweep=("forget_lr_scale", (0.5, 2.0)))
  runs = {  # the best value on validation is the worse one on test: it must still be chosen
    "joint": [(0.5, _records(0.9, 0.1)), (2.0, _records(0.5, 0.8))],
    "dualoptim_plus": [(0.5, _records(0.2, 0.9)), (2.0, _records(0.6, 0.3, shift=0.05))],
  }
  references = {"Initial": [{"seed": None, "per_item": {"x": [0.4, 0.7]}}]}
  halves = job._halves(HalvedTask(), cfg)
  sections, doc = job._best_and_paired(HalvedTask(), references, runs, cfg, halves)
  best = doc["best_settings"]
  assert best["joint"]["value"] == 0.5 and best["dualoptim_plus"]["value"] == 2.0
  assert [r["overall"] for r in best["joint"]["test_half"]] == pytest.approx([0.1, 0.12])
  (row,) = doc["paired_comparison"]["rows"]
  assert row["baseline"] == "joint" and row["seeds"] == 2
  assert row["differences"] == pytest.approx([0.3 - 0.1, 0.35 - 0.12])
  text = "\n".join(sections)
  assert "| Initial | 1 | 0.700" in text  # the reference row's test half
  assert "dualoptim_plus [forget_lr_scale=2]" in text and "Paired comparison" in text


def test_no_sections_without_halves_or_with_one_evaluation_item():
  references = {"Initial": [{"seed": None, "per_item": {"x": [0.4, 0.7]}}]}
  runs = {"joint": [(None, _records(0.9, 0.1))]}
  cfg = cli.RunConfig()
  unhalved = job._halves(UnhalvedTask(), cfg)
  assert job._best_and_paired(UnhalvedTask(), references, runs, cfg, unhalved) == ([], {})
  halves = job._halves(HalvedTask(), cfg)
  assert job._best_and_paired(HalvedTask(), references, runs, cfg, halves)[1]["best_settings"]
  logged = []
  one = cli.RunConfig(eval_items=1)
  none = job._halves(HalvedTask(), one, logged.append)
  assert job._best_and_paired(HalvedTask(), references, runs, one, none) == ([], {})
  assert "no test half" in logged[0]
