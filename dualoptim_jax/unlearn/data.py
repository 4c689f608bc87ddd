"""Unlearning data: TOFU-format loaders, tokenisation and batching.

Everything the unlearning pipeline reads comes through :class:`UnlearningData`:

* ``forget`` / ``retain`` -- the training sets of the unlearning run (question, answer);
* ``forget_eval`` / ``retain_eval`` -- evaluation items that also carry a paraphrased answer and
  perturbed (wrong) answers, for the truth ratio;
* ``real_authors`` / ``world_facts`` -- utility sets whose ``perturbed_answers`` are the wrong
  options of a multiple-choice question, so metrics can option-normalise probabilities;
* ``idk_answers`` -- refusal strings for the IDK family of losses.

Sources: :func:`load_tofu` and :func:`load_real_world` read the JSON Lines layout described in
``shared/data/README.md``; :func:`dualoptim_jax.unlearn.synthetic.synthetic_tofu` generates a small
deterministic stand-in with the same schema (the main job's default).

TOFU split pairing (checked on the shipped files by row counts and question overlap): the
``retainYY`` file that goes with a forget split is the complement of *all* its tasks pooled,

======== ======================= ============ ======
split    forget rows (all tasks) retain file  rows
======== ======================= ============ ======
forget01 400 (10 tasks x 40)     retain90     3600
forget05 2000 (10 tasks x 200)   retain50     2000
forget10 3600 (9 tasks x 400)    retain10     400
======== ======================= ============ ======

and, as in the "closer look" / DualOptim code, the retain set of task ``k`` is ``retainYY`` plus the
split's other tasks, i.e. everything in TOFU except the forgotten task (3960 rows for forget01).

Prompt format (:data:`PROMPT_TEMPLATE`): ``"<bos>Question: {question}\\nAnswer:"`` followed by
``" {answer}<eos>"``. The prompt and the answer are tokenised separately, so the answer tokens are
exactly the answer's own tokens whatever the tokenizer's merges, and only they are scored.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np

__all__ = [
  "PROMPT_TEMPLATE",
  "TOFU_SPLITS",
  "BUILTIN_IDK_ANSWERS",
  "DataFormatError",
  "QAItem",
  "UnlearningData",
  "TokenizerLike",
  "EncodedQA",
  "load_jsonl",
  "load_idk_answers",
  "load_tofu",
  "load_real_world",
  "encode_qa",
  "collate",
  "encode_pairs",
  "tokenize_unlearning_set",
  "BatchIterator",
]

PROMPT_TEMPLATE = "Question: {question}\nAnswer:"

# split -> (retain file, the task ids the forget file holds)
TOFU_SPLITS: dict[str, tuple[str, tuple[int, ...]]] = {
  "forget01": ("retain90", tuple(range(1, 11))),
  "forget05": ("retain50", tuple(range(1, 11))),
  "forget10": ("retain10", tuple(range(1, 10))),
}

# Used when a data directory has no idontknow.jsonl, and by the synthetic data.
BUILTIN_IDK_ANSWERS: tuple[str, ...] = (
  "I don't know.",
  "I'm not sure.",
  "I have no idea.",
  "I can't answer that.",
  "I don't have that information.",
  "That is unknown to me.",
  "I am not able to say.",
  "I cannot recall that.",
  "No idea, sorry.",
  "I do not know the answer.",
)


class DataFormatError(ValueError):
  """A data file is missing, malformed, or does not have the expected fields."""


@dataclasses.dataclass(frozen=True)
class QAItem:
  """One question/answer pair.

  ``perturbed_answers`` are wrong answers: five paraphrase-perturbations for TOFU forget/retain
  evaluation, or the wrong options of a multiple-choice question for real authors / world facts
  (the options are then ``(answer, *perturbed_answers)``).
  """

  question: str
  answer: str
  paraphrased_answer: str | None = None
  perturbed_answers: tuple[str, ...] = ()
  paraphrased_question: str | None = None


@dataclasses.dataclass
class UnlearningData:
  """Everything one unlearning experiment reads (see the module docstring)."""

  forget: list[QAItem]
  retain: list[QAItem]
  forget_eval: list[QAItem]
  retain_eval: list[QAItem]
  real_authors: list[QAItem]
  world_facts: list[QAItem]
  idk_answers: list[str]
  name: str

  def summary(self) -> str:
    """One line with the size of every set."""
    sizes = ", ".join(
      f"{field}={len(getattr(self, field))}"
      for field in (
        "forget",
        "retain",
        "forget_eval",
        "retain_eval",
        "real_authors",
        "world_facts",
        "idk_answers",
      )
    )
    return f"{self.name}: {sizes}"


# ------------------------------------------------------------------------------------------------
# JSON Lines reading with errors that name file, line and field.

_FIELD_TYPES = {
  "str": (lambda v: isinstance(v, str), "a string"),
  "list[str]": (
    lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "a list of strings",
  ),
  "int": (
    lambda v: (
      (isinstance(v, int) and not isinstance(v, bool))
      or (isinstance(v, str) and v.strip().lstrip("-").isdigit())
    ),
    "an integer (or a string of digits)",
  ),
}


def _lines(path: Path) -> Iterator[tuple[int, str]]:
  """(1-based line number, stripped text) of the non-blank lines of a file."""
  if not path.is_file():
    raise DataFormatError(f"{path}: file not found")
  with path.open(encoding="utf-8") as f:
    for lineno, line in enumerate(f, start=1):
      if line.strip():
        yield lineno, line.strip()


def load_jsonl(path: str | Path, fields: Mapping[str, str]) -> list[dict[str, Any]]:
  """Reads a JSON Lines file whose rows are objects with the given fields.

  Args:
    path: the file; blank lines are skipped.
    fields: required field name -> type, one of ``"str"``, ``"list[str]"``, ``"int"`` (an
      ``int`` field may be written as a string of digits, as TOFU's ``task_id`` is; it is
      returned as ``int``). Other fields of a row are kept as they are.

  Returns:
    The rows, in file order.

  Raises:
    DataFormatError: naming the file and 1-based line number, and the field when one is missing
      or of the wrong type.
  """
  path = Path(path)
  rows = []
  for lineno, line in _lines(path):
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataFormatError(
        f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})"
      ) from None
    if not isinstance(row, dict):
      raise DataFormatError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
    for name, kind in fields.items():
      if name not in row:
        raise DataFormatError(f"{path}:{lineno}: missing field {name!r}")
      check, description = _FIELD_TYPES[kind]
      if not check(row[name]):
        raise DataFormatError(
          f"{path}:{lineno}: field {name!r} must be {description}, got {row[name]!r:.80}"
        )
      if kind == "int":
        row[name] = int(row[name])
    rows.append(row)
  if not rows:
    raise DataFormatError(f"{path}: no rows")
  return rows


def load_idk_answers(path: str | Path) -> list[str]:
  """Reads refusal answers, one per line (plain text; a line holding a JSON string is decoded)."""
  path = Path(path)
  answers = []
  for lineno, text in _lines(path):
    if text.startswith('"'):
      try:
        text = json.loads(text)
      except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}:{lineno}: invalid JSON string ({e.msg})") from None
      if not isinstance(text, str):
        raise DataFormatError(f"{path}:{lineno}: expected a string")
    answers.append(text)
  if not answers:
    raise DataFormatError(f"{path}: no refusal answers")
  return answers


_QA = {"question": "str", "answer": "str"}
_PERTURBED = {
  **_QA,
  "paraphrased_answer": "str",
  "perturbed_answer": "list[str]",
  "paraphrased_question": "str",
}
_OPTIONS = {**_QA, "perturbed_answer": "list[str]"}


def qa_items(rows: Sequence[Mapping[str, Any]], answer: str = "answer") -> list[QAItem]:
  """Rows of a QA file as :class:`QAItem` s, the answer read from field ``answer``."""
  return [
    QAItem(
      question=r["question"],
      answer=r[answer],
      paraphrased_answer=r.get("paraphrased_answer"),
      perturbed_answers=tuple(r.get("perturbed_answer", ())),
      paraphrased_question=r.get("paraphrased_question"),
    )
    for r in rows
  ]


def _find_idk(*dirs: Path) -> list[str]:
  for d in dirs:
    if (d / "idontknow.jsonl").is_file():
      return load_idk_answers(d / "idontknow.jsonl")
  warnings.warn(
    f"no idontknow.jsonl in {', '.join(map(str, dirs))}; using the built-in refusal answers",
    stacklevel=3,
  )
  return list(BUILTIN_IDK_ANSWERS)


def _resolve(data_dir: str | Path, sub: str, marker: str) -> Path:
  """``data_dir`` itself or ``data_dir/sub``, whichever holds ``marker``."""
  data_dir = Path(data_dir).expanduser()
  for d in (data_dir, data_dir / sub):
    if (d / marker).is_file():
      return d
  raise DataFormatError(f"{data_dir}: neither it nor {data_dir / sub} holds {marker}")


def load_tofu(data_dir: str | Path, split: str = "forget01", task_id: int = 1) -> UnlearningData:
  """Loads one TOFU unlearning task from JSON Lines files.

  Args:
    data_dir: the ``tofu`` folder, or a folder that holds ``tofu/`` (like ``shared/data``).
      ``idontknow.jsonl`` is looked for beside the TOFU files, then in the parent folder, and
      the built-in refusal list is used (with a warning) when neither has it.
    split: ``"forget01"``, ``"forget05"`` or ``"forget10"`` (1 %, 5 %, 10 % of the authors).
    task_id: which of the split's disjoint forget sets to unlearn: 1..10 (1..9 for forget10);
      the standard benchmark is 1.

  Returns:
    ``forget`` = the task's rows of ``{split}.json``; ``retain`` = ``retainYY.json`` plus the
    split's other tasks (see the module docstring); ``forget_eval`` = the task's rows of
    ``{split}_perturbed.json``; ``retain_eval`` = ``retain_perturbed.json``; ``real_authors`` /
    ``world_facts`` from their ``*_perturbed.json`` files with the wrong options as
    ``perturbed_answers``.
  """
  if split not in TOFU_SPLITS:
    raise ValueError(f"split must be one of {sorted(TOFU_SPLITS)}, got {split!r}")
  retain_name, task_ids = TOFU_SPLITS[split]
  if task_id not in task_ids:
    raise ValueError(
      f"task_id for {split} must be in {task_ids[0]}..{task_ids[-1]}, got {task_id!r}"
    )
  root = _resolve(data_dir, "tofu", f"{split}.json")

  forget_rows = load_jsonl(root / f"{split}.json", {**_QA, "task_id": "int"})
  forget = [r for r in forget_rows if r["task_id"] == task_id]
  if not forget:
    raise DataFormatError(f"{root / f'{split}.json'}: no rows with task_id {task_id}")
  others = [r for r in forget_rows if r["task_id"] != task_id]
  retain = load_jsonl(root / f"{retain_name}.json", _QA) + others
  forget_eval = [
    r
    for r in load_jsonl(root / f"{split}_perturbed.json", {**_PERTURBED, "task_id": "int"})
    if r["task_id"] == task_id
  ]
  return UnlearningData(
    forget=qa_items(forget),
    retain=qa_items(retain),
    forget_eval=qa_items(forget_eval),
    retain_eval=qa_items(load_jsonl(root / "retain_perturbed.json", _PERTURBED)),
    real_authors=qa_items(load_jsonl(root / "real_authors_perturbed.json", _OPTIONS)),
    world_facts=qa_items(load_jsonl(root / "world_facts_perturbed.json", _OPTIONS)),
    idk_answers=_find_idk(root, root.parent),
    name=f"tofu/{split}/task{task_id}",
  )


def real_world_forget_rows(
  root: Path, task_id: int | None, fields: Mapping[str, str], perturbed: Mapping[str, str]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  """The rows of ``forget.json`` and ``forget_perturbed.json`` in ``root`` (checked against
  ``fields`` / ``perturbed`` plus ``task_id``), only person ``task_id``'s if it is given.

  Raises:
    ValueError: a ``task_id`` that no row has.
  """
  forget = load_jsonl(root / "forget.json", {**fields, "task_id": "int"})
  forget_eval = load_jsonl(root / "forget_perturbed.json", {**perturbed, "task_id": "int"})
  if task_id is not None:
    available = sorted({r["task_id"] for r in forget})
    if task_id not in available:
      raise ValueError(f"task_id must be None or one of {available}, got {task_id!r}")
    forget = [r for r in forget if r["task_id"] == task_id]
    forget_eval = [r for r in forget_eval if r["task_id"] == task_id]
  return forget, forget_eval


def load_real_world(data_dir: str | Path, task_id: int | None = None) -> UnlearningData:
  """Loads the real-world unlearning task (famous people) into the same structure.

  Args:
    data_dir: the ``real_world`` folder, or a folder that holds ``real_world/``.
    task_id: keep only the forget rows of this target (1..20 in the shipped files); ``None``
      (default) forgets all targets.

  Returns:
    ``forget`` / ``forget_eval`` from ``forget.json`` / ``forget_perturbed.json``; ``retain`` /
    ``retain_eval`` from ``neighbor.json`` / ``neighbor_perturbed.json`` (the neighbouring
    knowledge to keep). ``real_authors`` / ``world_facts`` come from a sibling ``tofu/`` folder
    when there is one, and are empty otherwise.
  """
  root = _resolve(data_dir, "real_world", "forget.json")
  forget, forget_eval = real_world_forget_rows(root, task_id, _QA, _PERTURBED)
  tofu = root.parent / "tofu"
  has_tofu = (tofu / "real_authors_perturbed.json").is_file()
  return UnlearningData(
    forget=qa_items(forget),
    retain=qa_items(load_jsonl(root / "neighbor.json", _QA)),
    forget_eval=qa_items(forget_eval),
    retain_eval=qa_items(load_jsonl(root / "neighbor_perturbed.json", _PERTURBED)),
    real_authors=qa_items(load_jsonl(tofu / "real_authors_perturbed.json", _OPTIONS))
    if has_tofu
    else [],
    world_facts=qa_items(load_jsonl(tofu / "world_facts_perturbed.json", _OPTIONS))
    if has_tofu
    else [],
    idk_answers=_find_idk(root, root.parent),
    name="real_world" + ("" if task_id is None else f"/task{task_id}"),
  )


# ------------------------------------------------------------------------------------------------
# Tokenisation.


class TokenizerLike(Protocol):
  """What data.py needs of a tokenizer (``dualoptim_jax.models.Tokenizer`` has it)."""

  bos_id: int
  eos_id: int
  pad_id: int

  def encode(self, text: str, *, add_bos: bool = False) -> list[int]: ...


class EncodedQA(NamedTuple):
  """One tokenised question/answer: ``answer_mask[t] = 1`` iff ``input_ids[t]`` is an answer token."""

  input_ids: tuple[int, ...]
  answer_mask: tuple[int, ...]


def _answer_ids(tokenizer: TokenizerLike, answer: str) -> list[int]:
  """The scored tokens of an answer: `` {answer}<eos>``."""
  return tokenizer.encode(" " + answer) + [tokenizer.eos_id]


def encode_qa(tokenizer: TokenizerLike, question: str, answer: str, max_len: int) -> EncodedQA:
  """Tokenises ``<bos>Question: {question}\\nAnswer:`` + `` {answer}<eos>``, answer tokens masked.

  The answer (with its ``<eos>``) is truncated to fit ``max_len`` tokens; at least one answer
  token must fit.

  Raises:
    ValueError: if the prompt alone leaves no room for an answer token within ``max_len``.
  """
  prompt = tokenizer.encode(PROMPT_TEMPLATE.format(question=question), add_bos=True)
  answer_ids = _answer_ids(tokenizer, answer)
  room = max_len - len(prompt)
  if room < 1:
    raise ValueError(
      f"max_len={max_len} leaves no room for the answer: the prompt of question "
      f"{question[:60]!r} is {len(prompt)} tokens"
    )
  answer_ids = answer_ids[:room]
  return EncodedQA(tuple(prompt + answer_ids), (0,) * len(prompt) + (1,) * len(answer_ids))


def collate(
  encoded: Sequence[EncodedQA], pad_id: int, length: int | None = None
) -> dict[str, np.ndarray]:
  """Stacks encoded items into a right-padded batch.

  Returns:
    ``input_ids`` int32 (B, T), padded with ``pad_id``; ``answer_mask`` float32 (B, T), 1 on
    answer tokens (token t is predicted by ``logits[:, t - 1]``); ``token_mask`` float32 (B, T),
    1 on every real token after the first (every predicted token, prompt included), for losses
    that score the whole sequence. ``T = length`` or, when None, the longest item.
  """
  if not encoded:
    raise ValueError("collate needs at least one item")
  longest = max(len(e.input_ids) for e in encoded)
  length = longest if length is None else length
  if length < longest:
    raise ValueError(f"length={length} is shorter than the longest item ({longest} tokens)")
  ids = np.full((len(encoded), length), pad_id, np.int32)
  answer_mask = np.zeros((len(encoded), length), np.float32)
  token_mask = np.zeros((len(encoded), length), np.float32)
  for b, e in enumerate(encoded):
    ids[b, : len(e.input_ids)] = e.input_ids
    answer_mask[b, : len(e.answer_mask)] = e.answer_mask
    token_mask[b, 1 : len(e.input_ids)] = 1.0
  return {"input_ids": ids, "answer_mask": answer_mask, "token_mask": token_mask}


def encode_pairs(
  tokenizer: TokenizerLike,
  pairs: Sequence[tuple[str, str]],
  max_len: int,
  length: int | None = None,
) -> dict[str, np.ndarray]:
  """``collate`` of ``encode_qa`` over (question, answer) pairs."""
  return collate([encode_qa(tokenizer, q, a, max_len) for q, a in pairs], tokenizer.pad_id, length)


def tokenize_unlearning_set(
  tokenizer: TokenizerLike,
  items: Sequence[QAItem],
  idk_answers: Sequence[str],
  max_len: int,
  *,
  seed: int = 0,
  length: int | None = None,
) -> dict[str, np.ndarray]:
  """Tokenises a forget or retain set for the unlearning losses.

  Each item appears twice: with its true answer (``input_ids``, ``answer_mask``, ``token_mask``)
  and with a refusal drawn from ``idk_answers`` (``idk_input_ids``, ``idk_answer_mask``,
  ``idk_token_mask``), the pair the IDK, DPO and AP losses compare. The refusal of item ``i`` is
  fixed by ``seed``. All arrays share one length: ``length``, or by default the longest sequence
  any choice of refusals could give (capped at ``max_len``), so the shapes -- and a jitted step's
  compilation -- do not depend on ``seed``.
  """
  if not items:
    raise ValueError("tokenize_unlearning_set needs at least one item")
  if not idk_answers:
    raise ValueError("idk_answers must not be empty")
  rng = np.random.default_rng(seed)
  picks = rng.integers(len(idk_answers), size=len(items))
  true = [encode_qa(tokenizer, it.question, it.answer, max_len) for it in items]
  idk = [
    encode_qa(tokenizer, it.question, str(idk_answers[int(k)]), max_len)
    for it, k in zip(items, picks)
  ]
  if length is None:
    longest_idk = max(len(_answer_ids(tokenizer, a)) for a in idk_answers)
    longest_prompt = max(len(e.input_ids) - sum(e.answer_mask) for e in true)
    length = min(max_len, max(max(len(e.input_ids) for e in true), longest_prompt + longest_idk))
  out = collate(true, tokenizer.pad_id, length)
  out.update({f"idk_{k}": v for k, v in collate(idk, tokenizer.pad_id, length).items()})
  return out


# ------------------------------------------------------------------------------------------------
# Batching.


class BatchIterator:
  """Endless, seeded minibatches over a dict of equal-length arrays, with resumable position.

  The example order is the concatenation of one permutation per epoch, permutation ``e`` drawn
  from ``numpy.random.default_rng((seed, e))``; batch ``k`` is positions ``k*B .. k*B + B - 1``
  of that stream, so a batch may span an epoch boundary and every batch is full. The position is
  the only state, so :meth:`state_dict` is a small dict of ints and resuming from it reproduces
  the same batches exactly.

  Args:
    arrays: name -> array with the examples on axis 0 (e.g. from :func:`tokenize_unlearning_set`).
    batch_size: examples per batch, >= 1 (may exceed the number of examples).
    seed: seeds the epoch permutations.
    shuffle: False keeps file order in every epoch.
  """

  def __init__(
    self, arrays: Mapping[str, np.ndarray], batch_size: int, *, seed: int = 0, shuffle: bool = True
  ):
    if not arrays:
      raise ValueError("arrays must not be empty")
    sizes = {k: len(v) for k, v in arrays.items()}
    if len(set(sizes.values())) != 1:
      raise ValueError(f"arrays must have the same number of examples, got {sizes}")
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
    self.num_examples = next(iter(sizes.values()))
    if self.num_examples < 1:
      raise ValueError("arrays hold no examples")
    self.batch_size = batch_size
    self.seed = seed
    self.shuffle = shuffle
    self.position = 0
    self._cache: tuple[int, np.ndarray] | None = None

  def _epoch_order(self, epoch: int) -> np.ndarray:
    if not self.shuffle:
      return np.arange(self.num_examples)
    if self._cache is None or self._cache[0] != epoch:
      self._cache = (
        epoch,
        np.random.default_rng((self.seed, epoch)).permutation(self.num_examples),
      )
    return self._cache[1]

  def indices(self, position: int) -> np.ndarray:
    """The example indices of batch number ``position``."""
    start = position * self.batch_size
    flat = np.arange(start, start + self.batch_size)
    epochs, offsets = np.divmod(flat, self.num_examples)
    out = np.empty(self.batch_size, np.int64)
    for e in np.unique(epochs):
      sel = epochs == e
      out[sel] = self._epoch_order(int(e))[offsets[sel]]
    return out

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = self.peek()
    self.position += 1
    return batch

  def peek(self) -> dict[str, np.ndarray]:
    """The next batch, without moving on."""
    idx = self.indices(self.position)
    return {k: v[idx] for k, v in self.arrays.items()}

  @property
  def epoch(self) -> float:
    """Epochs consumed so far (fractional)."""
    return self.position * self.batch_size / self.num_examples

  def state_dict(self) -> dict[str, int]:
    """``{"position", "seed", "batch_size", "num_examples", "shuffle"}``, all ints."""
    return {
      "position": self.position,
      "seed": int(self.seed),
      "batch_size": self.batch_size,
      "num_examples": self.num_examples,
      "shuffle": int(self.shuffle),
    }

  def load_state_dict(self, state: Mapping[str, int]) -> None:
    """Resumes at ``state["position"]``; the other fields must match this iterator's."""
    mine = self.state_dict()
    for key in ("seed", "batch_size", "num_examples", "shuffle"):
      if int(state[key]) != mine[key]:
        raise ValueError(
          f"cannot resume: saved {key}={int(state[key])} but this iterator has {key}={mine[key]}"
        )
    if int(state["position"]) < 0:
      raise ValueError(f"cannot resume: position must be >= 0, got {state['position']}")
    self.position = int(state["position"])
