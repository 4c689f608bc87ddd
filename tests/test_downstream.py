"""Downstream harness: GSM8K answer extraction and exact match, log-likelihood multiple choice."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dualoptim_jax.models.llama import Llama, LlamaConfig
from dualoptim_jax.unlearn import metrics as M
from dualoptim_jax.unlearn.data import encode_qa
from dualoptim_jax.unlearn.tasks import downstream as DS
from dualoptim_jax.unlearn.tasks import files as F


@pytest.mark.parametrize(
  "text,number",
  [
    ("42", "42"),
    ("$1,000.50", "1000.5"),
    ("18.00", "18"),
    ("-3", "-3"),
    (".5", "0.5"),
    ("7.", "7"),
    ("abc", None),
  ],
)
def test_normalize_number(text, number):
  assert DS.normalize_number(text) == number


def test_gsm8k_reference_is_the_number_after_the_marks():
  solution = "She sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 18"
  assert DS.gsm8k_reference(solution) == "18"
  assert DS.gsm8k_reference("It costs $1,200 in all.\n#### 1,200") == "1200"
  assert DS.gsm8k_reference("no final answer 18") is None


@pytest.mark.parametrize(
  "generation,number",
  [
    ("She makes 9 * 2 = 18 dollars.\n#### 18", "18"),  # the model copied the format
    ("First 3 + 4 = 7, then 16 - 7 = 9. The answer is 9 eggs.", "9"),  # "answer is" beats last
    ("The answer is $1,250. That is 5 weeks of 250.", "1250"),
    ("16 - 3 - 4 = 9, and 9 * 2 = 18", "18"),  # else the last number
    ("Answer: 3.50 dollars", "3.5"),
    ("I do not know.", None),
  ],
)
def test_extract_final_number(generation, number):
  assert DS.extract_final_number(generation) == number


def test_evaluate_generation_exact_match():
  items = [
    F.GSM8KItem("q1", "... #### 18", "18"),
    F.GSM8KItem("q2", "... #### 1000", "1000"),
    F.GSM8KItem("q3", "... #### 5", "5"),
  ]
  answers = {"q1": "so 18", "q2": "The answer is 1,000.", "q3": "I think 50"}
  seen = []

  def generate(questions):
    seen.append(list(questions))
    return [answers[q] for q in questions]

  res = DS.evaluate_generation(generate, items, batch_size=2)
  assert res["accuracy"] == pytest.approx(2 / 3)
  assert res["per_item"]["correct"] == [True, True, False]
  assert res["per_item"]["prediction"] == ["18", "1000", "50"]
  assert seen == [["q1", "q2"], ["q3"]]


def test_multiple_choice_with_a_fake_scorer():
  items = [F.ChoiceItem("q", ("a", "bbbb", "cc"), 1), F.ChoiceItem("r", ("x", "y"), 0)]
  table = {
    ("q", "a"): -2.0,
    ("q", "bbbb"): -3.0,
    ("q", "cc"): -5.0,
    ("r", "x"): -1.0,
    ("r", "y"): -4.0,
  }

  def logprob(questions, answers):
    return np.array([table[q, a] for q, a in zip(questions, answers)]), np.ones(len(answers))

  res = DS.evaluate_multiple_choice(logprob, items, batch_size=2)
  # Sum: q -> "a" (wrong), r -> "x" (right). Per character: q -> "bbbb" (-0.75, right).
  assert res["accuracy"] == 0.5
  assert res["accuracy_norm"] == 1.0
  assert res["per_item"]["prediction"] == [0, 0]


class CharTokenizer:
  bos_id, eos_id, pad_id, vocab_size = 1, 2, 0, 128

  def encode(self, text, *, add_bos=False):
    return ([self.bos_id] if add_bos else []) + [min(ord(c), 127) for c in text]

  def decode(self, ids):
    return "".join(chr(i) for i in ids if i > 2)


def test_multiple_choice_on_a_tiny_model_matches_a_hand_computation():
  tok = CharTokenizer()
  model = Llama(LlamaConfig.tiny(tok.vocab_size), rngs=nnx.Rngs(3))
  items = [
    F.ChoiceItem("What is 2+2?", ("4", "five", "22"), 0),
    F.ChoiceItem("Capital of France?", ("Paris", "Rome"), 1),
    F.ChoiceItem("Colour of grass?", ("green", "blue", "red", "a long wrong option"), 0),
  ]
  logprob_fn, _ = M.model_fns(model, tok, max_len=64, pad_to_multiple=16)
  res = DS.evaluate_multiple_choice(logprob_fn, items, batch_size=4)

  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda st, ids: nnx.merge(graphdef, st)(ids))
  hand_pred, hand_correct = [], []
  for it, got in zip(items, res["per_item"]["logprob"]):
    sums = []
    for choice in it.choices:
      enc = encode_qa(tok, it.question, choice, 64)
      ids = np.array(enc.input_ids)
      logp = np.asarray(jax.nn.log_softmax(forward(state, jnp.asarray(ids[None]))[0], -1))
      sums.append(sum(logp[t - 1, ids[t]] for t in np.nonzero(enc.answer_mask)[0]))
    np.testing.assert_allclose(got, sums, rtol=1e-4, atol=1e-4)
    hand_pred.append(int(np.argmax(sums)))
    hand_correct.append(hand_pred[-1] == it.answer)
  assert res["per_item"]["prediction"] == hand_pred
  assert res["accuracy"] == pytest.approx(np.mean(hand_correct))


def test_parse_specs():
  specs = DS.parse_specs("gsm8k=/d/gsm.jsonl, arc_c=~/arc.jsonl")
  assert [(s.name, s.format) for s in specs] == [("gsm8k", "generation"), ("arc_c", "choice")]
  assert str(specs[0].path) == "/d/gsm.jsonl" and "~" not in str(specs[1].path)
  assert DS.parse_specs(None) == () and DS.parse_specs("") == ()
  for bad, msg in (("gsm8k", "NAME=PATH"), ("a=x,a=y", "distinct"), ("1x=p", "word")):
    with pytest.raises(ValueError, match=msg):
      DS.parse_specs(bad)


def test_evaluate_downstream_reads_files(tmp_path):
  gsm = tmp_path / "gsm.jsonl"
  gsm.write_text(
    '{"question": "1+1?", "answer": "#### 2"}\n{"question": "2+3?", "answer": "#### 5"}\n'
  )
  mc = tmp_path / "mc.jsonl"
  mc.write_text('{"question": "q", "choices": ["yes", "no"], "answer": 1}\n')
  specs = DS.parse_specs(f"gsm8k={gsm},mc={mc}")

  def generate(questions):
    return ["2" for _ in questions]

  def logprob(questions, answers):
    return np.array([-1.0 if a == "no" else -2.0 for a in answers]), np.ones(len(answers))

  res = DS.evaluate_downstream(specs, logprob, generate)
  assert res["downstream_gsm8k"] == 0.5 and res["downstream_mc"] == 1.0
  assert res["downstream"] == 0.75
  assert DS.evaluate_downstream(specs, logprob, generate, max_items=1)["downstream_gsm8k"] == 1.0


def test_real_gsm8k_file_parses(shared_data):
  items = F.load_gsm8k(shared_data / "downstream" / "gsm8k_test.jsonl")
  assert len(items) == 1319
  assert items[0].final == "18"
  assert all(DS.normalize_number(it.final) == it.final for it in items)
