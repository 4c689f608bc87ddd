"""Readers of the task files (safety, downstream), with errors that name file, line and field.

JSON Lines go through :func:`dualoptim_jax.unlearn.data.load_jsonl` (the TOFU reader), whose
:class:`~dualoptim_jax.unlearn.data.DataFormatError` names file, line and field; the checks it
cannot express (nested lists of objects, a GSM8K answer without ``####``, an answer index out of
range) are made here with the same message shape. The safety files are plain JSON as published
(an array of objects, or ``{"instructions": [...]}``): :func:`json_array` reads one array and
keeps each element's line, so their errors name the line too. XSTest is a CSV.

Layouts are those of ``shared/data/README.md``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dualoptim_jax.unlearn import data as D

__all__ = [
  "Instruction",
  "XSTestPrompt",
  "GSM8KItem",
  "ChoiceItem",
  "json_array",
  "load_instructions",
  "load_safety_responses",
  "load_seed_tasks",
  "load_xstest",
  "load_gsm8k",
  "load_multiple_choice",
]

Error = D.DataFormatError


@dataclasses.dataclass(frozen=True)
class Instruction:
  """An instruction (with optional input) and its reference response."""

  instruction: str
  input: str = ""
  output: str = ""

  @property
  def prompt(self) -> str:
    """The instruction, followed by its input on a new line when there is one."""
    return self.instruction if not self.input else f"{self.instruction}\n{self.input}"


@dataclasses.dataclass(frozen=True)
class XSTestPrompt:
  id: str
  prompt: str
  type: str
  label: str  # "safe" or "unsafe"


@dataclasses.dataclass(frozen=True)
class GSM8KItem:
  question: str
  answer: str  # the worked solution
  final: str  # the normalised number after "####"


@dataclasses.dataclass(frozen=True)
class ChoiceItem:
  question: str
  choices: tuple[str, ...]
  answer: int  # index into choices


def _line_of(text: str, pos: int) -> int:
  return text.count("\n", 0, pos) + 1


def _skip(text: str, pos: int) -> int:
  while pos < len(text) and text[pos] in " \t\r\n":
    pos += 1
  return pos


def _array_at(path: Path, text: str, pos: int) -> list[tuple[int, Any]]:
  """The elements of the JSON array starting at ``text[pos] == '['``, with their 1-based lines."""
  decoder = json.JSONDecoder()
  out: list[tuple[int, Any]] = []
  pos = _skip(text, pos + 1)
  if pos < len(text) and text[pos] == "]":
    return out
  while True:
    try:
      value, end = decoder.raw_decode(text, pos)
    except json.JSONDecodeError as e:
      raise Error(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    out.append((_line_of(text, pos), value))
    pos = _skip(text, end)
    if pos < len(text) and text[pos] == "]":
      return out
    if pos >= len(text) or text[pos] != ",":
      raise Error(f"{path}:{_line_of(text, pos)}: invalid JSON (expected ',' or ']')")
    pos = _skip(text, pos + 1)


def json_array(path: str | Path, key: str | None = None) -> list[tuple[int, Any]]:
  """The elements of a JSON file's top-level array (``key=None``) or of ``{key: [...]}``.

  Returns:
    ``(line, element)`` pairs, ``line`` the 1-based line where the element starts.

  Raises:
    DataFormatError: naming the file (and line) when it is missing, not valid JSON, not of the
      expected shape, or the array is empty.
  """
  path = Path(path)
  if not path.is_file():
    raise Error(f"{path}: file not found")
  text = path.read_text(encoding="utf-8")
  try:
    doc = json.loads(text)  # validates the whole file once; positions come from _array_at
  except json.JSONDecodeError as e:
    raise Error(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
  if key is None:
    if not isinstance(doc, list):
      raise Error(f"{path}:1: expected a JSON array, got {type(doc).__name__}")
    start = _skip(text, 0)
  else:
    if not isinstance(doc, dict) or key not in doc:
      raise Error(f"{path}:1: missing field {key!r} (expected {{{key!r}: [...]}})")
    if not isinstance(doc[key], list):
      raise Error(f"{path}:1: field {key!r} must be a list, got {type(doc[key]).__name__}")
    start = _find_key_array(text, key)
  rows = _array_at(path, text, start)
  if not rows:
    raise Error(f"{path}: no rows")
  return rows


def _find_key_array(text: str, key: str) -> int:
  """Position of the '[' of a top-level ``key`` (the document is known to hold it)."""
  decoder = json.JSONDecoder()
  pos = _skip(text, _skip(text, 0) + 1)
  while True:
    name, pos = decoder.raw_decode(text, pos)
    pos = _skip(text, _skip(text, pos) + 1)  # past ':'
    if name == key:
      return pos
    _, pos = decoder.raw_decode(text, pos)
    pos = _skip(text, _skip(text, pos) + 1)  # past ','


def _check_str(path: Path, line: int, row: Mapping[str, Any], field: str, where: str = "") -> str:
  if field not in row:
    raise Error(f"{path}:{line}: missing field {where + field!r}")
  value = row[field]
  if not isinstance(value, str):
    raise Error(f"{path}:{line}: field {where + field!r} must be a string, got {value!r:.80}")
  return value


def load_instructions(path: str | Path) -> list[str]:
  """An evaluation set ``{"instructions": [str, ...]}`` (I-MaliciousInstructions, I-CoNa, ...)."""
  path = Path(path)
  out = []
  for i, (line, value) in enumerate(json_array(path, "instructions")):
    if not isinstance(value, str) or not value.strip():
      raise Error(
        f"{path}:{line}: field 'instructions[{i}]' must be a non-empty string, got {value!r:.80}"
      )
    out.append(value)
  return out


def load_safety_responses(path: str | Path) -> list[Instruction]:
  """``safety_only_data_Instructions.json``: an array of ``{instruction, input, output}``."""
  path = Path(path)
  out = []
  for line, row in json_array(path):
    if not isinstance(row, dict):
      raise Error(f"{path}:{line}: expected a JSON object, got {type(row).__name__}")
    instruction = _check_str(path, line, row, "instruction")
    output = _check_str(path, line, row, "output")
    extra = _check_str(path, line, row, "input") if "input" in row else ""
    out.append(Instruction(instruction, extra, output))
  return out


def _numbered(path: Path, fields: Mapping[str, str]) -> list[tuple[int, dict[str, Any]]]:
  """``load_jsonl`` rows with their line numbers (both skip the same blank lines)."""
  rows = D.load_jsonl(path, fields)
  return [(line, row) for (line, _), row in zip(D._lines(path), rows)]


def load_seed_tasks(path: str | Path) -> list[Instruction]:
  """Alpaca ``seed_tasks.jsonl``: one :class:`Instruction` per instance of every task."""
  path = Path(path)
  out = []
  for line, row in _numbered(path, {"instruction": "str"}):
    instances = row.get("instances")
    if not isinstance(instances, list) or not instances:
      raise Error(f"{path}:{line}: field 'instances' must be a non-empty list of objects")
    for i, inst in enumerate(instances):
      if not isinstance(inst, dict):
        raise Error(f"{path}:{line}: field 'instances[{i}]' must be an object")
      extra = _check_str(path, line, inst, "input", f"instances[{i}].") if "input" in inst else ""
      output = _check_str(path, line, inst, "output", f"instances[{i}].")
      out.append(Instruction(row["instruction"], extra, output))
  return out


def load_xstest(path: str | Path) -> list[XSTestPrompt]:
  """``xstest_prompts.csv`` (columns id, prompt, type, label; label ``safe`` or ``unsafe``)."""
  path = Path(path)
  if not path.is_file():
    raise Error(f"{path}: file not found")
  out = []
  with path.open(encoding="utf-8", newline="") as f:
    reader = csv.DictReader(f)
    missing = [c for c in ("id", "prompt", "type", "label") if c not in (reader.fieldnames or [])]
    if missing:
      raise Error(f"{path}:1: missing column(s) {missing}")
    for row in reader:
      line = reader.line_num
      if row["label"] not in ("safe", "unsafe"):
        raise Error(
          f"{path}:{line}: field 'label' must be 'safe' or 'unsafe', got {row['label']!r}"
        )
      if not (row["prompt"] or "").strip():
        raise Error(f"{path}:{line}: field 'prompt' is empty")
      out.append(XSTestPrompt(row["id"], row["prompt"], row["type"], row["label"]))
  if not out:
    raise Error(f"{path}: no rows")
  return out


def load_gsm8k(path: str | Path) -> list[GSM8KItem]:
  """GSM8K JSON Lines: ``question``, ``answer`` ending in ``#### <number>``."""
  from dualoptim_jax.unlearn.tasks.downstream import gsm8k_reference

  path = Path(path)
  out = []
  for line, row in _numbered(path, {"question": "str", "answer": "str"}):
    final = gsm8k_reference(row["answer"])
    if final is None:
      raise Error(
        f"{path}:{line}: field 'answer' must end in '#### <number>', got ...{row['answer'][-60:]!r}"
      )
    out.append(GSM8KItem(row["question"], row["answer"], final))
  return out


def load_multiple_choice(path: str | Path) -> list[ChoiceItem]:
  """Multiple choice JSON Lines: ``question``, ``choices`` (>= 2 strings), ``answer`` (an index)."""
  path = Path(path)
  out = []
  for line, row in _numbered(path, {"question": "str", "choices": "list[str]", "answer": "int"}):
    choices = tuple(row["choices"])
    if len(choices) < 2:
      raise Error(f"{path}:{line}: field 'choices' needs at least 2 options, got {len(choices)}")
    if not 0 <= row["answer"] < len(choices):
      raise Error(
        f"{path}:{line}: field 'answer' must index the choices (0..{len(choices) - 1}), "
        f"got {row['answer']}"
      )
    out.append(ChoiceItem(row["question"], choices, row["answer"]))
  return out
