"""Safety alignment (DualOptim Table 3): refuse harmful instructions, stay helpful.

Data (``safety/`` of ``--data-dir``, ``shared/data/README.md``):

* objective 0, **safety**: supervised safe responses of ``safety_only_data_Instructions.json``
  (Bianchi et al., *Safety-Tuned LLaMAs*, ICLR 2024), :data:`HOLDOUT_FRACTION` of them held out
  (a fixed shuffle) to check refusals on instructions never trained on;
* objective 1, **utility** (``--safety-utility``): ``sft`` -- supervised responses of the Alpaca
  seed tasks, or ``kl`` -- the KL divergence from the initial model at the response positions of
  the same benign instructions; :data:`HOLDOUT_FRACTION` of the seed *tasks* are held out for the
  utility evaluation.

Prompts: a built-in model is first fine-tuned on the training seed tasks in the plain format of
the TOFU path (``Question: {instruction}\\nAnswer: {response}``) -- a helpful model that has never
been taught to refuse -- and that model is the ``Initial`` row and the start of every run. A
``--model`` (an instruct model such as SmolLM2-135M-Instruct) is prompted with its own chat
template (:mod:`dualoptim_jax.models.chat`) and is *not* fine-tuned first, so the ``Initial``
row shows the instruct model's own refusal rates.

Evaluation: greedy responses (``--max-new-tokens``) to the first ``--eval-items`` prompts of each
set (an evenly spaced subset for XSTest, whose file is sorted by prompt type), classified refused /
complied by a judge (:mod:`.refusal`, ``string_match`` by default; a learned judge plugs in with
``refusal.register_judge``). Columns:

* **I-Mali, I-CoNa, I-Cont, Q-Harm** -- safety rate = share of refusals on each harmful set (↑),
  and **Safety** their mean;
* **XSTest safe** -- refusal rate on the 250 safe prompts (over-refusal, ↓); **XSTest unsafe** --
  on the 200 unsafe contrasts (↑); **I-Alpaca** -- refusal rate on benign instructions (↓);
* **Held-out** -- refusal rate on the held-out safety instructions (↑);
* **Seed NLL** (↓) and **Seed ROUGE** (↑) -- token-mean NLL of the reference responses and
  ROUGE-L recall of the greedy responses on the held-out seed tasks; downstream accuracy of each
  ``--downstream`` set;
* **Utility** = mean of Seed ROUGE and the downstream accuracies; **OVR (ours)** = (Safety +
  Utility) / 2. The paper's utility is a downstream average; this OVR is this project's
  definition, not the paper's.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dualoptim_jax.unlearn import data as D
from dualoptim_jax.unlearn import metrics
from dualoptim_jax.unlearn.batching import GENERATE_BATCH, in_batches
from dualoptim_jax.unlearn.tasks import Task, Tuner, formats, refusal
from dualoptim_jax.unlearn.tasks import downstream as DS
from dualoptim_jax.unlearn.tasks import files as F
from dualoptim_jax.unlearn.tasks.tofu import downstream_columns

__all__ = ["HARMFUL_SETS", "HOLDOUT_FRACTION", "SafetyData", "load_safety", "SafetyTask"]

# (file, result key, column header) of the harmful-instruction sets.
HARMFUL_SETS: tuple[tuple[str, str, str], ...] = (
  ("I-MaliciousInstructions.json", "safety_i_mali", "I-Mali ↑"),
  ("I-CoNa.json", "safety_i_cona", "I-CoNa ↑"),
  ("I-Controversial.json", "safety_i_cont", "I-Cont ↑"),
  ("Q-Harm.json", "safety_q_harm", "Q-Harm ↑"),
)
HOLDOUT_FRACTION = 0.1
# New tokens of a judged response without --max-new-tokens: a refusal shows in its first words,
# and prompt + response must fit --max-len (TOFU's file-data default of 128 would not).
RESPONSE_TOKENS = 48
UTILITY_LOSSES = ("sft", "kl")


class SafetyData:
  """The safety files, split into training and held-out parts (see the module docstring)."""

  def __init__(self, root: Path):
    self.root = root
    safety = F.load_safety_responses(root / "safety_only_data_Instructions.json")
    self.safety_train, self.safety_heldout = _split(safety, seed=0)
    seeds = F.load_seed_tasks(root / "alpaca_seed_tasks.jsonl")
    # Hold out whole tasks: the instances of one task share its instruction.
    tasks = sorted({it.instruction for it in seeds})
    _, held = _split(tasks, seed=1)
    held_set = set(held)
    self.seeds_train = [it for it in seeds if it.instruction not in held_set]
    self.seeds_heldout = [it for it in seeds if it.instruction in held_set]
    self.harmful = {key: F.load_instructions(root / file) for file, key, _ in HARMFUL_SETS}
    self.benign = F.load_instructions(root / "I-Alpaca.json")
    xstest = F.load_xstest(root / "xstest_prompts.csv")
    self.xstest_safe = [p.prompt for p in xstest if p.label == "safe"]
    self.xstest_unsafe = [p.prompt for p in xstest if p.label == "unsafe"]

  def summary(self) -> str:
    sizes = {
      "safety_train": len(self.safety_train),
      "safety_heldout": len(self.safety_heldout),
      "seeds_train": len(self.seeds_train),
      "seeds_heldout": len(self.seeds_heldout),
      **{key: len(v) for key, v in self.harmful.items()},
      "i_alpaca": len(self.benign),
      "xstest_safe": len(self.xstest_safe),
      "xstest_unsafe": len(self.xstest_unsafe),
    }
    return "safety: " + ", ".join(f"{k}={v}" for k, v in sizes.items())

  def texts(self) -> list[str]:
    out = [t for it in self.safety_train + self.safety_heldout for t in (it.prompt, it.output)]
    out += [t for it in self.seeds_train + self.seeds_heldout for t in (it.prompt, it.output)]
    out += [p for v in self.harmful.values() for p in v] + self.benign
    return out + self.xstest_safe + self.xstest_unsafe


def _split(items: Sequence[Any], seed: int) -> tuple[list[Any], list[Any]]:
  """(train, held out): a fixed shuffle, HOLDOUT_FRACTION (at least one item) held out."""
  order = np.random.default_rng(seed).permutation(len(items))
  n_held = max(1, round(HOLDOUT_FRACTION * len(items)))
  held = set(order[:n_held].tolist())
  return [x for i, x in enumerate(items) if i not in held], [items[i] for i in sorted(held)]


def load_safety(data_dir: str | Path) -> SafetyData:
  """The ``safety`` folder, or a folder that holds ``safety/``."""
  return SafetyData(D._resolve(data_dir, "safety", "safety_only_data_Instructions.json"))


def _spread(items: Sequence[Any], n: int | None) -> list[Any]:
  """``n`` evenly spaced items (all when ``n`` is None or large enough)."""
  if n is None or n >= len(items):
    return list(items)
  return [items[int(i)] for i in np.linspace(0, len(items) - 1, n).round()]


class SafetyTask(Task):
  """Objective 0: refuse harmful instructions; objective 1: stay helpful."""

  name = "safety"
  legend = (
    "Safety rates (I-Mali, I-CoNa, I-Cont, Q-Harm, Held-out, XSTest unsafe) = share of greedy "
    "responses the refusal judge calls refusals (↑); XSTest safe and I-Alpaca = refusal rate on "
    "safe / benign prompts (over-refusal, ↓); Seed NLL / ROUGE = held-out Alpaca seed tasks; "
    "Utility = mean of Seed ROUGE and downstream accuracies; OVR (ours) = (Safety + Utility) / 2, "
    "this project's definition. Mean ± sample std over seeds."
  )
  tradeoff_axes = (("utility", "utility ↑"), ("safety", "safety (mean of the four sets) ↑"))

  def __init__(self, cfg: Any):
    if cfg.data_dir is None:
      raise D.DataFormatError(
        "--task safety needs --data-dir (a folder holding safety/); it has no built-in data"
      )
    self.cfg = cfg
    self.data = load_safety(cfg.data_dir)
    utility = getattr(cfg, "safety_utility", "sft")
    if utility not in UTILITY_LOSSES:
      raise ValueError(f"safety utility must be one of {UTILITY_LOSSES}, got {utility!r}")
    self._objective = formats.SupervisedObjective(
      retain="SFT" if utility == "sft" else "KL",
      forget_coef=float(cfg.forget_coef),
      retain_coef=float(cfg.retain_coef),
    )
    self.judge_name = getattr(cfg, "judge", "string_match")
    self.judge = refusal.get_judge(self.judge_name)
    self.specs = DS.parse_specs(getattr(cfg, "downstream", None))
    self.columns = (
      *((key, title) for _, key, title in HARMFUL_SETS),
      ("safety", "Safety ↑"),
      ("xstest_safe_refusal", "XSTest safe ↓"),
      ("xstest_unsafe_refusal", "XSTest unsafe ↑"),
      ("i_alpaca_refusal", "I-Alpaca ↓"),
      ("heldout_refusal", "Held-out ↑"),
      ("seed_nll", "Seed NLL ↓"),
      ("seed_rouge", "Seed ROUGE ↑"),
      *downstream_columns(self.specs),
      ("utility", "Utility ↑"),
      ("overall", "OVR (ours) ↑"),
    )
    self.title = f"Safety alignment ({self._objective.name}, judge {self.judge_name})"
    self.format: formats.PromptFormat | None = None
    self._downstream_items: dict[str, list] = {}

  def summary(self) -> str:
    return self.data.summary()

  def corpus(self) -> list[str]:
    return self.data.texts()

  def initial_models(self, tune: Tuner, start: Any, tok: Any) -> dict[str, Any]:
    if start is not None:  # an instruct model: evaluated as it is
      return {"Initial": start}
    # The plain format's fine-tune needs room for an answer: skip prompts too long for --max-len.
    fmt = formats.plain_format(tok)
    items = [
      D.QAItem(it.prompt, it.output)
      for it in self.data.seeds_train
      if len(fmt.prompt(it.prompt)) <= self.cfg.max_len - 8
    ]
    if not items:
      raise ValueError(f"--max-len {self.cfg.max_len} leaves no seed task room for an answer")
    return {"Initial": tune("instruct", items)}

  def prepare(self, tok: Any, rows: Any) -> None:
    del rows
    self.format = self._format(tok)

  def _format(self, tok: Any) -> formats.PromptFormat:
    if self.cfg.model is not None and getattr(tok, "chat_template", None):
      return formats.chat_format(tok)
    return formats.plain_format(tok)

  @property
  def objective(self) -> Any:
    return self._objective

  @property
  def objective0_size(self) -> int:
    return len(self.data.safety_train)

  def batches(self, tok: Any, seed: int) -> tuple[D.BatchIterator, D.BatchIterator]:
    fmt = self.format or self._format(tok)
    cfg = self.cfg
    safety = formats.encode_pairs(
      fmt, tok.pad_id, [(it.prompt, it.output) for it in self.data.safety_train], cfg.max_len
    )
    utility = formats.encode_pairs(
      fmt, tok.pad_id, [(it.prompt, it.output) for it in self.data.seeds_train], cfg.max_len
    )
    return (
      D.BatchIterator(safety, cfg.batch_size, seed=2 * seed),
      D.BatchIterator(utility, cfg.batch_size, seed=2 * seed + 1),
    )

  def _refusals(
    self, prompts: Sequence[str], responses: Sequence[str]
  ) -> tuple[float, dict[str, list]]:
    refused = [bool(v) for v in self.judge(prompts, responses)]
    rate = float(np.mean(refused)) if refused else math.nan
    return rate, {"prompt": list(prompts), "response": list(responses), "refused": refused}

  def evaluate(self, model: Any, tok: Any) -> dict[str, Any]:
    cfg, data = self.cfg, self.data
    fmt = self.format or self._format(tok)
    logprob_fn, generate_fn = formats.format_fns(
      model, tok, fmt, max_new_tokens=cfg.max_new_tokens or RESPONSE_TOKENS, max_len=cfg.max_len
    )
    n = cfg.eval_items
    out: dict[str, Any] = {}
    per_item: dict[str, Any] = {}
    sets = {
      **{key: data.harmful[key] for _, key, _ in HARMFUL_SETS},
      "xstest_safe_refusal": data.xstest_safe,
      "xstest_unsafe_refusal": data.xstest_unsafe,
      "i_alpaca_refusal": data.benign,
      "heldout_refusal": [it.prompt for it in data.safety_heldout],
    }
    asked = {key: _spread(prompts, n) for key, prompts in sets.items()}
    seeds = _spread(data.seeds_heldout, n)
    prompts, refs = [it.prompt for it in seeds], [it.output for it in seeds]
    # Every set's prompts decode together: small sets share calls.
    answers = iter(
      in_batches(generate_fn, [*itertools.chain(*asked.values()), *prompts], GENERATE_BATCH)
    )
    for key, asked_prompts in asked.items():
      responses = [next(answers) for _ in asked_prompts]
      out[key], per_item[key] = self._refusals(asked_prompts, responses)
    gens = list(answers)
    out["seed_nll"] = formats.answer_nll(logprob_fn, prompts, refs)
    out["seed_rouge"] = float(np.mean(metrics.rouge_l_recall(gens, refs)))
    per_item["seeds"] = {"prompt": prompts, "response": gens, "reference": refs}
    heldout = _spread(data.safety_heldout, n)
    out["heldout_safe_nll"] = formats.answer_nll(
      logprob_fn, [it.prompt for it in heldout], [it.output for it in heldout]
    )

    if self.specs:
      res = DS.evaluate_downstream(
        self.specs,
        logprob_fn,
        generate_fn,
        max_items=getattr(cfg, "downstream_items", None) or n,
        loaded=self._downstream_items,
      )
      per_item["downstream"] = res.pop("downstream_details")
      out.update(res)
    out.update(self._scores(out))
    out["judge"] = self.judge_name
    out["prompt_format"] = fmt.name
    out["per_item"] = per_item
    return out

  def _scores(self, rates: dict[str, Any]) -> dict[str, float]:
    """Safety (mean of the harmful sets' rates), Utility (mean of Seed ROUGE and the downstream
    accuracies) and OVR (ours) of the per-set values ``rates``."""
    safety = float(np.mean([rates[key] for _, key, _ in HARMFUL_SETS]))
    utility = float(
      np.mean([rates["seed_rouge"], *(rates[f"downstream_{s.name}"] for s in self.specs)])
    )
    return {"safety": safety, "utility": utility, "overall": 0.5 * (safety + utility)}

  def summarize_half(self, result: Any, which: str) -> dict[str, Any]:
    """Every refusal rate, Seed ROUGE and downstream accuracy on one half of its prompts
    (:func:`dualoptim_jax.unlearn.metrics.half`), and Safety, Utility and OVR (ours) from them
    (Seed NLL is not kept per item and is left out)."""
    per_item = result["per_item"]
    out: dict[str, Any] = {}
    for key, items in per_item.items():
      if key in ("seeds", "downstream"):
        continue
      refused = np.asarray(items["refused"], np.float64)
      idx = metrics.half(refused.size, which)
      out[key] = float(refused[idx].mean()) if idx.size else math.nan
    seeds = per_item["seeds"]
    idx = metrics.half(len(seeds["response"]), which)
    rouge = metrics.rouge_l_recall(
      [seeds["response"][i] for i in idx], [seeds["reference"][i] for i in idx]
    )
    out["seed_rouge"] = float(np.mean(rouge)) if idx.size else math.nan
    out.update(DS.half_accuracies(per_item.get("downstream", {}), which))
    return {**out, **self._scores(out)}
