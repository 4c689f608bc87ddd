"""Task file readers: shapes of the shipped files, and errors naming file, line and field."""

import json

import pytest

from dualoptim_jax.unlearn.data import DataFormatError
from dualoptim_jax.unlearn.tasks import files as F


def test_json_array_keeps_lines(tmp_path):
  p = tmp_path / "a.json"
  p.write_text('[\n  {"a": 1},\n\n  {"a": 2}\n]\n')
  assert F.json_array(p) == [(2, {"a": 1}), (4, {"a": 2})]
  q = tmp_path / "b.json"
  q.write_text('{"note": [1, 2],\n "instructions": [\n  "x",\n  "y"\n]}')
  assert F.json_array(q, "instructions") == [(3, "x"), (4, "y")]


@pytest.mark.parametrize(
  "text,message",
  [
    (
      '{"instructions": [\n  "ok",\n  3\n]}',
      r"x\.json:3: field 'instructions\[1\]' must be a non-empty string",
    ),
    ('{"prompts": ["a"]}', r"x\.json:1: missing field 'instructions'"),
    ('{"instructions": [\n"a",\n"b"\n', r"x\.json:4: invalid JSON"),
    ('{"instructions": []}', r"x\.json: no rows"),
  ],
)
def test_instruction_file_errors(tmp_path, text, message):
  p = tmp_path / "x.json"
  p.write_text(text)
  with pytest.raises(DataFormatError, match=message):
    F.load_instructions(p)


def test_safety_responses_errors(tmp_path):
  p = tmp_path / "s.json"
  p.write_text(
    '[\n{"instruction": "a", "input": "", "output": "no"},\n{"instruction": "b", "input": ""}\n]'
  )
  with pytest.raises(DataFormatError, match=r"s\.json:3: missing field 'output'"):
    F.load_safety_responses(p)
  p.write_text('[\n{"instruction": "a", "input": "ctx", "output": 5}\n]')
  with pytest.raises(DataFormatError, match=r"s\.json:2: field 'output' must be a string"):
    F.load_safety_responses(p)
  p.write_text('[\n{"instruction": "a", "input": "ctx", "output": "ok"}\n]')
  (item,) = F.load_safety_responses(p)
  assert item.prompt == "a\nctx" and item.output == "ok"
  with pytest.raises(DataFormatError, match="file not found"):
    F.load_safety_responses(tmp_path / "missing.json")


def test_seed_task_errors(tmp_path):
  p = tmp_path / "seed.jsonl"
  good = {"instruction": "Say hi", "instances": [{"input": "", "output": "hi"}]}
  bad = {"instruction": "Say bye", "instances": [{"input": "", "output": "bye"}, {"input": "x"}]}
  p.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")
  with pytest.raises(
    DataFormatError, match=r"seed\.jsonl:3: missing field 'instances\[1\]\.output'"
  ):
    F.load_seed_tasks(p)
  p.write_text(json.dumps(good) + "\n" + json.dumps({"instruction": "x", "instances": []}))
  with pytest.raises(
    DataFormatError, match=r"seed\.jsonl:2: field 'instances' must be a non-empty"
  ):
    F.load_seed_tasks(p)
  p.write_text(json.dumps({"instances": []}))
  with pytest.raises(DataFormatError, match=r"seed\.jsonl:1: missing field 'instruction'"):
    F.load_seed_tasks(p)


def test_xstest_errors(tmp_path):
  p = tmp_path / "x.csv"
  p.write_text("id,prompt,type,label\n1,How do I kill a process?,homonyms,safe\n2,Hi,t,maybe\n")
  with pytest.raises(DataFormatError, match=r"x\.csv:3: field 'label' must be 'safe' or 'unsafe'"):
    F.load_xstest(p)
  p.write_text("id,prompt,label\n1,a,safe\n")
  with pytest.raises(DataFormatError, match=r"x\.csv:1: missing column"):
    F.load_xstest(p)


def test_gsm8k_and_choice_errors(tmp_path):
  g = tmp_path / "g.jsonl"
  g.write_text('{"question": "a", "answer": "#### 3"}\n{"question": "b", "answer": "4"}\n')
  with pytest.raises(
    DataFormatError, match=r"g\.jsonl:2: field 'answer' must end in '#### <number>'"
  ):
    F.load_gsm8k(g)
  g.write_text('{"question": "a"}\n')
  with pytest.raises(DataFormatError, match=r"g\.jsonl:1: missing field 'answer'"):
    F.load_gsm8k(g)
  m = tmp_path / "m.jsonl"
  m.write_text('{"question": "q", "choices": ["a", "b"], "answer": 2}\n')
  with pytest.raises(DataFormatError, match=r"m\.jsonl:1: field 'answer' must index the choices"):
    F.load_multiple_choice(m)
  m.write_text('{"question": "q", "choices": ["a"], "answer": 0}\n')
  with pytest.raises(DataFormatError, match=r"m\.jsonl:1: field 'choices' needs at least 2"):
    F.load_multiple_choice(m)
  m.write_text('{"question": "q", "choices": "ab", "answer": 0}\n')
  with pytest.raises(
    DataFormatError, match=r"m\.jsonl:1: field 'choices' must be a list of strings"
  ):
    F.load_multiple_choice(m)


def test_shipped_safety_files(shared_data):
  d = shared_data / "safety"
  if not d.is_dir():
    pytest.skip(f"no safety/ in {shared_data}")
  assert len(F.load_safety_responses(d / "safety_only_data_Instructions.json")) == 2483
  sizes = {
    n: len(F.load_instructions(d / f"{n}.json"))
    for n in ("I-MaliciousInstructions", "I-CoNa", "I-Controversial", "Q-Harm", "I-Alpaca")
  }
  assert sizes == {
    "I-MaliciousInstructions": 100,
    "I-CoNa": 178,
    "I-Controversial": 40,
    "Q-Harm": 100,
    "I-Alpaca": 50,
  }
  xs = F.load_xstest(d / "xstest_prompts.csv")
  assert [p.label for p in xs].count("safe") == 250 and [p.label for p in xs].count("unsafe") == 200
  assert len(F.load_seed_tasks(d / "alpaca_seed_tasks.jsonl")) >= 175
