"""Prompt formats of the tasks, their scorer and generator, and the supervised objective.

A :class:`PromptFormat` turns an instruction into prompt tokens and a response into the scored
answer tokens:

* ``plain`` -- the format every built-in model learns in its initial fine-tune, that of
  :func:`dualoptim_jax.unlearn.data.encode_qa`: ``<bos>Question: {instruction}\\nAnswer:`` then
  `` {response}<eos>``;
* ``chat`` -- the model's own chat template (:mod:`dualoptim_jax.models.chat`) with the default
  system message, ``...<|im_start|>user\\n{instruction}<|im_end|>\\n<|im_start|>assistant\\n``,
  then ``{response}<eos>`` (``<|im_end|>`` for SmolLM2): how an instruct model is prompted.

:func:`format_fns` gives the ``(logprob_fn, generate_fn)`` pair of
:func:`dualoptim_jax.unlearn.metrics.evaluate_with` for a format, and :class:`SupervisedObjective`
is the two-objective loss of tasks whose objectives are both "learn these responses" (safety:
safe responses, then helpful ones or KL to the initial model).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx

from dualoptim_jax.models.chat import chat_prompt
from dualoptim_jax.models.generate import greedy_generate
from dualoptim_jax.unlearn import data as D
from dualoptim_jax.unlearn.batching import GENERATE_ROWS, pad_rows
from dualoptim_jax.unlearn.losses import answer_logprobs, masked_nll, reference_kl

__all__ = [
  "PromptFormat",
  "plain_format",
  "chat_format",
  "encode",
  "encode_pairs",
  "format_fns",
  "SupervisedObjective",
  "answer_nll",
]


class PromptFormat(NamedTuple):
  """How instructions become prompts: ``prompt(instruction) -> ids``, ``answer(text) -> ids``."""

  name: str
  prompt: Callable[[str], list[int]]
  answer: Callable[[str], list[int]]


def plain_format(tok: D.TokenizerLike) -> PromptFormat:
  """``<bos>Question: {q}\\nAnswer:`` + `` {a}<eos>`` (the TOFU format of ``data.encode_qa``)."""
  return PromptFormat(
    "plain",
    lambda q: tok.encode(D.PROMPT_TEMPLATE.format(question=q), add_bos=True),
    lambda a: tok.encode(" " + a) + [tok.eos_id],
  )


def chat_format(tok: Any) -> PromptFormat:
  """The tokenizer's own chat template (``tok.chat_template``), a user turn per instruction."""
  template = tok.chat_template
  chat_prompt(template, "check")  # raises now for a tokenizer without a renderable template
  return PromptFormat(
    "chat", lambda q: tok.encode(chat_prompt(template, q)), lambda a: tok.encode(a) + [tok.eos_id]
  )


def encode(fmt: PromptFormat, instruction: str, response: str, max_len: int) -> D.EncodedQA:
  """Prompt + response tokens, response tokens masked; the response is cut to fit ``max_len``."""
  prompt = fmt.prompt(instruction)
  room = max_len - len(prompt)
  if room < 1:
    prompt = prompt[-(max_len - 1) :]  # keep the end of an over-long prompt (the turn marker)
    room = 1
  answer = fmt.answer(response)[:room]
  return D.EncodedQA(tuple(prompt + answer), (0,) * len(prompt) + (1,) * len(answer))


def encode_pairs(
  fmt: PromptFormat, pad_id: int, pairs: Sequence[tuple[str, str]], max_len: int
) -> dict[str, np.ndarray]:
  """``data.collate`` of :func:`encode` over (instruction, response) pairs."""
  return D.collate([encode(fmt, q, a, max_len) for q, a in pairs], pad_id)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _logprob_sums(graphdef, state, input_ids, answer_mask):
  return answer_logprobs(nnx.merge(graphdef, state)(input_ids), input_ids, answer_mask)


