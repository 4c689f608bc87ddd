"""Hugging Face ``LlamaForCausalLM`` weight names and layout <-> :class:`Llama` parameters.

The interchange format of the loaders: a flat ``{name: array}`` dict with HF names
(``model.layers.0.self_attn.q_proj.weight`` ...) and HF layouts (linear weights ``(out, in)``,
Q/K in the "rotate_half" head layout). :class:`Llama` stores linear kernels ``(in, out)``, so
conversion transposes them; nothing else changes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dualoptim_jax.models.llama import Llama, LlamaConfig

__all__ = ["config_from_hf", "config_to_hf", "from_hf_weights", "to_hf_weights"]

_LAYER_LINEARS = {
  "self_attn.q_proj": ("self_attn", "q_proj"),
  "self_attn.k_proj": ("self_attn", "k_proj"),
  "self_attn.v_proj": ("self_attn", "v_proj"),
  "self_attn.o_proj": ("self_attn", "o_proj"),
  "mlp.gate_proj": ("mlp", "gate_proj"),
  "mlp.up_proj": ("mlp", "up_proj"),
  "mlp.down_proj": ("mlp", "down_proj"),
}
_LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")


def _hf_to_nnx_paths(cfg: LlamaConfig) -> dict[str, tuple[tuple, bool]]:
  """HF name -> (NNX state path, whether the array is transposed on the way)."""
  paths: dict[str, tuple[tuple, bool]] = {
    "model.embed_tokens.weight": (("embed_tokens", "embedding"), False),
    "model.norm.weight": (("norm", "scale"), False),
  }
  if not cfg.tie_embeddings:
    paths["lm_head.weight"] = (("lm_head", "kernel"), True)
  for i in range(cfg.n_layers):
    for hf, (mod, sub) in _LAYER_LINEARS.items():
      paths[f"model.layers.{i}.{hf}.weight"] = (("layers", i, mod, sub, "kernel"), True)
    for norm in _LAYER_NORMS:
      paths[f"model.layers.{i}.{norm}.weight"] = (("layers", i, norm, "scale"), False)
  return paths


def config_from_hf(hf: Mapping[str, Any]) -> LlamaConfig:
  """:class:`LlamaConfig` from a HF ``config.json`` dict (Llama / SmolLM / Mistral-style)."""
  if hf.get("rope_scaling"):
    raise NotImplementedError(f"rope_scaling={hf['rope_scaling']!r} is not supported")
  for flag in ("attention_bias", "mlp_bias"):
    if hf.get(flag):
      raise NotImplementedError(f"{flag}=true is not supported (the model has no biases)")
  if hf.get("hidden_act", "silu") != "silu":
    raise NotImplementedError(f"hidden_act={hf['hidden_act']!r} is not supported (SwiGLU/silu)")
  n_heads = int(hf["num_attention_heads"])
  return LlamaConfig(
    vocab_size=int(hf["vocab_size"]),
    dim=int(hf["hidden_size"]),
    n_layers=int(hf["num_hidden_layers"]),
    n_heads=n_heads,
    n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
    ffn_dim=int(hf["intermediate_size"]),
    head_dim=hf.get("head_dim"),
    rope_theta=float(hf.get("rope_theta", 10000.0)),
    norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
    max_seq_len=int(hf.get("max_position_embeddings", 2048)),
    tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
  )


def config_to_hf(cfg: LlamaConfig, **extra: Any) -> dict[str, Any]:
  """A HF ``config.json`` dict for ``cfg`` (``extra`` adds e.g. token ids)."""
  return {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_act": "silu",
    "vocab_size": cfg.vocab_size,
    "hidden_size": cfg.dim,
    "num_hidden_layers": cfg.n_layers,
    "num_attention_heads": cfg.n_heads,
    "num_key_value_heads": cfg.n_kv_heads,
    "intermediate_size": cfg.ffn_dim,
    "head_dim": cfg.head_dim,
    "rope_theta": cfg.rope_theta,
    "rms_norm_eps": cfg.norm_eps,
    "max_position_embeddings": cfg.max_seq_len,
    "tie_word_embeddings": cfg.tie_embeddings,
    "attention_bias": False,
    "mlp_bias": False,
    "rope_scaling": None,
    "torch_dtype": "float32",
    **extra,
  }


def from_hf_weights(
  config: LlamaConfig,
  weights: Mapping[str, np.ndarray],
  *,
  param_dtype=jnp.float32,
  strict: bool = True,
) -> Llama:
  """Builds a :class:`Llama` holding ``weights`` (HF names and layouts), without random init.

  ``strict`` rejects unexpected names (missing names always raise); a tied model ignores an
  ``lm_head.weight`` equal in shape to the embedding (some checkpoints store both).
  """
  paths = _hf_to_nnx_paths(config)
  missing = sorted(set(paths) - set(weights))
  if missing:
    raise KeyError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
  extra = sorted(
    set(weights)
    - set(paths)
    - {"lm_head.weight"}
    - {k for k in weights if k.endswith("rotary_emb.inv_freq")}
  )
  if strict and extra:
    raise KeyError(f"checkpoint has {len(extra)} unexpected tensors, e.g. {extra[:3]}")

  model = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0), param_dtype=param_dtype))
  state = nnx.state(model)
  flat = dict(nnx.to_flat_state(state))
  for name, (path, transpose) in paths.items():
    value = np.asarray(weights[name])
    if transpose:
      value = value.T
    var = flat[path]
    if value.shape != var.shape:
      raise ValueError(f"{name}: shape {value.shape} does not match the model's {var.shape}")
    var.set_value(jnp.asarray(value, dtype=param_dtype))
  nnx.update(model, state)
  return model


def to_hf_weights(model: Llama) -> dict[str, np.ndarray]:
  """The model's parameters as float32 numpy arrays with HF names and layouts."""
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  out = {}
  for name, (path, transpose) in _hf_to_nnx_paths(model.config).items():
    value = np.asarray(jax.device_get(flat[path].get_value()), dtype=np.float32)
    out[name] = np.ascontiguousarray(value.T if transpose else value)
  return out
