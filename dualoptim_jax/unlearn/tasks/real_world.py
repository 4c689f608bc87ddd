"""Real-world unlearning (DualOptim Table 2): forget facts about famous people, keep the neighbours.

Data (``real_world/`` of ``--data-dir``): ``forget.json`` / ``forget_perturbed.json`` (400 QA about
20 people; ``--task-id`` keeps one person) and ``neighbor.json`` / ``neighbor_perturbed.json`` (400
QA about related people, the knowledge to keep). The answer taught and scored is each row's
``golden_answer``: a short reference ("Nick Frost is English.") in the style of the paraphrased
and perturbed answers the truth ratio compares, where ``answer`` is a long generated paragraph that
a model built from scratch cannot memorise at CPU scale.

The task presumes a model that knows these people. A built-in model does not, so its initial
fine-tune teaches forget + neighbour (``Initial``), and neighbour only (``Retain-only``, the
reference of forget quality), exactly as the TOFU path teaches its authors, and both also teach
the neighbour evaluation facts (:meth:`RealWorldTask.general_knowledge`); a ``--model`` is
fine-tuned the same way on the ``--forget-items`` / ``--retain-items`` subset. Utility is the task's
own: MU is the harmonic mean of probability, ROUGE-L, truth ratio and token entropy on the
neighbour set (TOFU's real-authors / world-facts sets are not used; the evaluation settings are
the TOFU job's, :func:`dualoptim_jax.unlearn.cli.evaluation_settings`), and the ``--downstream``
sets (GSM8K exact match, multiple-choice accuracy) are reported beside it. UFE and OVR as in TOFU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dualoptim_jax.unlearn import data as D
from dualoptim_jax.unlearn.tasks.tofu import UnlearningTask

__all__ = ["load_real_world_task", "RealWorldTask"]

_FIELDS = {"question": "str", "golden_answer": "str"}
_PERTURBED = {
  **_FIELDS,
  "paraphrased_answer": "str",
  "perturbed_answer": "list[str]",
  "paraphrased_question": "str",
}


def _items(rows: list[dict[str, Any]]) -> list[D.QAItem]:
  return D.qa_items(rows, answer="golden_answer")


def load_real_world_task(data_dir: str | Path, task_id: int | None = None) -> D.UnlearningData:
  """The real-world task with golden answers (see the module docstring).

  Args:
    data_dir: the ``real_world`` folder or a folder holding it.
    task_id: keep only this person's forget rows (1..20); None forgets all of them.

  Raises:
    DataFormatError: a missing file, or a row without a field, with file, line and field.
  """
  root = D._resolve(data_dir, "real_world", "forget.json")
  forget, forget_eval = D.real_world_forget_rows(root, task_id, _FIELDS, _PERTURBED)
  return D.UnlearningData(
    forget=_items(forget),
    retain=_items(D.load_jsonl(root / "neighbor.json", _FIELDS)),
    forget_eval=_items(forget_eval),
    retain_eval=_items(D.load_jsonl(root / "neighbor_perturbed.json", _PERTURBED)),
    real_authors=[],
    world_facts=[],
    idk_answers=D._find_idk(root, root.parent),
    name="real_world" + ("" if task_id is None else f"/task{task_id}"),
  )


class RealWorldTask(UnlearningTask):
  """Forget ``forget.json``, retain ``neighbor.json`` (see the module docstring)."""

  name = "real_world"

  def __init__(self, cfg: Any):
    if cfg.data_dir is None:
      raise D.DataFormatError(
        "--task real_world needs --data-dir (a folder holding real_world/); it has no built-in data"
      )
    super().__init__(cfg, load_real_world_task(cfg.data_dir, cfg.task_id))

  def general_knowledge(self) -> list[D.QAItem]:
    """The neighbour *evaluation* facts: ``neighbor_perturbed.json`` asks other questions than
    ``neighbor.json`` (none in common), which a pretrained model knows and a built-in one must be
    taught in its initial fine-tunes, or MU measures knowledge it never had (0.003 answer
    probability on the neighbour set, measured) instead of knowledge kept."""
    return list(self.data.retain_eval)