def format_fns(
  model: Any,
  tok: Any,
  fmt: PromptFormat,
  *,
  max_new_tokens: int,
  max_len: int,
  pad_to_multiple: int = 32,
) -> tuple[Callable, Callable]:
  """``(logprob_fn, generate_fn)`` in ``fmt``: summed response log-probs, greedy responses."""

  def logprob_fn(questions: Sequence[str], answers: Sequence[str]):
    encoded = [encode(fmt, q, a, max_len) for q, a in zip(questions, answers)]
    longest = max(len(e.input_ids) for e in encoded)
    length = min(-(-longest // pad_to_multiple) * pad_to_multiple, max(max_len, longest))
    batch = D.collate(pad_rows(encoded), tok.pad_id, length)
    graphdef, state = nnx.split(model)
    sums = _logprob_sums(graphdef, state, batch["input_ids"], batch["answer_mask"])
    n = len(encoded)
    return np.asarray(sums, np.float64)[:n], batch["answer_mask"][:n].sum(-1).astype(np.float64)

  def generate_fn(questions: Sequence[str]) -> list[str]:
    limit = max(1, max_len - max_new_tokens)  # long prompts keep their end (the turn marker)
    prompts = [fmt.prompt(q)[-limit:] for q in questions]
    out = greedy_generate(
      model,
      pad_rows(prompts, GENERATE_ROWS),
      max_new_tokens=max_new_tokens,
      eos_id=tok.eos_id,
      pad_id=tok.pad_id,
    )
    return [tok.decode(ids).strip() for ids in out[: len(questions)]]

  return logprob_fn, generate_fn


@dataclasses.dataclass(frozen=True)
class SupervisedObjective:
  """Two supervised objectives: ``c_0 NLL(batch_0)`` and ``c_1 NLL(batch_1)`` or ``c_1 KL``.

  The trainer drives it like an unlearning :class:`~dualoptim_jax.unlearn.losses.Objective`
  (``forget_loss`` is objective 0, ``retain_loss`` objective 1). ``retain="KL"`` replaces the
  second NLL with the KL divergence from the frozen initial model at the response positions of
  batch 1 (:func:`~dualoptim_jax.unlearn.losses.reference_kl`): stay close to the initial model
  on benign instructions rather than fit their reference responses.
  """

  forget: str = "SFT"
  retain: str = "SFT"
  forget_coef: float = 1.0
  retain_coef: float = 1.0

  def __post_init__(self):
    if self.forget != "SFT" or self.retain not in ("SFT", "KL"):
      raise ValueError(f"SupervisedObjective is SFT+SFT or SFT+KL, got {self.name}")

  @property
  def name(self) -> str:
    return f"{self.forget}+{self.retain}"

  @property
  def needs_reference(self) -> bool:
    return self.retain == "KL"

  def forget_loss(self, model_fn, ref_fn, batch):
    del ref_fn
    ids = batch["input_ids"]
    return masked_nll(model_fn(ids), ids, batch["answer_mask"])

  def retain_loss(self, model_fn, ref_fn, batch):
    ids = batch["input_ids"]
    if self.retain == "SFT":
      return masked_nll(model_fn(ids), ids, batch["answer_mask"])
    if ref_fn is None:
      raise ValueError("SFT+KL needs the reference model")
    ref_logits = jax.lax.stop_gradient(ref_fn(ids))
    return reference_kl(model_fn(ids), ref_logits, batch["answer_mask"])


def answer_nll(logprob_fn: Callable, questions: Sequence[str], answers: Sequence[str]) -> float:
  """Token-mean NLL of ``answers`` given ``questions`` (summed over all tokens, then divided)."""
  total, count = 0.0, 0.0
  for start in range(0, len(questions), 16):
    lp, n = logprob_fn(questions[start : start + 16], answers[start : start + 16])
    total += float(np.sum(lp))
    count += float(np.sum(n))
  return -total / max(count, 1.0)
