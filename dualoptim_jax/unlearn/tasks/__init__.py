"""Tasks of the unlearning job: what is trained, towards which two objectives, and how it is scored.

A task turns its data into the two objectives' batches, evaluates a model, and names the columns
of its report; the trainer sees only an objective (two losses) and two batch iterators, so every
optimizer preset, seed, schedule and checkpoint setting of ``dualoptim-unlearn`` applies to every
task unchanged. The job (:func:`dualoptim_jax.unlearn.tasks.job.run_task`) drives any
:class:`Task`:

1. ``corpus()`` -- texts a built-in model's tokenizer is trained on;
2. ``initial_models(tune, start, tok)`` -- the rows evaluated before training (``"Initial"`` first, the
   model every run starts from), fine-tuned through ``tune(kind, items)`` where the task needs it;
3. ``prepare(tok, rows)`` -- anything the evaluation needs from those rows (e.g. the retain-only
   model's truth ratios for forget quality);
4. ``objective`` and ``batches(tok, seed)`` -- the two losses and their batch iterators;
5. ``evaluate(model, tok)`` -- one metric dict per model; ``columns`` / ``legend`` / ``title`` /
   ``tradeoff_axes`` -- the report;
6. ``summarize_half(result, which)`` -- the metrics of one half of the evaluation items, for the
   best setting per method and the paired comparison (optional).

Presets, ``--sweep``, ``--budget`` and ``--seeds`` are the job's, the same for every task; joint's
lr scales weight ``objective``'s coefficients (:func:`dualoptim_jax.unlearn.cli.run_objective`),
so an objective must be a dataclass with ``forget_coef`` and ``retain_coef`` fields.

Tasks (``--task``):

* ``tofu`` (:mod:`.tofu`) -- TOFU / built-in fictitious authors: forget one set, retain the rest
  (Table 1 of DualOptim);
* ``real_world`` (:mod:`.real_world`) -- forget facts about famous people, keep neighbouring
  knowledge and downstream skills (Table 2);
* ``safety`` (:mod:`.safety`) -- learn to refuse harmful instructions (objective 0) while staying
  helpful (objective 1) (Table 3).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

__all__ = ["TASKS", "Task", "Tuner", "make_task"]

TASKS: tuple[str, ...] = ("tofu", "real_world", "safety")

# tune(kind, items) -> a model fine-tuned on the (question, answer) items, cached by the job.
Tuner = Callable[[str, Sequence[Any]], Any]


class Task(abc.ABC):
  """One experiment of the job (see the package docstring)."""

  name: str = ""
  title: str = ""
  columns: tuple[tuple[str, str], ...] = ()
  legend: str = ""
  # ((x key, label), (y key, label)) of tradeoff.png (utility across, the task's goal up; both
  # higher-is-better), or None for no trade-off plot.
  tradeoff_axes: tuple[tuple[str, str], tuple[str, str]] | None = None

  @abc.abstractmethod
  def summary(self) -> str:
    """One line: the data and its sizes."""

  @property
  def data_name(self) -> str:
    """Names the data in checkpoint fingerprints (default: :meth:`summary`)."""
    return self.summary()

  @abc.abstractmethod
  def corpus(self) -> list[str]:
    """Every text the task uses (a built-in model's tokenizer is trained on it)."""

  @abc.abstractmethod
  def initial_models(self, tune: Tuner, start: Any, tok: Any) -> dict[str, Any]:
    """Rows evaluated before training, ``"Initial"`` first (the start of every run).

    ``start`` is the pretrained model of ``--model``, or None for a built-in model (then the
    task must fine-tune one with ``tune``).
    """

  def prepare(self, tok: Any, rows: Mapping[str, Any]) -> None:
    """Precomputes what :meth:`evaluate` needs from the initial rows (default: nothing)."""
    del tok, rows

  @property
  @abc.abstractmethod
  def objective(self) -> Any:
    """The two losses (``forget_loss`` = objective 0, ``retain_loss`` = objective 1)."""

  @abc.abstractmethod
  def batches(self, tok: Any, seed: int) -> tuple[Iterator, Iterator]:
    """Endless batch iterators of objective 0 and objective 1 for one seed."""

  @property
  @abc.abstractmethod
  def objective0_size(self) -> int:
    """Examples of objective 0 (``--epochs`` counts passes over them)."""

  @abc.abstractmethod
  def evaluate(self, model: Any, tok: Any) -> dict[str, Any]:
    """The task's metrics of one model (a flat dict; ``per_item`` is kept out of the table)."""

  def summarize_half(self, result: Mapping[str, Any], which: str) -> dict[str, Any] | None:
    """The task's metrics (``overall`` among them) on one half (``"validation"``: even items,
    ``"test"``: odd items, :func:`dualoptim_jax.unlearn.metrics.half`) of every evaluation set
    of ``result``, recomputed from its ``per_item`` outputs; the job picks each method's best
    swept value on the validation half and reports the test half and the paired comparison
    (:func:`dualoptim_jax.unlearn.cli.best_and_paired`). None (the default): the task's
    evaluation cannot be halved, and the report has no such sections."""
    del result, which
    return None

  def describe_run(self, result: Mapping[str, Any]) -> str:
    """One log line for a finished run (default: the columns' values)."""
    return ", ".join(
      f"{title.rstrip(' ↑↓')} {result[key]:.3f}"
      for key, title in self.columns
      if isinstance(result.get(key), float)
    )


def make_task(cfg: Any) -> Task:
  """The task of ``cfg.task`` (``tofu`` when absent), with its data loaded."""
  name = getattr(cfg, "task", "tofu")
  if name == "tofu":
    from dualoptim_jax.unlearn.tasks.tofu import TofuTask

    return TofuTask(cfg)
  if name == "real_world":
    from dualoptim_jax.unlearn.tasks.real_world import RealWorldTask

    return RealWorldTask(cfg)
  if name == "safety":
    from dualoptim_jax.unlearn.tasks.safety import SafetyTask

    return SafetyTask(cfg)
  raise ValueError(f"unknown task {name!r}; tasks are {', '.join(TASKS)}")
