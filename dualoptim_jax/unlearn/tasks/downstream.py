"""Downstream utility: one evaluator per format, over files a user supplies.

* **Generation, exact match of the final answer** (GSM8K): the model answers each question
  greedily (zero-shot, the task's prompt format); the prediction is the model's final number
  (:func:`extract_final_number`: the number after ``####`` if it wrote one, else after "the
  answer is", else the last number in the text), the reference the number after ``####`` in the
  GSM8K solution (:func:`gsm8k_reference`); both are normalised (``$``, thousands separators and
  trailing zeros dropped: ``"$1,000.50"`` -> ``"1000.5"``) and compared exactly. A 135M model
  scores near zero on GSM8K; the number is reported as measured.
* **Log-likelihood multiple choice** (ARC, MMLU, TruthfulQA MC1 exported to JSON Lines of
  ``question``, ``choices``, ``answer`` index): each choice is scored as the answer to the
  question, ``log p(choice | question)`` summed over its tokens; ``accuracy`` takes the argmax of
  the sum (lm-evaluation-harness ``acc``), ``accuracy_norm`` of the sum divided by the choice's
  length in characters (its ``acc_norm``, which divides by bytes).

Both take the same injectable callables as :func:`dualoptim_jax.unlearn.metrics.evaluate_with`
(``logprob_fn(questions, answers) -> (sums, n_tokens)``, ``generate_fn(questions) -> texts``), so
they run on any model and are tested with fakes. ``--downstream gsm8k=PATH,arc=PATH`` selects them
(:func:`parse_specs`): a name starting with ``gsm8k`` is a generation set, any other name a
multiple-choice file.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import numpy as np

from dualoptim_jax.unlearn import metrics
from dualoptim_jax.unlearn.batching import in_batches
from dualoptim_jax.unlearn.tasks import files

__all__ = [
  "DownstreamSpec",
  "parse_specs",
  "normalize_number",
  "gsm8k_reference",
  "extract_final_number",
  "evaluate_generation",
  "evaluate_multiple_choice",
  "evaluate_downstream",
  "item_correct",
  "half_accuracies",
]

LogprobFn = metrics.LogprobFn
GenerateFn = metrics.GenerateFn

_NUMBER = re.compile(r"-?\$?\s?\d[\d,]*(?:\.\d+)?|-?\$?\.\d+")


def normalize_number(text: str) -> str | None:
  """Canonical form of a number written in text (``"$1,000.50"`` -> ``"1000.5"``); None if none."""
  cleaned = text.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
  try:
    value = Decimal(cleaned)
  except InvalidOperation:
    return None
  if not value.is_finite():
    return None
  if value == value.to_integral_value():
    return str(int(value))
  return format(value.normalize(), "f")


def gsm8k_reference(solution: str) -> str | None:
  """The normalised number after the last ``####`` of a GSM8K solution, or None."""
  if "####" not in solution:
    return None
  tail = solution.rsplit("####", 1)[1]
  m = _NUMBER.search(tail)
  return None if m is None else normalize_number(m.group(0))


def extract_final_number(text: str) -> str | None:
  """The model's final answer: after ``####``, else after "answer is", else the last number."""
  for marker in ("####", "answer is", "answer:"):
    idx = text.lower().rfind(marker)
    if idx >= 0:
      m = _NUMBER.search(text[idx + len(marker) :])
      if m:
        return normalize_number(m.group(0))
  found = _NUMBER.findall(text)
  return normalize_number(found[-1]) if found else None


def evaluate_generation(
  generate_fn: GenerateFn, items: Sequence[files.GSM8KItem], *, batch_size: int = 16
) -> dict[str, Any]:
  """Exact match of the final number: ``{"accuracy", "n_items", "per_item"}``."""
  if not items:
    raise ValueError("evaluate_generation needs at least one item")
  generations = in_batches(generate_fn, [it.question for it in items], batch_size)
  predictions = [extract_final_number(g) for g in generations]
  correct = [p is not None and p == it.final for p, it in zip(predictions, items)]
  return {
    "accuracy": float(np.mean(correct)),
    "n_items": len(items),
    "per_item": {
      "generation": list(generations),
      "prediction": predictions,
      "reference": [it.final for it in items],
      "correct": correct,
    },
  }


