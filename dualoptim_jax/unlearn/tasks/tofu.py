"""The TOFU task (and the base of every forget/retain unlearning task).

Data: the built-in synthetic TOFU, or a TOFU split of ``--data-dir`` (``--split``, ``--task-id``),
through :func:`dualoptim_jax.unlearn.cli.load_data`. Objectives: the forget loss on the forget
set (0) and the retain loss on the retain set (1) of ``--loss`` (``IDK+AP`` by default). Initial
rows: the model fine-tuned on everything (``Initial``, the start of every run) and the model
fine-tuned without the forget set (``Retain-only``, the reference of forget quality). Metrics:
:func:`dualoptim_jax.unlearn.metrics.evaluate` (UFE, MU, FQ, OVR), plus downstream accuracy for the
``--downstream`` sets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dualoptim_jax.unlearn import data as D
from dualoptim_jax.unlearn import metrics, pretrained, report
from dualoptim_jax.unlearn.losses import make_objective
from dualoptim_jax.unlearn.tasks import Task, Tuner
from dualoptim_jax.unlearn.tasks import downstream as DS

__all__ = ["UnlearningTask", "TofuTask", "downstream_columns"]


def downstream_columns(specs: Sequence[DS.DownstreamSpec]) -> tuple[tuple[str, str], ...]:
  """Report columns of the downstream sets (accuracy, higher is better)."""
  return tuple((f"downstream_{s.name}", f"{s.name} ↑") for s in specs)


class UnlearningTask(Task):
  """Forget ``data.forget``, retain ``data.retain``; TOFU / closer-look metrics.

  Args:
    cfg: the run settings (``RunConfig``).
    data: the task's data; with ``cfg.model`` it is cut to ``--forget-items`` /
      ``--retain-items`` (:func:`dualoptim_jax.unlearn.pretrained.subset`).
  """

  name = "tofu"
  legend = report.LEGEND
  tradeoff_axes = report.TRADEOFF_AXES

  def __init__(self, cfg: Any, data: D.UnlearningData):
    if cfg.model is not None:
      data = pretrained.subset(data, cfg.forget_items, cfg.retain_items)
    self.cfg = cfg
    self.data = data
    self.specs = DS.parse_specs(getattr(cfg, "downstream", None))
    self.columns = report.TABLE_COLUMNS + downstream_columns(self.specs)
    self._objective = make_objective(cfg.loss, cfg.forget_coef, cfg.retain_coef, cfg.beta)
    self.title = f"Unlearning {data.name} with {self._objective.name}"
    self._ratios: np.ndarray | None = None
    self._downstream_items: dict[str, list] = {}

  def summary(self) -> str:
    return self.data.summary()

  @property
  def data_name(self) -> str:
    return self.data.name

  def corpus(self) -> list[str]:
    from dualoptim_jax.unlearn.cli import corpus

    return corpus(self.data)

  def general_knowledge(self) -> list[D.QAItem]:
    """Items a built-in model also learns, standing in for a pretrained model's knowledge."""
    return self.data.real_authors + self.data.world_facts

  def initial_models(self, tune: Tuner, start: Any, tok: Any) -> dict[str, Any]:
    del tok
    general = self.general_knowledge() if start is None else []
    data = self.data
    return {
      "Initial": tune("full", data.forget + data.retain + general),
      "Retain-only": tune("retain", data.retain + general),
    }

  def prepare(self, tok: Any, rows: Mapping[str, Any]) -> None:
    reference = self._evaluate(rows["Retain-only"], tok, None)
    self._ratios = np.asarray(reference["per_item"]["forget"]["truth_ratio"])

  @property
  def objective(self) -> Any:
    return self._objective

  @property
  def objective0_size(self) -> int:
    return len(self.data.forget)

  def batches(self, tok: Any, seed: int) -> tuple[D.BatchIterator, D.BatchIterator]:
    cfg, data = self.cfg, self.data
    forget = D.tokenize_unlearning_set(
      tok, data.forget, data.idk_answers, cfg.max_len, seed=2 * seed
    )
    retain = D.tokenize_unlearning_set(
      tok, data.retain, data.idk_answers, cfg.max_len, seed=2 * seed + 1
    )
    return (
      D.BatchIterator(forget, cfg.batch_size, seed=2 * seed),
      D.BatchIterator(retain, cfg.batch_size, seed=2 * seed + 1),
    )

  def _evaluate(self, model: Any, tok: Any, ratios: np.ndarray | None) -> dict[str, Any]:
    from dualoptim_jax.unlearn.cli import evaluation_settings  # the TOFU job's settings

    return metrics.evaluate(
      model, tok, self.data, retain_only_truth_ratios=ratios, **evaluation_settings(self.cfg)
    )

  def evaluate(self, model: Any, tok: Any) -> dict[str, Any]:
    from dualoptim_jax.unlearn.cli import evaluation_settings

    out = self._evaluate(model, tok, self._ratios)
    if self.specs:
      cfg = self.cfg
      logprob_fn, generate_fn = metrics.model_fns(
        model,
        tok,
        max_new_tokens=evaluation_settings(cfg)["max_new_tokens"],
        max_len=cfg.max_len,
      )
      res = DS.evaluate_downstream(
        self.specs,
        logprob_fn,
        generate_fn,
        max_items=getattr(cfg, "downstream_items", None) or cfg.eval_items,
        loaded=self._downstream_items,
      )
      out["per_item"]["downstream"] = res.pop("downstream_details")
      out.update(res)
    return out

  def summarize_half(self, result: Mapping[str, Any], which: str) -> dict[str, Any]:
    """:func:`dualoptim_jax.unlearn.metrics.summarize_half` (forget quality against the
    retain-only model's ratios of the same half) and the downstream accuracies of the half."""
    per_item = {k: v for k, v in result["per_item"].items() if k != "downstream"}
    ratios = None if self._ratios is None else self._ratios.tolist()
    out = metrics.summarize_half({"per_item": per_item}, which, retain_only_truth_ratios=ratios)
    return {**out, **DS.half_accuracies(result["per_item"].get("downstream", {}), which)}

  def describe_run(self, result: Mapping[str, Any]) -> str:
    return (
      f"forget prob {result['forget_prob']:.3f}, UFE {result['forget_efficacy']:.3f}, "
      f"MU {result['model_utility']:.3f}, FQ {result['forget_quality']:.3g}"
    )


class TofuTask(UnlearningTask):
  """TOFU: the data of ``--data-dir`` / ``--split`` / ``--task-id``, or the built-in synthetic set."""

  name = "tofu"

  def __init__(self, cfg: Any):
    from dualoptim_jax.unlearn.cli import load_data

    super().__init__(cfg, load_data(cfg))
