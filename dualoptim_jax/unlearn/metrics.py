"""TOFU / "closer look" evaluation of an unlearned language model.

The definitions follow the TOFU benchmark (Maini et al., 2024, ``locuslab/tofu``:
``evaluate_util.py`` and ``aggregate_eval_stat.py``) and the evaluation of "A Closer Look at
Machine Unlearning for Large Language Models" (Yuan et al., 2024, ``sail-sg/closer-look-LLM-
unlearning``: ``metrics/metrics.py``), which DualOptim (Zhong et al., 2025) used. ``docs/metrics.md``
writes every formula down; in short, with :math:`\\bar p(a|q) = p(a|q)^{1/|a|}` the length-normalised
probability of answer ``a`` (``|a|`` answer tokens) given question ``q``:

* **Probability** – forget / retain: mean :math:`\\bar p(a|q)`; real authors / world facts:
  mean :math:`\\bar p(a|q) / (\\bar p(a|q) + \\sum_k \\bar p(\\hat a_k|q))` over the true and the
  perturbed (wrong) options.
* **ROUGE** – mean ROUGE-L recall (``rouge-score``, ``use_stemmer=True``) of the greedy answer
  against the ground-truth answer.
* **Truth ratio** – per item
  :math:`R = \\exp(\\tfrac1K\\sum_k \\log \\bar p(\\hat a_k|q)) / \\bar p(\\tilde a|q)`: the geometric
  mean of the perturbed answers' normalised probabilities over that of the paraphrased answer
  (of the answer itself on real authors / world facts). Forget: mean :math:`\\min(R, 1/R)`;
  other sets: mean :math:`\\max(0, 1 - R)`.
* **Model utility (MU)** – harmonic mean of the 9 values (probability, ROUGE, truth ratio) on
  retain, real authors and world facts (plus any registered extra utility component).
* **Untargeted forget efficacy (UFE)** – :math:`1 - \\operatorname{mean}(P_f, \\mathrm{ROUGE}_f,
  1 - \\mathrm{TR}_f, \\ldots)`: the closer-look code enters the forget truth ratio as
  :math:`1 - \\operatorname{mean}\\min(R, 1/R)` so that all forget values grow with retained knowledge.
* **Forget quality (FQ)** – p-value of the two-sample Kolmogorov-Smirnov test between the
  forget-set truth ratios of the evaluated model and of a model trained on the retain set only.
* **OVR** – :math:`(\\mathrm{UFE} + \\mathrm{MU}) / 2` (DualOptim's "Avg").

The maths lives in small pure NumPy functions over per-item arrays. :func:`evaluate_with` runs
the evaluation through two injectable callables (a scorer and a generator), so it can be tested
with fakes; :func:`evaluate` builds them from a Flax model and a tokenizer. Components of the
closer-look evaluation that need models we cannot load offline (sentence-embedding cosine
similarity, NLI entailment, targeted forget efficacy) plug in through :func:`register_metric`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from scipy import special, stats

from dualoptim_jax.models.generate import greedy_generate
from dualoptim_jax.sharding import committed, host_value
from dualoptim_jax.unlearn.batching import GENERATE_BATCH, GENERATE_ROWS, in_batches, pad_rows
from dualoptim_jax.unlearn.data import PROMPT_TEMPLATE, collate, encode_qa

# Evaluation splits, in report order, and the UnlearningData field each one reads.
SPLITS: tuple[str, ...] = ("forget", "retain", "real_authors", "world_facts")
UTILITY_SPLITS: tuple[str, ...] = ("retain", "real_authors", "world_facts")
# Splits every evaluation needs; real authors / world facts are skipped when the data has none
# (the real-world task without TOFU beside it).
REQUIRED_SPLITS: tuple[str, ...] = ("forget", "retain")
SPLIT_FIELDS: Mapping[str, str] = {
  "forget": "forget_eval",
  "retain": "retain_eval",
  "real_authors": "real_authors",
  "world_facts": "world_facts",
}
# TOFU's `base_answer_key`: the truth ratio's reference answer is the paraphrased answer on the
# fictitious-author sets and the answer itself on real authors / world facts.
_PARAPHRASE_BASE: Mapping[str, bool] = {
  "forget": True,
  "retain": True,
  "real_authors": False,
  "world_facts": False,
}
# Real authors / world facts are multiple choice: their probability is option-normalised.
_OPTION_NORMALISED: frozenset[str] = frozenset({"real_authors", "world_facts"})
# The closer-look components this package cannot compute offline (reported as not included).
CLOSER_LOOK_COMPONENTS: tuple[str, ...] = (
  "cosine_similarity",
  "entailment_score",
  "token_entropy",
  "targeted_forget_efficacy",
)

# scorer(questions, answers) -> (sum of answer-token log-probs (B,), number of answer tokens (B,))
LogprobFn = Callable[[Sequence[str], Sequence[str]], tuple[np.ndarray, np.ndarray]]
# generator(questions) -> greedy answers (text, prompt excluded)
GenerateFn = Callable[[Sequence[str]], list[str]]


# --------------------------------------------------------------------------------------------
# Per-item maths.


def length_normalized_prob(logprob_sum: np.ndarray, n_tokens: np.ndarray) -> np.ndarray:
  """Length-normalised answer probability :math:`p(a|q)^{1/|a|} = \\exp(\\log p(a|q) / |a|)`.

  Args:
    logprob_sum: ``(N,)`` summed log-probabilities of the answer tokens.
    n_tokens: ``(N,)`` number of answer tokens (must be positive).

  Returns:
    ``(N,)`` float64 normalised probabilities in ``[0, 1]``.
  """
  return np.exp(_avg_logprob(logprob_sum, n_tokens))


def _avg_logprob(logprob_sum: np.ndarray, n_tokens: np.ndarray) -> np.ndarray:
  logprob_sum = np.asarray(logprob_sum, np.float64)
  n_tokens = np.asarray(n_tokens, np.float64)
  if np.any(n_tokens <= 0):
    raise ValueError(
      f"n_tokens must be >= 1 for every answer, got min {n_tokens.min()}: an answer was "
      "truncated away or tokenised to nothing"
    )
  return logprob_sum / n_tokens


def truth_ratios(
  paraphrased_avg_logprob: np.ndarray, perturbed_avg_logprob: np.ndarray
) -> np.ndarray:
  """Per-item truth ratio :math:`R` of TOFU.

  .. math::
    R = \\frac{\\exp\\big(\\tfrac1K \\sum_k \\log \\bar p(\\hat a_k|q)\\big)}{\\bar p(\\tilde a|q)}
      = \\exp\\big(\\operatorname{mean}_k \\ell(\\hat a_k) - \\ell(\\tilde a)\\big),

  with :math:`\\ell` the per-token mean log-probability, :math:`\\hat a_k` the perturbed (wrong)
  answers and :math:`\\tilde a` the paraphrased answer. TOFU averages the perturbed answers'
  per-token losses, i.e. takes their *geometric* mean; the paper's formula shows an arithmetic
  mean, the code (which produced every published number) the geometric one, used here.
  :math:`R < 1` means the model prefers the correct paraphrase.

  Args:
    paraphrased_avg_logprob: ``(N,)`` per-token mean log-prob of the reference answers.
    perturbed_avg_logprob: ``(N, K)`` per-token mean log-probs of the perturbed answers; ``NaN``
      pads items with fewer than ``K`` perturbed answers.

  Returns:
    ``(N,)`` float64 ratios.
  """
  para = np.asarray(paraphrased_avg_logprob, np.float64)
  pert = np.asarray(perturbed_avg_logprob, np.float64)
  if pert.ndim != 2 or pert.shape[0] != para.shape[0]:
    raise ValueError(
      f"perturbed_avg_logprob must be (N, K) with N={para.shape[0]}, got {pert.shape}"
    )
  if np.any(np.all(np.isnan(pert), axis=1)):
    raise ValueError("every item needs at least one perturbed answer for the truth ratio")
  return np.exp(np.nanmean(pert, axis=1) - para)


def forget_truth_ratio_score(ratios: np.ndarray) -> float:
  """Forget-set truth-ratio score of TOFU: :math:`\\operatorname{mean}\\min(R, 1/R) \\in (0, 1]`.

  Equal to 1 when the model cannot tell the paraphrased from the perturbed answers (the ideal
  after forgetting), near 0 when it strongly prefers either.
  """
  r = np.asarray(ratios, np.float64)
  return float(np.mean(np.minimum(r, 1.0 / r)))


def utility_truth_ratio_score(ratios: np.ndarray) -> float:
  """Truth-ratio score on retain / real authors / world facts: :math:`\\operatorname{mean}\\max(0, 1 - R)`.

  Near 1 when the model strongly prefers the correct answer, 0 when it does not prefer it.
  """
  r = np.asarray(ratios, np.float64)
  return float(np.mean(np.maximum(0.0, 1.0 - r)))


def option_normalized_probs(
  true_avg_logprob: np.ndarray, perturbed_avg_logprob: np.ndarray
) -> np.ndarray:
  """Per-item probability of the true option among the true and the perturbed options.

  .. math::
    \\frac{\\bar p(a|q)}{\\bar p(a|q) + \\sum_k \\bar p(\\hat a_k|q)}
    = \\exp\\big(\\ell(a) - \\operatorname{logsumexp}(\\ell(a), \\ell(\\hat a_1), \\ldots)\\big)

  computed in log space so that tiny probabilities do not underflow to 0/0.

  Args:
    true_avg_logprob: ``(N,)`` per-token mean log-prob :math:`\\ell(a)` of the true answers.
    perturbed_avg_logprob: ``(N, K)`` those of the perturbed answers, ``NaN``-padded.

  Returns:
    ``(N,)`` float64 values in ``(0, 1]``.
  """
  true = np.asarray(true_avg_logprob, np.float64)
  pert = np.asarray(perturbed_avg_logprob, np.float64)
  options = np.concatenate([true[:, None], np.where(np.isnan(pert), -np.inf, pert)], axis=1)
  return np.exp(true - np.asarray(special.logsumexp(options, axis=1)))


_ROUGE_SCORER: Any = None


def rouge_l_recall(generations: Sequence[str], references: Sequence[str]) -> np.ndarray:
  """ROUGE-L recall of each generation against its reference, as TOFU computes it.

  ``rouge_score.rouge_scorer.RougeScorer(['rougeL'], use_stemmer=True).score(reference,
  generation).recall``: lower-cased alphanumeric tokens, Porter-stemmed when longer than three
  characters; recall = LCS length / number of reference tokens (0 for an empty reference).
  """
  if len(generations) != len(references):
    raise ValueError(f"{len(generations)} generations for {len(references)} references")
  global _ROUGE_SCORER
  if _ROUGE_SCORER is None:  # building the stemmer is slow-ish; one scorer serves all calls
    from rouge_score import rouge_scorer

    _ROUGE_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
  return np.array(
    [_ROUGE_SCORER.score(ref, gen)["rougeL"].recall for gen, ref in zip(generations, references)],
    np.float64,
  )


def harmonic_mean(values: Sequence[float]) -> float:
  """Harmonic mean :math:`n / \\sum_i 1/v_i` of non-negative values; 0 if any value is 0.

  Matches ``scipy.stats.hmean`` (used by TOFU for model utility), which also returns 0 when a
  value is 0: one collapsed component zeroes the utility, by design.
  """
  v = np.asarray(values, np.float64)
  if v.ndim != 1 or v.size == 0:
    raise ValueError(f"harmonic_mean needs a non-empty 1-D sequence, got shape {v.shape}")
  if np.any(v < 0):
    raise ValueError(f"harmonic_mean is defined for values >= 0, got {v.tolist()}")
  if np.any(v == 0):
    return 0.0
  return float(v.size / np.sum(1.0 / v))


class KSResult(NamedTuple):
  """Two-sample Kolmogorov-Smirnov test result."""

  pvalue: float  # forget quality
  statistic: float  # sup_x |F_1(x) - F_2(x)|


def forget_quality(truth_ratios_: np.ndarray, retain_only_truth_ratios: np.ndarray) -> KSResult:
  """Forget quality of TOFU: KS two-sample test p-value between forget-set truth ratios.

  ``scipy.stats.ks_2samp`` with its defaults (two-sided, exact for small samples), as in TOFU's
  ``aggregate_eval_stat.py``. TOFU passes :math:`1/R`; the KS statistic depends only on the ranks
  of the pooled sample, so any strictly monotone map of both samples gives the same result.
  A high p-value means the unlearned model is statistically indistinguishable from one that never
  saw the forget set.
  """
  a = np.asarray(truth_ratios_, np.float64)
  b = np.asarray(retain_only_truth_ratios, np.float64)
  if a.size == 0 or b.size == 0:
    raise ValueError(f"forget_quality needs non-empty samples, got sizes {a.size} and {b.size}")
  res: Any = stats.ks_2samp(a, b)
  return KSResult(pvalue=float(res.pvalue), statistic=float(res.statistic))


def untargeted_forget_efficacy(forget_knowledge: Sequence[float]) -> float:
  """Untargeted forget efficacy: :math:`1 - \\operatorname{mean}` of the forget-set knowledge values.

  ``forget_knowledge`` are values that grow with what the model still knows of the forget set:
  probability, ROUGE and :math:`1 - \\mathrm{TR}_f` (TOFU's forget truth-ratio score flipped, as the
  closer-look code does), plus any registered extra component.
  """
  v = np.asarray(forget_knowledge, np.float64)
  if v.ndim != 1 or v.size == 0:
    raise ValueError(
      f"untargeted_forget_efficacy needs a non-empty 1-D sequence, got shape {v.shape}"
    )
  return float(1.0 - v.mean())


def overall_score(forget_efficacy: float, model_utility: float) -> float:
  """OVR: the mean :math:`(\\mathrm{UFE} + \\mathrm{MU}) / 2` of efficacy and utility."""
  return 0.5 * (float(forget_efficacy) + float(model_utility))


# --------------------------------------------------------------------------------------------
# Extra components: a registry of per-item metric callables.


class SplitOutputs(NamedTuple):
  """What an extra metric sees of one evaluated split."""

  split: str  # one of SPLITS
  items: Sequence[Any]  # the QAItems evaluated
  generations: Sequence[str]  # the model's greedy answers
  rouge: np.ndarray  # (N,) ROUGE-L recall of the generations
  tokenizer: Any  # the evaluated model's tokenizer, or None


class ExtraMetric(NamedTuple):
  """A registered extra component.

  ``fn(outputs) -> (N,)`` per-item scores in ``[0, 1]`` that grow with the knowledge shown (as
  cosine similarity and entailment do); the split score is their mean. ``utility``: it enters
  model utility on the utility splits; ``forget_efficacy``: it enters UFE on the forget split.
  """

  fn: Callable[[SplitOutputs], np.ndarray]
  utility: bool
  forget_efficacy: bool


_EXTRA_METRICS: dict[str, ExtraMetric] = {}


def register_metric(
  name: str,
  fn: Callable[[SplitOutputs], np.ndarray],
  *,
  utility: bool = True,
  forget_efficacy: bool = True,
  overwrite: bool = False,
) -> None:
  """Register an extra evaluation component under ``name`` (select it in ``extra_metrics=``).

  This is where the closer-look components that need external models plug in, e.g. a
  sentence-embedding cosine similarity or an NLI entailment score (``utility=True,
  forget_efficacy=True`` as in the closer-look code), without touching this module.
  """
  if not name.isidentifier():
    raise ValueError(f"metric name must be an identifier (it becomes a result key), got {name!r}")
  if name in _EXTRA_METRICS and not overwrite:
    raise ValueError(f"metric {name!r} is already registered; pass overwrite=True to replace it")
  _EXTRA_METRICS[name] = ExtraMetric(fn, utility, forget_efficacy)


def registered_metrics() -> dict[str, ExtraMetric]:
  """The registered extra components, by name."""
  return dict(_EXTRA_METRICS)


def normalized_token_entropy(token_ids: Sequence[int]) -> float:
  """Unigram entropy of a token sequence over its maximum, :math:`H / \\log_2 n` (closer look).

  0 for fewer than two tokens. Low values flag degenerate, repetitive generations.
  """
  n = len(token_ids)
  if n <= 1:
    return 0.0
  _, counts = np.unique(np.asarray(token_ids), return_counts=True)
  freqs = counts / n
  return float(-np.sum(freqs * np.log2(freqs)) / np.log2(n))


def _token_entropy(outputs: SplitOutputs) -> np.ndarray:
  if outputs.tokenizer is None:
    raise ValueError("token_entropy needs a tokenizer (evaluate_with(..., tokenizer=...))")
  return np.array(
    [normalized_token_entropy(outputs.tokenizer.encode(g)) for g in outputs.generations]
  )


# The closer-look code counts token entropy in model utility and leaves it out of efficacy.
register_metric("token_entropy", _token_entropy, utility=True, forget_efficacy=False)


# --------------------------------------------------------------------------------------------
# Aggregation.


class SplitScores(NamedTuple):
  """Per-item scores of one split (arrays of shape ``(N,)``)."""

  prob: np.ndarray  # length-normalised (forget/retain) or option-normalised probability
  rouge: np.ndarray  # ROUGE-L recall of the greedy answer
  truth_ratio: np.ndarray  # R per item
  extras: Mapping[str, np.ndarray] = {}  # registered extra components, by name


def summarize(
  scores: Mapping[str, SplitScores],
  *,
  retain_only_truth_ratios: np.ndarray | None = None,
) -> dict[str, Any]:
  """Aggregate per-item scores of the splits into the reported metrics.

  Args:
    scores: ``{split: SplitScores}`` for ``forget``, ``retain`` and optionally ``real_authors``
      and ``world_facts``; MU is taken over the utility splits present.
    retain_only_truth_ratios: forget-set truth ratios of the retain-only model; without them
      ``forget_quality`` and ``ks_statistic`` are ``None``.

  Returns:
    A flat dict: ``{split}_prob``, ``{split}_rouge``, ``{split}_truth_ratio`` and
    ``{split}_{extra}`` per split; ``model_utility``, ``forget_efficacy`` (UFE), ``overall``
    (OVR), ``forget_quality``, ``ks_statistic``; and ``components``: the names of the values
    entering MU and UFE and the closer-look components not included.
  """
  missing = [s for s in REQUIRED_SPLITS if s not in scores]
  unknown = [s for s in scores if s not in SPLITS]
  if missing or unknown:
    raise ValueError(
      f"scores needs splits {list(REQUIRED_SPLITS)} (optional: the rest of "
      f"{list(SPLITS)}); missing {missing}, unknown {unknown}"
    )
  splits = [s for s in SPLITS if s in scores]
  utility_splits = [s for s in UTILITY_SPLITS if s in scores]
  extra_names = sorted(set().union(*(scores[s].extras.keys() for s in splits)))
  out: dict[str, Any] = {}
  for split in splits:
    sc = scores[split]
    ratio_score = forget_truth_ratio_score if split == "forget" else utility_truth_ratio_score
    out[f"{split}_prob"] = float(np.mean(sc.prob))
    out[f"{split}_rouge"] = float(np.mean(sc.rouge))
    out[f"{split}_truth_ratio"] = ratio_score(sc.truth_ratio)
    for name in extra_names:
      if name not in sc.extras:
        raise ValueError(f"extra metric {name!r} is missing on split {split!r}")
      out[f"{split}_{name}"] = float(np.mean(sc.extras[name]))

  utility_keys = [f"{s}_{m}" for s in utility_splits for m in ("prob", "rouge", "truth_ratio")]
  utility_keys += [f"{s}_{n}" for s in utility_splits for n in extra_names if _extra(n).utility]
  efficacy_keys = ["forget_prob", "forget_rouge", "forget_truth_ratio"]
  efficacy_keys += [f"forget_{n}" for n in extra_names if _extra(n).forget_efficacy]
  # TOFU's forget truth-ratio score rises as knowledge falls; flip it like the closer-look code.
  knowledge = [1.0 - out[k] if k == "forget_truth_ratio" else out[k] for k in efficacy_keys]

  out["model_utility"] = harmonic_mean([out[k] for k in utility_keys])
  out["forget_efficacy"] = untargeted_forget_efficacy(knowledge)
  out["overall"] = overall_score(out["forget_efficacy"], out["model_utility"])
  if retain_only_truth_ratios is None:
    out["forget_quality"] = out["ks_statistic"] = None
  else:
    ks = forget_quality(scores["forget"].truth_ratio, retain_only_truth_ratios)
    out["forget_quality"], out["ks_statistic"] = ks.pvalue, ks.statistic
  out["components"] = {
    "model_utility": utility_keys,
    "forget_efficacy": [
      "1 - forget_truth_ratio" if k == "forget_truth_ratio" else k for k in efficacy_keys
    ],
    "not_included": [c for c in CLOSER_LOOK_COMPONENTS if c not in extra_names],
  }
  return out


HALVES: tuple[str, ...] = ("validation", "test")


def half(n: int, which: str) -> np.ndarray:
  """Item indices of one half of an evaluation set: ``"validation"`` the even positions,
  ``"test"`` the odd ones, so settings chosen on one half are reported on items they never saw."""
  if which not in HALVES:
    raise ValueError(f"which must be one of {HALVES}, got {which!r}")
  return np.arange(0 if which == "validation" else 1, n, 2)


def summarize_half(
  result: Mapping[str, Any],
  which: str,
  *,
  retain_only_truth_ratios: Sequence[float] | None = None,
) -> dict[str, Any]:
  """:func:`summarize` of one :func:`half` of every split of an evaluation, from its
  ``per_item`` lists (the retain-only ratios are halved alike for forget quality)."""
  scores = {}
  for split, items in result["per_item"].items():
    idx = half(len(items["prob"]), which)
    if idx.size == 0:
      raise ValueError(f"split {split!r} has {len(items['prob'])} item(s): too few to halve")
    column = lambda name, items=items, idx=idx: np.asarray(items[name], np.float64)[idx]
    extras = {
      n: column(n) for n in items if n not in ("prob", "rouge", "truth_ratio", "generation")
    }
    scores[split] = SplitScores(column("prob"), column("rouge"), column("truth_ratio"), extras)
  ratios = None
  if retain_only_truth_ratios is not None:
    all_ratios = np.asarray(retain_only_truth_ratios, np.float64)
    ratios = all_ratios[half(all_ratios.size, which)]
  return summarize(scores, retain_only_truth_ratios=ratios)


def _extra(name: str) -> ExtraMetric:
  if name not in _EXTRA_METRICS:
    raise ValueError(f"unknown extra metric {name!r}; registered: {sorted(_EXTRA_METRICS)}")
  return _EXTRA_METRICS[name]


# --------------------------------------------------------------------------------------------
# Running the evaluation.


def _score_split(
  avg: np.ndarray, indices: tuple, outputs: SplitOutputs, extra_metrics: Sequence[str]
) -> tuple[SplitScores, dict[str, list]]:
  """One split's scores from its answers' mean log-probabilities and its generations."""
  gt_idx, base_idx, pert_idx = indices
  pert = np.where(pert_idx >= 0, avg[np.maximum(pert_idx, 0)], np.nan)
  if outputs.split in _OPTION_NORMALISED:
    prob = option_normalized_probs(avg[gt_idx], pert)
  else:
    prob = np.exp(avg[gt_idx])
  ratio = truth_ratios(avg[base_idx], pert)
  extras = {n: np.asarray(_extra(n).fn(outputs), np.float64) for n in extra_metrics}
  per_item = {
    "prob": prob.tolist(),
    "rouge": outputs.rouge.tolist(),
    "truth_ratio": ratio.tolist(),
    "generation": list(outputs.generations),
    **{name: values.tolist() for name, values in extras.items()},
  }
  return SplitScores(prob, outputs.rouge, ratio, extras), per_item


def evaluate_with(
  logprob_fn: LogprobFn,
  generate_fn: GenerateFn,
  data: Any,
  *,
  retain_only_truth_ratios: np.ndarray | None = None,
  batch_size: int = 16,
  generate_batch_size: int = GENERATE_BATCH,
  max_items: int | None = 300,
  extra_metrics: Sequence[str] = (),
  tokenizer: Any = None,
  progress: bool = True,
) -> dict[str, Any]:
  """Evaluate through injectable callables: the scorer and the greedy generator.

  Args:
    logprob_fn: ``(questions, answers) -> (logprob_sum (B,), n_tokens (B,))`` over answer tokens.
    generate_fn: ``questions -> list[str]`` greedy answers.
    data: an ``UnlearningData``: its ``forget_eval``, ``retain_eval``, ``real_authors`` and
      ``world_facts`` lists of ``QAItem`` are evaluated (the last two are skipped when empty,
      and MU then covers the utility splits present; see ``components``).
    retain_only_truth_ratios: the retain-only model's forget-set truth ratios
      (``result["per_item"]["forget"]["truth_ratio"]`` of its own evaluation), for forget quality.
    batch_size: (question, answer) pairs per call of ``logprob_fn``.
    generate_batch_size: questions per call of ``generate_fn``, of every split together: a
      decoding step costs less per row in a larger batch (docs/smollm2.md, the evaluation).
    max_items: evaluate the first ``max_items`` items of each split (TOFU's ``ds_size``, 300 in
      TOFU and the closer look); ``None`` for all.
    extra_metrics: names of registered extra components to include (see :func:`register_metric`).
    tokenizer: passed to extra components (``token_entropy`` needs it).
    progress: show a tqdm progress bar.

  Returns:
    :func:`summarize`'s dict, plus ``per_item``: ``{split: {"prob", "rouge", "truth_ratio",
    "generation"}}`` lists (``truth_ratio`` is :math:`R`) and ``n_items``: ``{split: N}``.
  """
  from tqdm.auto import tqdm

  for name, value in (("batch_size", batch_size), ("generate_batch_size", generate_batch_size)):
    if value < 1:
      raise ValueError(f"{name} must be >= 1, got {value}")
  if max_items is not None and max_items < 1:
    raise ValueError(f"max_items must be >= 1 or None, got {max_items}")
  for name in extra_metrics:
    _extra(name)

  items = {s: list(getattr(data, SPLIT_FIELDS[s]))[:max_items] for s in SPLITS}
  for split in REQUIRED_SPLITS:
    if not items[split]:
      raise ValueError(f"split {split!r} (data.{SPLIT_FIELDS[split]}) is empty")
  items = {s: its for s, its in items.items() if its}
  requests = {s: _requests(s, its) for s, its in items.items()}
  questions = [it.question for its in items.values() for it in its]
  n_batches = math.ceil(len(questions) / generate_batch_size) + sum(
    math.ceil(len(requests[s][0]) / batch_size) for s in items
  )
  bar = tqdm(total=n_batches, desc="evaluate", unit="batch", disable=not progress, leave=False)

  scores: dict[str, SplitScores] = {}
  per_item: dict[str, dict[str, list]] = {}
  try:
    bar.set_postfix(split="all: generate")
    answers = iter(in_batches(generate_fn, questions, generate_batch_size, bar.update))
    for split, its in items.items():
      bar.set_postfix(split=split)
      avg = _batched_avg_logprob(logprob_fn, *requests[split][:2], batch_size, bar)
      gens = [next(answers) for _ in its]
      outputs = SplitOutputs(
        split, its, gens, rouge_l_recall(gens, [it.answer for it in its]), tokenizer
      )
      scores[split], per_item[split] = _score_split(
        avg, requests[split][2:], outputs, extra_metrics
      )
  finally:
    bar.close()

  out = summarize(scores, retain_only_truth_ratios=retain_only_truth_ratios)
  out["n_items"] = {s: len(its) for s, its in items.items()}
  out["per_item"] = per_item
  return out


def _requests(split: str, items: Sequence[Any]):
  """Unique (question, answer) pairs to score for a split, and where each item's answers are.

  Returns ``(questions, answers, gt_idx (N,), base_idx (N,), pert_idx (N, K))`` with ``-1``
  padding ``pert_idx``. Pairs are deduplicated: on real authors / world facts the truth ratio's
  reference is the answer itself, scored once.
  """
  index: dict[tuple[str, str], int] = {}

  def add(q: str, a: str) -> int:
    return index.setdefault((q, a), len(index))

  gt, base, pert = [], [], []
  for i, it in enumerate(items):
    if not it.perturbed_answers:
      raise ValueError(
        f"{split} item {i} ({it.question!r}) has no perturbed answers: no truth ratio"
      )
    ref = it.answer
    if _PARAPHRASE_BASE[split]:
      if not it.paraphrased_answer:
        raise ValueError(f"{split} item {i} ({it.question!r}) has no paraphrased_answer")
      ref = it.paraphrased_answer
    gt.append(add(it.question, it.answer))
    base.append(add(it.question, ref))
    pert.append([add(it.question, p) for p in it.perturbed_answers])
  width = max(len(p) for p in pert)
  pert_idx = np.full((len(items), width), -1, np.int64)
  for i, p in enumerate(pert):
    pert_idx[i, : len(p)] = p
  questions = [q for q, _ in index]
  answers = [a for _, a in index]
  return questions, answers, np.array(gt), np.array(base), pert_idx


class NonFiniteOutputError(ValueError):
  """The evaluated model produced NaN or infinite log-probabilities."""


def _batched_avg_logprob(
  logprob_fn: LogprobFn, questions, answers, batch_size: int, bar
) -> np.ndarray:
  sums, counts = [], []
  for start in range(0, len(questions), batch_size):
    lp, n = logprob_fn(questions[start : start + batch_size], answers[start : start + batch_size])
    sums.append(np.asarray(lp, np.float64).reshape(-1))
    counts.append(np.asarray(n, np.float64).reshape(-1))
    bar.update(1)
  lp, n = np.concatenate(sums), np.concatenate(counts)
  if lp.shape != (len(questions),) or n.shape != (len(questions),):
    raise ValueError(
      f"logprob_fn returned {lp.shape}/{n.shape} values for {len(questions)} answers"
    )
  bad = int(np.sum(~np.isfinite(lp)))
  if bad:
    raise NonFiniteOutputError(
      f"the model's outputs are not finite: {bad} of {len(lp)} answer log-probabilities are "
      "NaN or infinite (diverged training or damaged parameters); no metric is meaningful"
    )
  return _avg_logprob(lp, n)


# --------------------------------------------------------------------------------------------
# Adapter from a Flax model and a tokenizer.


@functools.partial(jax.jit, static_argnames=("graphdef", "width"))
def _answer_logprob_sums(graphdef, state, input_ids, answer_mask, starts, width: int):
  """Summed answer-token log-probabilities of right-padded rows whose answers start at
  ``starts`` and are at most ``width`` tokens long."""
  # Right padding sits after every real token, so causal attention never sees it. Position t
  # predicts token t + 1: only the ``width`` positions before each answer token are scored.
  steps = starts[:, None] - 1 + jnp.arange(width)
  scored = (steps >= 0) & (steps <= input_ids.shape[1] - 2)
  steps = jnp.where(scored, steps, 0)
  logits = _logits_at(nnx.merge(graphdef, state), input_ids, steps)
  targets = jnp.take_along_axis(input_ids, steps + 1, axis=1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  logprobs = picked - jax.nn.logsumexp(logits, axis=-1)
  mask = jnp.take_along_axis(answer_mask, steps + 1, axis=1) * scored
  return jnp.sum(logprobs * mask, axis=-1)


def _logits_at(model: Any, input_ids: jax.Array, steps: jax.Array) -> jax.Array:
  """Float32 logits (B, W, V) at positions ``steps`` (B, W)."""
  if hasattr(model, "hidden_states"):
    # A Llama projects onto its vocabulary only where asked: the projection and the softmax
    # over 49k tokens were 30 % of a SmolLM2 scoring call, and most positions are the prompt's.
    h, _ = model.hidden_states(input_ids)
    return model.logits(jnp.take_along_axis(h, steps[..., None], axis=1))
  logits = model(input_ids).astype(jnp.float32)
  return jnp.take_along_axis(logits, steps[..., None], axis=1)


def model_fns(
  model: nnx.Module,
  tokenizer: Any,
  *,
  max_new_tokens: int = 128,
  max_len: int = 256,
  pad_to_multiple: int = 32,
) -> tuple[LogprobFn, GenerateFn]:
  """The scorer and greedy generator of :func:`evaluate_with` for a causal LM.

  The scorer tokenises ``(question, answer)`` with :func:`dualoptim_jax.unlearn.data.encode_qa`
  (the training prompt format; the answer's ``<eos>`` counts as an answer token, as in TOFU),
  right-pads to a multiple of ``pad_to_multiple`` tokens and a power-of-two batch, and sums the
  answer-token log-probabilities in one jitted forward pass (a model with Llama's
  ``hidden_states`` / ``logits`` projects onto its vocabulary only where an answer token is
  predicted). The generator decodes greedily with
  :func:`dualoptim_jax.models.generate.greedy_generate` from the prompt
  ``<bos>Question: {question}\\nAnswer:`` and strips the decoded text.

  Args:
    model: ``model(input_ids (B, T)) -> logits (B, T, V)``; generation needs a ``Llama``.
    tokenizer: ``encode(text, *, add_bos)``, ``decode(ids)``, ``bos_id``, ``eos_id``, ``pad_id``.
    max_new_tokens: most generated tokens per answer.
    max_len: longest scored sequence (prompt + answer); longer answers are truncated.
    pad_to_multiple: sequence-length bucket of the scorer.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if max_len < 2:
    raise ValueError(f"max_len must be >= 2, got {max_len}")
  if pad_to_multiple < 1:
    raise ValueError(f"pad_to_multiple must be >= 1, got {pad_to_multiple}")

  def logprob_fn(questions: Sequence[str], answers: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    encoded = [encode_qa(tokenizer, q, a, max_len) for q, a in zip(questions, answers)]
    longest = max(len(e.input_ids) for e in encoded)
    length = min(-(-longest // pad_to_multiple) * pad_to_multiple, max(max_len, longest))
    batch = collate(pad_rows(encoded), tokenizer.pad_id, length)
    graphdef, state = nnx.split(model)  # split per call: the model may have been updated
    state = committed(state)  # a fine-tuned or a restored model: one program
    starts = np.argmax(batch["answer_mask"] > 0, axis=-1).astype(np.int32)
    width = -(-int(batch["answer_mask"].sum(-1).max()) // 8) * 8  # few shapes, few compiles
    sums = _answer_logprob_sums(
      graphdef, state, batch["input_ids"], batch["answer_mask"], starts, min(width, length)
    )
    n = len(encoded)
    return host_value(sums).astype(np.float64)[:n], batch["answer_mask"][:n].sum(-1).astype(
      np.float64
    )

  def generate_fn(questions: Sequence[str]) -> list[str]:
    prompts = [
      tokenizer.encode(PROMPT_TEMPLATE.format(question=q), add_bos=True) for q in questions
    ]
    out = greedy_generate(
      model,  # pyright: ignore[reportArgumentType]  (any module with Llama's decode API)
      pad_rows(prompts, GENERATE_ROWS),
      max_new_tokens=max_new_tokens,
      eos_id=tokenizer.eos_id,
      pad_id=tokenizer.pad_id,
    )
    return [tokenizer.decode(ids).strip() for ids in out[: len(questions)]]

  return logprob_fn, generate_fn


def evaluate(
  model: nnx.Module,
  tokenizer: Any,
  data: Any,
  *,
  retain_only_truth_ratios: np.ndarray | None = None,
  max_new_tokens: int = 128,
  batch_size: int = 16,
  generate_batch_size: int = GENERATE_BATCH,
  max_len: int = 256,
  max_items: int | None = 300,
  extra_metrics: Sequence[str] = (),
  generate_fn: GenerateFn | None = None,
  progress: bool = True,
) -> dict[str, Any]:
  """Evaluate a causal LM on the forget, retain, real-authors and world-facts sets of ``data``.

  :func:`model_fns` builds the jitted scorer and the greedy generator; :func:`evaluate_with`
  runs them batched (tqdm progress bar) and :func:`summarize` aggregates. ``generate_fn``
  replaces the greedy generator (e.g. for a model without a KV cache).

  Example::

    retain_only = evaluate(retain_model, tok, data)
    res = evaluate(model, tok, data,
                   retain_only_truth_ratios=retain_only["per_item"]["forget"]["truth_ratio"])
    res["forget_efficacy"], res["model_utility"], res["forget_quality"], res["overall"]

  Returns:
    see :func:`evaluate_with`.
  """
  logprob_fn, greedy = model_fns(model, tokenizer, max_new_tokens=max_new_tokens, max_len=max_len)
  return evaluate_with(
    logprob_fn,
    generate_fn or greedy,
    data,
    retain_only_truth_ratios=retain_only_truth_ratios,
    batch_size=batch_size,
    generate_batch_size=generate_batch_size,
    max_items=max_items,
    extra_metrics=extra_metrics,
    tokenizer=tokenizer,
    progress=progress,
  )
