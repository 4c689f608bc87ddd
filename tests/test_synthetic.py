"""Tests for dualoptim_jax.unlearn.synthetic: the built-in fictitious-author data."""

import re

import pytest

from dualoptim_jax.unlearn import data as D
from dualoptim_jax.unlearn.synthetic import synthetic_tofu


@pytest.fixture(scope="module")
def synth():
  return synthetic_tofu(seed=0, n_authors=20, qa_per_author=10, forget_fraction=0.2)


def test_synthetic_is_deterministic_and_seed_dependent():
  a, b = synthetic_tofu(seed=3), synthetic_tofu(seed=3)
  assert a == b
  assert synthetic_tofu(seed=4).forget != a.forget


def test_synthetic_schema_and_author_split(synth):
  assert (len(synth.forget), len(synth.retain)) == (40, 160)  # 4 of 20 authors forgotten
  name = lambda it: re.search(r"[A-Z][a-z]+ [A-Z][a-z]+", it.question).group(0)
  forget_names, retain_names = {name(it) for it in synth.forget}, {name(it) for it in synth.retain}
  assert len(forget_names) == 4 and len(retain_names) == 16 and not forget_names & retain_names
  assert [it.question for it in synth.forget] == [it.question for it in synth.forget_eval]
  assert {it.question for it in synth.retain_eval} <= {it.question for it in synth.retain}
  for it in synth.forget_eval + synth.retain_eval:
    assert it.paraphrased_answer and it.paraphrased_question
    assert len(set(it.perturbed_answers)) == 5 and it.paraphrased_answer not in it.perturbed_answers
  for it in synth.real_authors + synth.world_facts:
    assert len(it.perturbed_answers) == 3 and it.answer not in it.perturbed_answers
  assert synth.idk_answers == list(D.BUILTIN_IDK_ANSWERS)


def test_synthetic_default_is_small():
  d = synthetic_tofu()
  assert (len(d.forget), len(d.retain)) == (20, 180)
  assert max(len(it.answer) for it in d.forget + d.retain) < 60


@pytest.mark.parametrize(
  "kwargs, message",
  [
    ({"n_authors": 1}, "n_authors must be in 2..320, got 1"),
    ({"qa_per_author": 11}, "qa_per_author must be in 1..10, got 11"),
    ({"forget_fraction": 1.0}, r"forget_fraction must be in \(0, 1\), got 1.0"),
    ({"n_general": 0}, "n_general must be in 1..16, got 0"),
    ({"n_retain_eval_authors": 19}, "n_retain_eval_authors must be in 1..18, got 19"),
  ],
)
def test_synthetic_validates_arguments(kwargs, message):
  with pytest.raises(ValueError, match=message):
    synthetic_tofu(**kwargs)
