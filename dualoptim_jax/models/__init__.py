"""Language models for the unlearning experiments: a Flax NNX Llama, its tokenizer, decoding."""

from dualoptim_jax.models.generate import greedy_generate, pad_prompts
from dualoptim_jax.models.llama import KVCache, Llama, LlamaConfig
from dualoptim_jax.models.tokenizer import Tokenizer

__all__ = ["KVCache", "Llama", "LlamaConfig", "Tokenizer", "greedy_generate", "pad_prompts"]
