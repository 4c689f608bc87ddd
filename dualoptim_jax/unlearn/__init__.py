"""Unlearning of language models with any optax transform."""