def evaluate_multiple_choice(
  logprob_fn: LogprobFn, items: Sequence[files.ChoiceItem], *, batch_size: int = 32
) -> dict[str, Any]:
  """Log-likelihood multiple choice: ``{"accuracy", "accuracy_norm", "n_items", "per_item"}``.

  ``per_item["logprob"]`` holds each item's summed choice log-probabilities.
  """
  if not items:
    raise ValueError("evaluate_multiple_choice needs at least one item")
  questions = [it.question for it in items for _ in it.choices]
  answers = [c for it in items for c in it.choices]
  sums = []
  for start in range(0, len(answers), batch_size):
    lp, _ = logprob_fn(questions[start : start + batch_size], answers[start : start + batch_size])
    sums.append(np.asarray(lp, np.float64).reshape(-1))
  flat = np.concatenate(sums)
  if flat.shape != (len(answers),):
    raise ValueError(f"logprob_fn returned {flat.shape} values for {len(answers)} choices")
  per_item, pred, pred_norm, pos = [], [], [], 0
  for it in items:
    lp = flat[pos : pos + len(it.choices)]
    pos += len(it.choices)
    per_item.append(lp.tolist())
    pred.append(int(np.argmax(lp)))
    pred_norm.append(int(np.argmax(lp / np.array([max(len(c), 1) for c in it.choices]))))
  gold = [it.answer for it in items]
  return {
    "accuracy": float(np.mean([p == g for p, g in zip(pred, gold)])),
    "accuracy_norm": float(np.mean([p == g for p, g in zip(pred_norm, gold)])),
    "n_items": len(items),
    "per_item": {"logprob": per_item, "prediction": pred, "answer": gold},
  }


def item_correct(result: Mapping[str, Any]) -> list[bool]:
  """Per-item correctness of one set's :func:`evaluate_generation` or
  :func:`evaluate_multiple_choice` result (as stored: a run record's ``per_item``)."""
  items = result["per_item"]
  if "correct" in items:
    return [bool(c) for c in items["correct"]]
  return [p == a for p, a in zip(items["prediction"], items["answer"])]


def half_accuracies(details: Mapping[str, Mapping[str, Any]], which: str) -> dict[str, float]:
  """``{"downstream_<name>": accuracy}`` on one half (:func:`dualoptim_jax.unlearn.metrics.half`)
  of each set's items in ``details`` (``per_item["downstream"]`` of an evaluation); NaN for a set
  too small to have items in that half."""
  out = {}
  for name, result in details.items():
    correct = np.asarray(item_correct(result), np.float64)
    idx = metrics.half(correct.size, which)
    out[f"downstream_{name}"] = float(correct[idx].mean()) if idx.size else math.nan
  return out


@dataclasses.dataclass(frozen=True)
class DownstreamSpec:
  """One downstream set: its report name, file and format (``"generation"`` or ``"choice"``)."""

  name: str
  path: Path
  format: str

  def load(self) -> list:
    if self.format == "generation":
      return files.load_gsm8k(self.path)
    return files.load_multiple_choice(self.path)


def parse_specs(text: str | None) -> tuple[DownstreamSpec, ...]:
  """``"gsm8k=PATH,arc=PATH"`` -> specs; a name starting with ``gsm8k`` is a generation set."""
  if not text:
    return ()
  specs = []
  for part in text.split(","):
    if not part.strip():
      continue
    name, sep, path = part.partition("=")
    name = name.strip()
    if not sep or not name or not path.strip():
      raise ValueError(f"--downstream entries are NAME=PATH, got {part!r}")
    if not re.fullmatch(r"[A-Za-z][\w-]*", name):
      raise ValueError(f"--downstream name must be a word, got {name!r}")
    fmt = "generation" if name.lower().startswith("gsm8k") else "choice"
    specs.append(DownstreamSpec(name, Path(path.strip()).expanduser(), fmt))
  names = [s.name for s in specs]
  if len(set(names)) != len(names):
    raise ValueError(f"--downstream names must be distinct, got {names}")
  return tuple(specs)


def evaluate_downstream(
  specs: Sequence[DownstreamSpec],
  logprob_fn: LogprobFn,
  generate_fn: GenerateFn,
  *,
  max_items: int | None = None,
  loaded: dict[str, list] | None = None,
) -> dict[str, Any]:
  """Every spec's accuracy: ``{"downstream_<name>": accuracy, ..., "downstream": mean}``.

  ``loaded`` caches the parsed files across calls (name -> items). ``downstream`` is the mean
  accuracy over the sets (NaN without sets); ``per_item`` holds each set's details.
  """
  out: dict[str, Any] = {}
  details: dict[str, Any] = {}
  cache = {} if loaded is None else loaded
  for spec in specs:
    if spec.name not in cache:
      cache[spec.name] = spec.load()
    items = cache[spec.name][:max_items]
    if spec.format == "generation":
      res = evaluate_generation(generate_fn, items)
    else:
      res = evaluate_multiple_choice(logprob_fn, items)
    out[f"downstream_{spec.name}"] = res["accuracy"]
    details[spec.name] = res
  accs = [out[f"downstream_{s.name}"] for s in specs]
  out["downstream"] = float(np.mean(accs)) if accs else math.nan
  out["downstream_details"] = details
  return out
