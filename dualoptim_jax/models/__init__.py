"""Language models for the unlearning experiments: a Flax NNX Llama, its tokenizer, decoding,
and loaders for pretrained checkpoints (GGUF files, Hugging Face safetensors directories)."""

from dualoptim_jax.models.generate import greedy_generate, pad_prompts
from dualoptim_jax.models.gguf import find_smollm2_gguf, load_gguf
from dualoptim_jax.models.llama import KVCache, Llama, LlamaConfig
from dualoptim_jax.models.safetensors import load_pretrained, save_pretrained
from dualoptim_jax.models.tokenizer import Tokenizer

__all__ = [
  "KVCache",
  "Llama",
  "LlamaConfig",
  "Tokenizer",
  "find_smollm2_gguf",
  "greedy_generate",
  "load_gguf",
  "load_pretrained",
  "pad_prompts",
  "save_pretrained",
]
