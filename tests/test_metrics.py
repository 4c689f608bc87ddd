"""Tests of dualoptim_jax.unlearn.metrics: hand-computed TOFU / closer-look values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from dualoptim_jax.unlearn import metrics as M
from dualoptim_jax.unlearn.data import QAItem, UnlearningData

LOG = math.log


# --------------------------------------------------------------------------------------------
# Per-item maths.


def test_length_normalized_prob_is_geometric_mean_token_prob():
  # 2 tokens of prob 0.5 each; 4 tokens of prob 0.25 each.
  got = M.length_normalized_prob(np.array([2 * LOG(0.5), 4 * LOG(0.25)]), np.array([2, 4]))
  np.testing.assert_allclose(got, [0.5, 0.25], rtol=1e-12)


def test_length_normalized_prob_rejects_empty_answers():
  with pytest.raises(ValueError, match="n_tokens"):
    M.length_normalized_prob(np.array([0.0]), np.array([0]))


def test_truth_ratio_uses_geometric_mean_of_perturbed():
  # Item 0: paraphrase 0.5, perturbed 0.25 and 0.0625 -> sqrt(0.25 * 0.0625) / 0.5 = 0.25
  # (an arithmetic mean would give 0.3125). Item 1: one perturbed answer (NaN pad), 0.6 / 0.2 = 3.
  para = np.array([LOG(0.5), LOG(0.2)])
  pert = np.array([[LOG(0.25), LOG(0.0625)], [LOG(0.6), np.nan]])
  r = M.truth_ratios(para, pert)
  np.testing.assert_allclose(r, [0.25, 3.0], rtol=1e-12)
  # forget: mean(min(R, 1/R)) = (0.25 + 1/3) / 2; others: mean(max(0, 1 - R)) = (0.75 + 0) / 2.
  assert M.forget_truth_ratio_score(r) == pytest.approx((0.25 + 1 / 3) / 2, rel=1e-12)
  assert M.utility_truth_ratio_score(r) == pytest.approx(0.375, rel=1e-12)


def test_truth_ratio_needs_a_perturbed_answer():
  with pytest.raises(ValueError, match="perturbed"):
    M.truth_ratios(np.array([0.0]), np.array([[np.nan]]))


def test_option_normalized_probs():
  # 0.5 / (0.5 + 0.25 + 0.25) = 0.5 ; 0.3 / (0.3 + 0.1) = 0.75 (NaN pads a missing option).
  true = np.array([LOG(0.5), LOG(0.3)])
  pert = np.array([[LOG(0.25), LOG(0.25)], [LOG(0.1), np.nan]])
  np.testing.assert_allclose(M.option_normalized_probs(true, pert), [0.5, 0.75], rtol=1e-12)


def test_option_normalized_probs_do_not_underflow():
  # exp(-1000) underflows to 0, but the ratio is 1 / (1 + e^-1).
  got = M.option_normalized_probs(np.array([-1000.0]), np.array([[-1001.0]]))
  np.testing.assert_allclose(got, [1 / (1 + math.exp(-1))], rtol=1e-12)


def test_rouge_l_recall_by_hand():
  refs = ["The cat sat on the mat", "He likes running", "Paris France", "Something"]
  gens = ["the cat is on a mat", "he like runs", "The capital is Paris, in France", ""]
  # 1: LCS(the cat sat on the mat / the cat is on a mat) = the cat on mat -> 4 of 6 reference tokens.
  # 2: Porter stemming of tokens longer than 3 chars: likes->like, running->run, runs->run -> 3/3
  #    (1/3 without the stemmer). 3: recall, not precision: both reference tokens appear -> 1.
  # 4: empty generation -> 0.
  np.testing.assert_allclose(M.rouge_l_recall(gens, refs), [4 / 6, 1.0, 1.0, 0.0], rtol=1e-12)


def test_rouge_l_recall_length_mismatch():
  with pytest.raises(ValueError, match="2 generations for 1"):
    M.rouge_l_recall(["a", "b"], ["a"])


def test_harmonic_mean():
  assert M.harmonic_mean([1.0, 0.5, 0.25]) == pytest.approx(3 / 7, rel=1e-12)
  assert M.harmonic_mean([0.9, 0.0, 0.4]) == 0.0
  v = np.random.default_rng(0).uniform(0.05, 1.0, 9)
  assert M.harmonic_mean(v) == pytest.approx(stats.hmean(v), rel=1e-12)
  with pytest.raises(ValueError, match=">= 0"):
    M.harmonic_mean([0.5, -0.1])


def test_forget_quality_exact_small_samples():
  # Fully separated samples of 3 and 3: D = 1 and the exact two-sided p-value is
  # 2 / C(6, 3) = 0.1 (only the two orderings with all of one sample first are as extreme).
  res = M.forget_quality(np.array([1.0, 2.0, 3.0]), np.array([4.0, 5.0, 6.0]))
  assert res.statistic == pytest.approx(1.0)
  assert res.pvalue == pytest.approx(0.1, rel=1e-9)
  same = M.forget_quality(np.array([0.3, 0.5, 2.0]), np.array([0.3, 0.5, 2.0]))
  assert same.statistic == 0.0 and same.pvalue == pytest.approx(1.0)
  # Interleaved 1,2,3,4,5,6: the ECDFs differ by at most 1/3.
  assert M.forget_quality(
    np.array([1.0, 3.0, 5.0]), np.array([2.0, 4.0, 6.0])
  ).statistic == pytest.approx(1 / 3)


def test_forget_quality_matches_scipy_on_tofu_orientation():
  # TOFU passes 1/R (paraphrased over perturbed); KS depends only on ranks, so R gives the same.
  rng = np.random.default_rng(1)
  a, b = np.exp(rng.normal(0.0, 1.0, 40)), np.exp(rng.normal(0.4, 1.2, 35))
  ref = stats.ks_2samp(1 / a, 1 / b)
  res = M.forget_quality(a, b)
  assert res.pvalue == pytest.approx(ref.pvalue, rel=1e-9)
  assert res.statistic == pytest.approx(ref.statistic, rel=1e-12)
  assert 0.0 < res.pvalue < 1.0


def test_efficacy_and_overall():
  assert M.untargeted_forget_efficacy([0.6, 0.5, 0.2]) == pytest.approx(1 - 1.3 / 3)
  assert M.overall_score(0.7, 0.3) == pytest.approx(0.5)


def test_normalized_token_entropy():
  assert M.normalized_token_entropy([7]) == 0.0
  assert M.normalized_token_entropy([1, 2, 3, 4]) == pytest.approx(1.0)
  assert M.normalized_token_entropy([5, 5, 5, 5]) == 0.0
  # 1,1,2,2: H = 1 bit, max log2(4) = 2 bits.
  assert M.normalized_token_entropy([1, 1, 2, 2]) == pytest.approx(0.5)


# --------------------------------------------------------------------------------------------
# Aggregation.


def _scores(extras=None):
  ex = extras or {}
  return {
    "forget": M.SplitScores(
      np.array([0.8, 0.4]), np.array([1.0, 0.0]), np.array([0.25, 3.0]), ex.get("forget", {})
    ),
    "retain": M.SplitScores(
      np.array([0.9]), np.array([1.0]), np.array([0.2]), ex.get("retain", {})
    ),
    "real_authors": M.SplitScores(
      np.array([0.6]), np.array([0.5]), np.array([0.5]), ex.get("real_authors", {})
    ),
    "world_facts": M.SplitScores(
      np.array([0.5]), np.array([0.25]), np.array([0.75]), ex.get("world_facts", {})
    ),
  }


def test_summarize_by_hand():
  out = M.summarize(_scores())
  assert out["forget_prob"] == pytest.approx(0.6)
  assert out["forget_rouge"] == pytest.approx(0.5)
  tr_f = (0.25 + 1 / 3) / 2
  assert out["forget_truth_ratio"] == pytest.approx(tr_f)
  assert out["retain_truth_ratio"] == pytest.approx(0.8)
  assert out["world_facts_truth_ratio"] == pytest.approx(0.25)
  nine = [0.9, 1.0, 0.8, 0.6, 0.5, 0.5, 0.5, 0.25, 0.25]
  assert out["model_utility"] == pytest.approx(9 / sum(1 / v for v in nine))
  ufe = 1 - (0.6 + 0.5 + (1 - tr_f)) / 3
  assert out["forget_efficacy"] == pytest.approx(ufe)
  assert out["overall"] == pytest.approx((ufe + out["model_utility"]) / 2)
  assert out["forget_quality"] is None and out["ks_statistic"] is None
  assert len(out["components"]["model_utility"]) == 9
  assert out["components"]["forget_efficacy"] == [
    "forget_prob",
    "forget_rouge",
    "1 - forget_truth_ratio",
  ]
  assert "entailment_score" in out["components"]["not_included"]


def test_summarize_forget_quality_against_retain_only():
  out = M.summarize(_scores(), retain_only_truth_ratios=np.array([0.25, 3.0]))
  assert out["forget_quality"] == pytest.approx(1.0)
  assert out["ks_statistic"] == pytest.approx(0.0)


def test_registered_extra_metric_enters_utility_and_efficacy(monkeypatch):
  monkeypatch.setattr(M, "_EXTRA_METRICS", dict(M._EXTRA_METRICS))
  M.register_metric("const_half", lambda o: np.full(len(o.items), 0.5))
  with pytest.raises(ValueError, match="already registered"):
    M.register_metric("const_half", lambda o: np.zeros(len(o.items)))
  extras = {s: {"const_half": np.array([0.5])} for s in M.SPLITS}
  extras["forget"] = {"const_half": np.array([0.5, 0.5])}
  out = M.summarize(_scores(extras))
  nine = [0.9, 1.0, 0.8, 0.6, 0.5, 0.5, 0.5, 0.25, 0.25]
  assert out["model_utility"] == pytest.approx(12 / (sum(1 / v for v in nine) + 3 / 0.5))
  tr_f = (0.25 + 1 / 3) / 2
  assert out["forget_efficacy"] == pytest.approx(1 - (0.6 + 0.5 + (1 - tr_f) + 0.5) / 4)
  assert "retain_const_half" in out["components"]["model_utility"]
  assert "forget_const_half" in out["components"]["forget_efficacy"]


def test_register_metric_rejects_bad_name():
  with pytest.raises(ValueError, match="identifier"):
    M.register_metric("cos sim", lambda o: o.rouge)


# --------------------------------------------------------------------------------------------
# evaluate_with: fake scorer and generator with known outputs.

# Normalised probability of each answer (the fake model's p(a|q)^(1/|a|)).
PROBS = {
  "A one": 0.8,
  "A para": 0.5,
  "W a": 0.25,
  "W b": 0.0625,
  "B": 0.4,
  "B para": 0.2,
  "X": 0.6,
  "R ans": 0.9,
  "R para": 0.5,
  "R wrong": 0.1,
  "Shakespeare": 0.6,
  "Dickens": 0.2,
  "Woolf": 0.1,
  "Twain": 0.1,
  "Paris France": 0.5,
  "Rome": 0.25,
}
GENERATIONS = {
  "Q1": "A one",
  "Q2": "nothing",
  "QR": "R ans",
  "QA": "William Shakespeare",
  "QW": "Paris",
}


def _data():
  return UnlearningData(
    forget=[],
    retain=[],
    forget_eval=[
      QAItem("Q1", "A one", "A para", ("W a", "W b")),
      QAItem("Q2", "B", "B para", ("X",)),
    ],
    retain_eval=[QAItem("QR", "R ans", "R para", ("R wrong",))],
    real_authors=[QAItem("QA", "Shakespeare", None, ("Dickens", "Woolf", "Twain"))],
    world_facts=[QAItem("QW", "Paris France", None, ("Rome",))],
    idk_answers=[],
    name="fake",
  )


class FakeModel:
  """Sum log-prob = |a| * log(PROBS[a]) with |a| the word count: evaluate must length-normalise."""

  def __init__(self):
    self.scored: list[tuple[str, str]] = []

  def logprob(self, questions, answers):
    self.scored += list(zip(questions, answers))
    n = np.array([len(a.split()) for a in answers], np.float64)
    return n * np.log([PROBS[a] for a in answers]), n

  @staticmethod
  def generate(questions):
    return [GENERATIONS[q] for q in questions]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_evaluate_with_fakes(batch_size):
  fake = FakeModel()
  out = M.evaluate_with(
    fake.logprob,
    fake.generate,
    _data(),
    batch_size=batch_size,
    progress=False,
    retain_only_truth_ratios=np.array([0.25, 3.0]),
  )
  assert out["forget_prob"] == pytest.approx((0.8 + 0.4) / 2)
  assert out["forget_rouge"] == pytest.approx(0.5)  # exact answer, then no overlap
  tr_f = (
    0.25 + 1 / 3
  ) / 2  # R = 0.25 and 3 as in test_truth_ratio_uses_geometric_mean_of_perturbed
  assert out["forget_truth_ratio"] == pytest.approx(tr_f)
  assert out["retain_prob"] == pytest.approx(0.9)
  assert out["retain_truth_ratio"] == pytest.approx(1 - 0.1 / 0.5)
  # Real authors: option-normalised 0.6 / (0.6 + 0.2 + 0.1 + 0.1); truth ratio relative to the answer.
  assert out["real_authors_prob"] == pytest.approx(0.6)
  r_ra = (0.2 * 0.1 * 0.1) ** (1 / 3) / 0.6
  assert out["real_authors_truth_ratio"] == pytest.approx(1 - r_ra)
  assert out["real_authors_rouge"] == pytest.approx(1.0)
  assert out["world_facts_prob"] == pytest.approx(0.5 / 0.75)
  assert out["world_facts_truth_ratio"] == pytest.approx(0.5)
  assert out["world_facts_rouge"] == pytest.approx(0.5)
  nine = [0.9, 1.0, 0.8, 0.6, 1.0, 1 - r_ra, 0.5 / 0.75, 0.5, 0.5]
  assert out["model_utility"] == pytest.approx(9 / sum(1 / v for v in nine))
  assert out["forget_efficacy"] == pytest.approx(1 - (0.6 + 0.5 + 1 - tr_f) / 3)
  assert out["forget_quality"] == pytest.approx(1.0)  # same truth ratios as the "retain-only" model
  np.testing.assert_allclose(out["per_item"]["forget"]["truth_ratio"], [0.25, 3.0], rtol=1e-12)
  assert out["per_item"]["forget"]["generation"] == ["A one", "nothing"]
  assert out["n_items"] == {"forget": 2, "retain": 1, "real_authors": 1, "world_facts": 1}
  # On real authors the truth ratio's reference is the answer itself: scored once, not twice.
  assert len(fake.scored) == len(set(fake.scored))


@pytest.mark.parametrize("generate_batch_size, calls", [(64, [5]), (2, [2, 2, 1])])
def test_evaluate_with_generates_every_split_together(generate_batch_size, calls):
  # Each split's answers must come back to its own items, whichever call decoded them.
  sizes = []

  def generate(questions):
    sizes.append(len(questions))
    return [GENERATIONS[q] for q in questions]

  out = M.evaluate_with(
    FakeModel().logprob,
    generate,
    _data(),
    generate_batch_size=generate_batch_size,
    progress=False,
  )
  assert sizes == calls
  gens = {s: out["per_item"][s]["generation"] for s in M.SPLITS}
  assert gens == {
    "forget": ["A one", "nothing"],
    "retain": ["R ans"],
    "real_authors": ["William Shakespeare"],
    "world_facts": ["Paris"],
  }
  with pytest.raises(ValueError, match="generate_batch_size"):
    M.evaluate_with(FakeModel().logprob, generate, _data(), generate_batch_size=0)


def test_evaluate_with_max_items_and_token_entropy():
  class WordTokenizer:
    def encode(self, text, *, add_bos=False):
      return [hash(w) for w in text.split()]

  fake = FakeModel()
  out = M.evaluate_with(
    fake.logprob,
    fake.generate,
    _data(),
    max_items=1,
    progress=False,
    extra_metrics=["token_entropy"],
    tokenizer=WordTokenizer(),
  )
  assert out["n_items"]["forget"] == 1
  assert out["forget_prob"] == pytest.approx(0.8)
  # "William Shakespeare": two distinct tokens -> 1; "Paris": one token -> 0.
  assert out["real_authors_token_entropy"] == pytest.approx(1.0)
  assert out["world_facts_token_entropy"] == 0.0
  assert "retain_token_entropy" in out["components"]["model_utility"]
  assert "forget_token_entropy" not in out["components"]["forget_efficacy"]
  assert "token_entropy" not in out["components"]["not_included"]


def test_evaluate_with_skips_empty_utility_sets():
  # The real-world task without TOFU beside it has no real authors / world facts: MU is the
  # harmonic mean of the retain values only, and the components say so.
  data = _data()
  data.real_authors, data.world_facts = [], []
  out = M.evaluate_with(FakeModel().logprob, FakeModel.generate, data, progress=False)
  assert out["n_items"] == {"forget": 2, "retain": 1}
  assert "real_authors_prob" not in out
  assert out["components"]["model_utility"] == ["retain_prob", "retain_rouge", "retain_truth_ratio"]
  assert out["model_utility"] == pytest.approx(3 / (1 / 0.9 + 1 / 1.0 + 1 / 0.8))
  data.retain_eval = []
  with pytest.raises(ValueError, match="split 'retain' .* is empty"):
    M.evaluate_with(FakeModel().logprob, FakeModel.generate, data, progress=False)


def test_evaluate_with_rejects_missing_paraphrase():
  data = _data()
  data.retain_eval = [QAItem("QR", "R ans", None, ("R wrong",))]
  with pytest.raises(ValueError, match="retain item 0 .* paraphrased_answer"):
    M.evaluate_with(FakeModel().logprob, FakeModel.generate, data, progress=False)


def test_evaluate_with_rejects_unknown_extra_metric():
  with pytest.raises(ValueError, match="unknown extra metric 'nli'"):
    M.evaluate_with(
      FakeModel().logprob, FakeModel.generate, _data(), extra_metrics=["nli"], progress=False
    )


# --------------------------------------------------------------------------------------------
# evaluate(model, tokenizer, ...): the jitted scorer and the generator adapter.

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from dualoptim_jax.models import generate as generate_lib  # noqa: E402
from dualoptim_jax.models.generate import greedy_generate  # noqa: E402
from dualoptim_jax.models.llama import Llama, LlamaConfig  # noqa: E402
from dualoptim_jax.unlearn.data import PROMPT_TEMPLATE, encode_qa  # noqa: E402


class CharTokenizer:
  """ASCII characters as ids 3..127; 0 pad, 1 bos, 2 eos."""

  pad_id, bos_id, eos_id, vocab_size = 0, 1, 2, 128

  def encode(self, text, *, add_bos=False):
    return ([self.bos_id] if add_bos else []) + [ord(c) for c in text]

  def decode(self, ids):
    return "".join(chr(i) for i in ids if i > 2)


class UniformLM(nnx.Module):
  """Equal logits everywhere: every token has probability 1/V."""

  def __call__(self, input_ids):
    return jnp.zeros(input_ids.shape + (CharTokenizer.vocab_size,), jnp.float32)


def test_evaluate_uniform_model_exact_values():
  out = M.evaluate(
    UniformLM(),
    CharTokenizer(),
    _data(),
    generate_fn=FakeModel.generate,
    batch_size=3,
    progress=False,
  )
  v = CharTokenizer.vocab_size
  # Length-normalised probability is 1/V whatever the answer's length; options are equally likely.
  assert out["forget_prob"] == pytest.approx(1 / v, rel=1e-5)
  assert out["retain_prob"] == pytest.approx(1 / v, rel=1e-5)
  assert out["real_authors_prob"] == pytest.approx(1 / 4, rel=1e-5)  # answer + 3 wrong options
  assert out["world_facts_prob"] == pytest.approx(1 / 2, rel=1e-5)
  # R = 1: forget score min(R, 1/R) = 1, utility score max(0, 1 - R) = 0, so MU = 0.
  np.testing.assert_allclose(out["per_item"]["forget"]["truth_ratio"], [1.0, 1.0], rtol=1e-5)
  assert out["forget_truth_ratio"] == pytest.approx(1.0, rel=1e-5)
  assert out["retain_truth_ratio"] == pytest.approx(0.0, abs=1e-5)
  assert out["model_utility"] == 0.0
  assert out["forget_rouge"] == pytest.approx(0.5)  # generation came from generate_fn


@pytest.fixture(scope="module")
def tiny_llama():
  return Llama(LlamaConfig.tiny(CharTokenizer.vocab_size), rngs=nnx.Rngs(0))


def test_model_scorer_matches_unbatched_log_softmax(tiny_llama):
  tok = CharTokenizer()
  # Four rows of three lengths (the shorter rows are right-padded).
  pairs = [("Q1", "A one"), ("Q2", "B two"), ("Q", "a much longer answer than the others")]
  pairs.append(("Q3", "cut at max_len " * 8))  # its last answer token is the row's last token
  logprob_fn, _ = M.model_fns(tiny_llama, tok, max_len=64, pad_to_multiple=16)
  got_lp, got_n = logprob_fn([q for q, _ in pairs], [a for _, a in pairs])
  graphdef, state = nnx.split(tiny_llama)
  forward = jax.jit(lambda st, ids: nnx.merge(graphdef, st)(ids))  # eager is slower than compiling
  for (q, a), lp, n in zip(pairs, got_lp, got_n):
    enc = encode_qa(tok, q, a, 64)
    ids = np.array(enc.input_ids)
    logp = np.asarray(
      jax.nn.log_softmax(forward(state, jnp.asarray(ids[None]))[0], axis=-1), np.float64
    )
    answer = np.nonzero(enc.answer_mask)[0]  # token t is predicted by the logits at t - 1
    # The answer follows "Answer:" after a space, then <eos>, unless cut at max_len.
    assert n == min(len(" " + a) + 1, 64 - enc.answer_mask.index(1)) == sum(enc.answer_mask)
    assert lp == pytest.approx(sum(logp[t - 1, ids[t]] for t in answer), rel=1e-4, abs=1e-4)


def test_model_generator_matches_greedy_generate(tiny_llama):
  tok = CharTokenizer()
  questions = ["Q1", "Q22", "Q3"]  # one prompt-length bucket: two compilations only
  _, generate_fn = M.model_fns(tiny_llama, tok, max_new_tokens=5)
  got = generate_fn(questions)
  for q, g in zip(questions, got):
    ids = greedy_generate(
      tiny_llama,
      [tok.encode(PROMPT_TEMPLATE.format(question=q), add_bos=True)],
      max_new_tokens=5,
      eos_id=tok.eos_id,
      pad_id=tok.pad_id,
    )[0]
    assert g == tok.decode(ids).strip()
  assert len(got) == 3


@pytest.mark.real_data
def test_evaluate_with_real_tofu_files(shared_data):
  from dualoptim_jax.unlearn.data import load_tofu

  data = load_tofu(shared_data, "forget01", task_id=1)

  def logprob(questions, answers):  # every token equally likely: only the set structure matters
    n = np.array([len(a.split()) + 1 for a in answers], np.float64)
    return n * math.log(0.1), n

  out = M.evaluate_with(logprob, lambda qs: ["" for _ in qs], data, batch_size=64, progress=False)
  # TOFU's ds_size: the first 300 items of each split.
  assert out["n_items"] == {"forget": 40, "retain": 300, "real_authors": 100, "world_facts": 117}
  assert out["forget_prob"] == pytest.approx(0.1)
  # Real authors / world facts: the answer and 3 wrong options -> 1/4.
  assert out["real_authors_prob"] == pytest.approx(0.25)
  assert out["world_facts_prob"] == pytest.approx(0.25)
  assert out["forget_truth_ratio"] == pytest.approx(1.0)
  assert out["forget_rouge"] == 0.0 and out["model_utility"] == 0.0


def test_summarize_half_is_summarize_of_the_halves_items():
  rng = np.random.default_rng(0)
  per_item = {
    split: {
      "prob": rng.uniform(0.1, 1, 6).tolist(),
      "rouge": rng.uniform(0.1, 1, 6).tolist(),
      "truth_ratio": rng.uniform(0.2, 2, 6).tolist(),
      "generation": ["x"] * 6,
      "token_entropy": rng.uniform(0.1, 1, 6).tolist(),
    }
    for split in ("forget", "retain")
  }
  ref = rng.uniform(0.2, 2, 6)
  got = M.summarize_half({"per_item": per_item}, "test", retain_only_truth_ratios=ref)
  odd = lambda v: np.asarray(v)[1::2]
  want = M.summarize(
    {
      s: M.SplitScores(
        odd(d["prob"]),
        odd(d["rouge"]),
        odd(d["truth_ratio"]),
        {"token_entropy": odd(d["token_entropy"])},
      )
      for s, d in per_item.items()
    },
    retain_only_truth_ratios=odd(ref),
  )
  assert got == want
  assert M.half(5, "validation").tolist() == [0, 2, 4] and M.half(5, "test").tolist() == [1, 3]
  with pytest.raises(ValueError, match="too few to halve"):
    M.summarize_half({"per_item": {"forget": {"prob": [0.5]}}}, "test")


def test_a_restored_and_a_fresh_model_share_the_evaluation_programs():
  # A model restored from a checkpoint holds committed arrays and a fine-tuned one uncommitted
  # arrays; jit compiles (and keys the persistent cache) differently for each unless the
  # evaluation commits them first.
  tok = CharTokenizer()
  model = Llama(LlamaConfig.tiny(CharTokenizer.vocab_size), rngs=nnx.Rngs(1))
  logprob_fn, generate_fn = M.model_fns(model, tok, max_new_tokens=3)
  assert not jax.tree.leaves(nnx.state(model))[0].committed
  first = (logprob_fn(["Q1"], ["A1"]), generate_fn(["Q1"]))
  programs = (M._answer_logprob_sums._cache_size(), generate_lib._generate_cached._cache_size())
  graphdef, state = nnx.split(model)
  nnx.update(model, jax.tree.map(lambda x: jax.device_put(x, jax.devices()[0]), state))
  assert jax.tree.leaves(nnx.state(model))[0].committed
  second = (logprob_fn(["Q1"], ["A1"]), generate_fn(["Q1"]))
  assert (
    M._answer_logprob_sums._cache_size(),
    generate_lib._generate_cached._cache_size(),
  ) == programs
  np.testing.assert_array_equal(first[0][0], second[0][0])
  assert first[1] == second[1]
