"""Tests for dualoptim_jax.unlearn.data: loaders, tokenisation, batching."""

import json
from pathlib import Path

import numpy as np
import pytest

from dualoptim_jax.unlearn import data as D
from dualoptim_jax.unlearn.synthetic import synthetic_tofu

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(
  not (SHARED / "tofu" / "forget01.json").is_file(),
  reason=f"real TOFU files not found under {SHARED}",
)


class CharTokenizer:
  """Character-level stand-in: one token per character, ids 3.. ; 0 pad, 1 bos, 2 eos."""

  pad_id, bos_id, eos_id = 0, 1, 2
  vocab_size = 3 + 256

  def encode(self, text, *, add_bos=False):
    return ([self.bos_id] if add_bos else []) + [3 + (ord(c) % 256) for c in text]

  def decode(self, ids):
    return "".join(chr(i - 3) for i in ids if i >= 3)


def _write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _write_mini_tofu(root: Path, data: D.UnlearningData, n_tasks: int = 10):
  """A TOFU-layout folder built from synthetic items: forget01 = n_tasks tasks of 2 rows."""

  def qa(it):
    return {"question": it.question, "answer": it.answer}

  def pert(it):
    return {
      **qa(it),
      "paraphrased_answer": it.paraphrased_answer,
      "perturbed_answer": list(it.perturbed_answers),
      "paraphrased_question": it.paraphrased_question,
    }

  items = data.forget_eval + data.retain_eval
  tasks = [(1 + i // 2, it) for i, it in enumerate(items[: 2 * n_tasks])]
  root.mkdir(parents=True)
  _write_jsonl(root / "forget01.json", [{"task_id": str(t), **qa(it)} for t, it in tasks])
  _write_jsonl(
    root / "forget01_perturbed.json", [{"task_id": str(t), **pert(it)} for t, it in tasks]
  )
  _write_jsonl(root / "retain90.json", [qa(it) for it in data.retain[-30:]])
  _write_jsonl(root / "retain_perturbed.json", [pert(it) for it in data.retain_eval])
  opts = lambda it: {
    **qa(it),
    "perturbed_answer": list(it.perturbed_answers),
    "original_answer": it.answer,
  }
  _write_jsonl(root / "real_authors_perturbed.json", [opts(it) for it in data.real_authors])
  _write_jsonl(root / "world_facts_perturbed.json", [opts(it) for it in data.world_facts])
  (root.parent / "idontknow.jsonl").write_text('I\'m not sure.\n"Quoted refusal."\n\nNo idea.')
  return tasks


@pytest.fixture(scope="module")
def synth():
  return synthetic_tofu(seed=0, n_authors=20, qa_per_author=10, forget_fraction=0.2)


# --------------------------------------------------------------------------- loaders (no shared data)


def test_load_tofu_from_a_folder_in_the_tofu_layout(tmp_path, synth):
  tasks = _write_mini_tofu(tmp_path / "tofu", synth)
  # Either the tofu folder or its parent may be named.
  for data_dir in (tmp_path, tmp_path / "tofu"):
    d = D.load_tofu(data_dir, "forget01", task_id=3)
    want_forget = [it.question for t, it in tasks if t == 3]
    assert [it.question for it in d.forget] == want_forget
    assert [it.question for it in d.forget_eval] == want_forget
    assert (
      d.forget_eval[0].perturbed_answers == [it for t, it in tasks if t == 3][0].perturbed_answers
    )
    # retain = retain90 rows + the other tasks of the split
    assert len(d.retain) == 30 + len(tasks) - 2
    assert not {it.question for it in d.forget} & {it.question for it in d.retain}
    assert d.idk_answers == ["I'm not sure.", "Quoted refusal.", "No idea."]
    assert len(d.real_authors[0].perturbed_answers) == 3
    assert d.name == "tofu/forget01/task3"


def test_load_tofu_rejects_bad_split_and_task(tmp_path, synth):
  _write_mini_tofu(tmp_path / "tofu", synth)
  with pytest.raises(ValueError, match="split must be one of"):
    D.load_tofu(tmp_path, "forget02")
  with pytest.raises(ValueError, match=r"task_id for forget10 must be in 1..9, got 10"):
    D.load_tofu(tmp_path, "forget10", task_id=10)
  with pytest.raises(D.DataFormatError, match="holds forget05.json"):
    D.load_tofu(tmp_path, "forget05", task_id=1)


def test_missing_idk_file_falls_back_to_builtin_with_a_warning(tmp_path, synth):
  _write_mini_tofu(tmp_path / "tofu", synth)
  (tmp_path / "idontknow.jsonl").unlink()
  with pytest.warns(UserWarning, match="built-in refusal"):
    d = D.load_tofu(tmp_path, "forget01", 1)
  assert d.idk_answers == list(D.BUILTIN_IDK_ANSWERS)


@pytest.mark.parametrize(
  "line, message",
  [
    ('{"question": "q", "answer": "a"', r"bad\.json:3: invalid JSON"),
    ('{"question": "q"}', r"bad\.json:3: missing field 'answer'"),
    ('{"question": "q", "answer": 7}', r"bad\.json:3: field 'answer' must be a string"),
    ('["q", "a"]', r"bad\.json:3: expected a JSON object"),
  ],
)
def test_malformed_jsonl_names_file_line_and_field(tmp_path, line, message):
  path = tmp_path / "bad.json"
  path.write_text('{"question": "q", "answer": "a"}\n\n' + line + "\n")  # blank line 2 is skipped
  with pytest.raises(D.DataFormatError, match=message):
    D.load_jsonl(path, {"question": "str", "answer": "str"})


def test_malformed_perturbed_and_task_id_fields(tmp_path):
  path = tmp_path / "p.json"
  path.write_text('{"task_id": "x1", "question": "q", "answer": "a"}\n')
  with pytest.raises(D.DataFormatError, match=r"p\.json:1: field 'task_id' must be an integer"):
    D.load_jsonl(path, {"task_id": "int", "question": "str", "answer": "str"})
  path.write_text('{"question": "q", "answer": "a", "perturbed_answer": "not a list"}\n')
  with pytest.raises(
    D.DataFormatError, match=r"p\.json:1: field 'perturbed_answer' must be a list of strings"
  ):
    D.load_jsonl(path, {"question": "str", "answer": "str", "perturbed_answer": "list[str]"})
  path.write_text("\n\n")
  with pytest.raises(D.DataFormatError, match="no rows"):
    D.load_jsonl(path, {"question": "str"})
  with pytest.raises(D.DataFormatError, match="file not found"):
    D.load_jsonl(tmp_path / "absent.json", {"question": "str"})


def test_load_tofu_error_names_the_broken_file(tmp_path, synth):
  _write_mini_tofu(tmp_path / "tofu", synth)
  broken = tmp_path / "tofu" / "world_facts_perturbed.json"
  lines = broken.read_text().splitlines()
  lines[4] = lines[4].replace('"perturbed_answer"', '"wrong_options"')
  broken.write_text("\n".join(lines) + "\n")
  with pytest.raises(
    D.DataFormatError, match=r"world_facts_perturbed\.json:5: missing field 'perturbed_answer'"
  ):
    D.load_tofu(tmp_path, "forget01", 1)


# --------------------------------------------------------------------------- loaders (shared data)


@needs_shared
@pytest.mark.real_data
@pytest.mark.parametrize(
  "split, n_forget, n_retain",
  [("forget01", 40, 3960), ("forget05", 200, 3800), ("forget10", 400, 3600)],
)
def test_real_tofu_split_pairing(split, n_forget, n_retain):
  d = D.load_tofu(SHARED, split, task_id=1)
  assert (len(d.forget), len(d.retain), len(d.forget_eval), len(d.retain_eval)) == (
    n_forget,
    n_retain,
    n_forget,
    400,
  )
  forget_q = {it.question for it in d.forget}
  assert not forget_q & {it.question for it in d.retain}
  assert forget_q == {it.question for it in d.forget_eval}
  assert all(len(it.perturbed_answers) == 5 and it.paraphrased_answer for it in d.forget_eval)
  assert (len(d.real_authors), len(d.world_facts)) == (100, 117)
  assert all(len(it.perturbed_answers) == 3 for it in d.real_authors + d.world_facts)
  assert len(d.idk_answers) == 100


@needs_shared
@pytest.mark.real_data
def test_real_world_maps_neighbor_to_retain():
  d = D.load_real_world(SHARED)
  assert (len(d.forget), len(d.retain), len(d.forget_eval), len(d.retain_eval)) == (
    400,
    400,
    400,
    400,
  )
  one = D.load_real_world(SHARED / "real_world", task_id=1)
  assert len(one.forget) == len(one.forget_eval) == 20
  assert len(one.real_authors) == 100  # found in the sibling tofu folder
  with pytest.raises(ValueError, match="task_id must be None or one of"):
    D.load_real_world(SHARED, task_id=99)


# --------------------------------------------------------------------------- tokenisation


def test_encode_qa_masks_exactly_the_answer_tokens():
  tok = CharTokenizer()
  e = D.encode_qa(tok, "Who?", "Bob", max_len=64)
  prompt = "Question: Who?\nAnswer:"
  assert e.input_ids[0] == tok.bos_id and e.input_ids[-1] == tok.eos_id
  assert len(e.input_ids) == 1 + len(prompt) + len(" Bob") + 1
  answer_ids = [i for i, m in zip(e.input_ids, e.answer_mask) if m]
  assert tok.decode(answer_ids) == " Bob" and answer_ids[-1] == tok.eos_id
  assert tok.decode(e.input_ids) == prompt + " Bob"
  assert e.answer_mask.index(1) == 1 + len(prompt)


def test_encode_qa_truncates_the_answer_and_rejects_no_room():
  tok = CharTokenizer()
  full = D.encode_qa(tok, "Who?", "Bob", max_len=64)
  cut = D.encode_qa(tok, "Who?", "Bob", max_len=len(full.input_ids) - 2)
  assert cut.input_ids == full.input_ids[:-2] and sum(cut.answer_mask) == sum(full.answer_mask) - 2
  with pytest.raises(ValueError, match="leaves no room for the answer"):
    D.encode_qa(tok, "Who?", "Bob", max_len=1 + len("Question: Who?\nAnswer:"))


def test_collate_pads_and_builds_masks():
  tok = CharTokenizer()
  enc = [D.encode_qa(tok, "Q?", "a", 64), D.encode_qa(tok, "Longer?", "bcd", 64)]
  b = D.collate(enc, tok.pad_id)
  n0, n1 = len(enc[0].input_ids), len(enc[1].input_ids)
  assert b["input_ids"].dtype == np.int32 and b["answer_mask"].dtype == np.float32
  assert b["input_ids"].shape == b["answer_mask"].shape == b["token_mask"].shape == (2, n1)
  assert (b["input_ids"][0, n0:] == tok.pad_id).all() and b["answer_mask"][0, n0:].sum() == 0
  assert b["answer_mask"].sum(1).tolist() == [3.0, 5.0]  # " a<eos>", " bcd<eos>"
  assert b["token_mask"].sum(1).tolist() == [n0 - 1, n1 - 1] and b["token_mask"][:, 0].sum() == 0
  assert D.collate(enc, tok.pad_id, length=40)["input_ids"].shape == (2, 40)
  with pytest.raises(ValueError, match="shorter than the longest item"):
    D.collate(enc, tok.pad_id, length=n1 - 1)


def test_tokenize_unlearning_set_pairs_true_and_idk_answers(synth):
  tok = CharTokenizer()
  arrays = D.tokenize_unlearning_set(tok, synth.forget[:6], ["No idea.", "Unknown."], 128, seed=1)
  again = D.tokenize_unlearning_set(tok, synth.forget[:6], ["No idea.", "Unknown."], 128, seed=1)
  assert set(arrays) == {
    "input_ids",
    "answer_mask",
    "token_mask",
    "idk_input_ids",
    "idk_answer_mask",
    "idk_token_mask",
  }
  assert all(np.array_equal(arrays[k], again[k]) for k in arrays)
  assert len({v.shape for v in arrays.values()}) == 1
  # The length fits the longest refusal whatever the seed picks, so shapes do not vary with it.
  prompt = lambda it: (
    1 + len(f"Question: {it.question}\nAnswer:")
  )  # <bos> + one token per character
  longest = max(
    max(prompt(it) + len(" " + it.answer) + 1 for it in synth.forget[:6]),
    max(prompt(it) for it in synth.forget[:6]) + len(" Unknown.") + 1,
  )
  short = D.tokenize_unlearning_set(
    tok, [D.QAItem("Q?", "a")], ["No idea.", "Unknown."], 128, seed=0
  )
  assert short["input_ids"].shape == (1, prompt(D.QAItem("Q?", "a")) + len(" Unknown.") + 1)
  for seed in range(4):
    other = D.tokenize_unlearning_set(
      tok, synth.forget[:6], ["No idea.", "Unknown."], 128, seed=seed
    )
    assert other["input_ids"].shape == (6, longest)
  for b in range(6):
    ids, mask = arrays["idk_input_ids"][b], arrays["idk_answer_mask"][b]
    assert tok.decode(ids[mask > 0]) in (" No idea.", " Unknown.")
    assert (
      tok.decode(arrays["input_ids"][b][arrays["answer_mask"][b] > 0])
      == " " + synth.forget[b].answer
    )


# --------------------------------------------------------------------------- batching


def test_batch_iterator_visits_every_example_once_per_epoch():
  it = D.BatchIterator({"x": np.arange(12)}, batch_size=4, seed=0)
  epochs = [np.concatenate([next(it)["x"] for _ in range(3)]) for _ in range(2)]
  assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(12))
  assert not np.array_equal(epochs[0], epochs[1])  # reshuffled
  assert it.epoch == 2.0
  plain = D.BatchIterator({"x": np.arange(5)}, batch_size=3, shuffle=False)
  assert [next(plain)["x"].tolist() for _ in range(2)] == [[0, 1, 2], [3, 4, 0]]


def test_batch_iterator_resumes_exactly_and_depends_on_seed():
  arrays = {"x": np.arange(10), "y": np.arange(10) * 2}
  a = D.BatchIterator(arrays, batch_size=4, seed=7)
  first = [next(a)["x"] for _ in range(5)]
  state = a.state_dict()
  assert state == {"position": 5, "seed": 7, "batch_size": 4, "num_examples": 10, "shuffle": 1}
  rest = [next(a) for _ in range(5)]
  b = D.BatchIterator(arrays, batch_size=4, seed=7)
  b.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip
  for want in rest:
    got = next(b)
    assert np.array_equal(got["x"], want["x"]) and np.array_equal(got["y"], 2 * got["x"])
  other = D.BatchIterator(arrays, batch_size=4, seed=8)
  assert any(not np.array_equal(next(other)["x"], f) for f in first)
  with pytest.raises(ValueError, match="saved seed=7 but this iterator has seed=8"):
    other.load_state_dict(state)


def test_batch_iterator_peek_shows_the_next_batch_without_moving_on():
  it = D.BatchIterator({"x": np.arange(5)}, 3, seed=1)
  next(it)
  seen = it.peek()
  assert it.position == 1
  np.testing.assert_array_equal(seen["x"], next(it)["x"])  # spans the epoch boundary too


def test_batch_iterator_validates():
  with pytest.raises(ValueError, match="same number of examples"):
    D.BatchIterator({"x": np.arange(3), "y": np.arange(4)}, 2)
  with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
    D.BatchIterator({"x": np.arange(3)}, 0)
  big = D.BatchIterator({"x": np.arange(3)}, batch_size=7, seed=1)
  assert sorted(next(big)["x"].tolist()) == [0, 0, 0, 1, 1, 2, 2]  # spans epochs, stays full
