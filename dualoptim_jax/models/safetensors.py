"""Hugging Face-style checkpoint directories: ``config.json`` + ``*.safetensors`` (+ tokenizer).

:func:`load_pretrained` reads a ``LlamaForCausalLM`` directory as written by ``transformers``
(one or several ``*.safetensors`` shards, any of float32 / float16 / bfloat16) into :class:`Llama`;
:func:`save_pretrained` writes one that :func:`load_pretrained` and ``transformers`` can read.
Weight names and layouts are the HF ones (see :mod:`dualoptim_jax.models.hf_weights`).

Tokenizer files, when present: ``tokenizer.json``; the special ids come from ``config.json``
(``bos_token_id`` / ``eos_token_id`` / ``pad_token_id``, pad defaulting to EOS) and the chat template
from ``tokenizer_config.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import tokenizers

from dualoptim_jax.models.hf_weights import (
  config_from_hf,
  config_to_hf,
  from_hf_weights,
  to_hf_weights,
)
from dualoptim_jax.models.llama import Llama
from dualoptim_jax.models.tokenizer import Tokenizer

__all__ = ["load_pretrained", "save_pretrained"]


def save_pretrained(
  model: Llama,
  directory: str | os.PathLike,
  *,
  tokenizer: Tokenizer | None = None,
  dtype=np.float32,
) -> Path:
  """Writes ``config.json``, ``model.safetensors`` (and tokenizer files) into ``directory``."""
  from safetensors.numpy import save_file

  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  extra: dict[str, Any] = {}
  if tokenizer is not None:
    extra = dict(
      bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id
    )
  extra["torch_dtype"] = np.dtype(dtype).name
  (directory / "config.json").write_text(json.dumps(config_to_hf(model.config, **extra), indent=2))
  weights = {k: v.astype(dtype) for k, v in to_hf_weights(model).items()}
  save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
  if tokenizer is not None:
    tokenizer.save(directory / "tokenizer.json")
    tok_cfg = {
      "bos_token": tokenizer.id_to_token(tokenizer.bos_id),
      "eos_token": tokenizer.id_to_token(tokenizer.eos_id),
      "pad_token": tokenizer.id_to_token(tokenizer.pad_id),
      "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if tokenizer.chat_template is not None:
      tok_cfg["chat_template"] = tokenizer.chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
  return directory


def _read_weights(directory: Path) -> dict[str, np.ndarray]:
  from safetensors import safe_open

  files = sorted(directory.glob("*.safetensors"))
  if not files:
    raise FileNotFoundError(f"{directory}: no *.safetensors files")
  weights = {}
  for file in files:
    # The flax backend reads bfloat16 too (numpy has no bfloat16 of its own).
    with safe_open(str(file), framework="flax") as f:
      for name in f.keys():
        if name in weights:
          raise ValueError(f"{file}: tensor {name!r} appears in more than one shard")
        weights[name] = np.asarray(f.get_tensor(name))
  return weights


def _read_tokenizer(directory: Path, hf_config: dict) -> Tokenizer | None:
  path = directory / "tokenizer.json"
  if not path.exists():
    return None
  tok = tokenizers.Tokenizer.from_file(str(path))
  tok_cfg_path = directory / "tokenizer_config.json"
  tok_cfg = json.loads(tok_cfg_path.read_text()) if tok_cfg_path.exists() else {}

  def special_id(key):
    if hf_config.get(f"{key}_token_id") is not None:
      value = hf_config[f"{key}_token_id"]
      return int(value[0] if isinstance(value, list) else value)
    token = tok_cfg.get(f"{key}_token")
    token = token.get("content") if isinstance(token, dict) else token
    return None if token is None else tok.token_to_id(token)

  eos = special_id("eos")
  if eos is None:
    raise ValueError(
      f"{directory}: no eos_token_id in config.json nor eos_token in tokenizer_config.json"
    )
  bos, pad = special_id("bos"), special_id("pad")
  return Tokenizer.from_hf_tokenizer(
    tok,
    bos_id=eos if bos is None else bos,
    eos_id=eos,
    pad_id=eos if pad is None else pad,
    chat_template=tok_cfg.get("chat_template"),
  )


def load_pretrained(
  directory: str | os.PathLike, *, param_dtype=jnp.float32
) -> tuple[Llama, Tokenizer | None]:
  """Reads a HF Llama checkpoint directory: the model and its tokenizer (None if absent)."""
  directory = Path(directory)
  hf_config = json.loads((directory / "config.json").read_text())
  model_type = hf_config.get("model_type", "llama")
  if model_type != "llama":
    raise NotImplementedError(f"{directory}: model_type {model_type!r} is not supported")
  config = config_from_hf(hf_config)
  model = from_hf_weights(config, _read_weights(directory), param_dtype=param_dtype)
  return model, _read_tokenizer(directory, hf_config)
