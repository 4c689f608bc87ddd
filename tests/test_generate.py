"""Tests for dualoptim_jax.models.generate."""

import jax
import numpy as np
import pytest
from flax import nnx

from dualoptim_jax.models.generate import greedy_generate, pad_prompts
from dualoptim_jax.models.llama import Llama, LlamaConfig

V, EOS, PAD = 50, 2, 0


@pytest.fixture(scope="module")
def model():
  """A tiny model with large random weights, so greedy continuations vary with the whole context.

  (At the default 0.02 init a tied-embedding model just repeats its last token, which would let a
  broken cache pass.)
  """
  m = Llama(LlamaConfig.tiny(V), rngs=nnx.Rngs(1))
  params = nnx.state(m, nnx.Param)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(0), len(leaves))
  new = [
    1.0 + 0.0 * x if x.ndim == 1 else 0.3 * jax.random.normal(k, x.shape)
    for k, x in zip(keys, leaves)
  ]
  nnx.update(m, jax.tree.unflatten(treedef, new))
  return m


@pytest.fixture(scope="module")
def prompts():
  rng = np.random.default_rng(0)
  return [rng.integers(3, V, n).tolist() for n in (1, 5, 11, 3)]


@pytest.fixture(scope="module")
def reference(model, prompts):
  # Uncached decoding without EOS: every row runs the full max_new_tokens.
  return greedy_generate(
    model, prompts, max_new_tokens=10, eos_id=V + 7, pad_id=PAD, use_cache=False
  )


def test_reference_is_not_degenerate(reference):
  assert all(len(row) == 10 for row in reference)
  assert all(len(set(row)) >= 3 for row in reference), reference
  assert len({tuple(r) for r in reference}) == len(reference)


@pytest.mark.parametrize("side", ["left", "right"])
def test_cached_equals_uncached_ragged_batch(model, prompts, reference, side):
  cached = greedy_generate(
    model, prompts, max_new_tokens=10, eos_id=V + 7, pad_id=PAD, padding_side=side
  )
  assert cached == reference


def test_row_alone_equals_row_in_batch(model, prompts, reference):
  alone = greedy_generate(
    model, [prompts[2]], max_new_tokens=10, eos_id=V + 7, pad_id=PAD, pad_to_multiple=1
  )
  assert alone == [reference[2]]


@pytest.mark.parametrize("use_cache", [True, False])
def test_stops_at_eos(model, prompts, reference, use_cache):
  # Use a token that some row emits mid-way as EOS: each row must end just before its first one.
  eos = reference[1][4]
  out = greedy_generate(
    model, prompts, max_new_tokens=10, eos_id=eos, pad_id=PAD, use_cache=use_cache
  )
  expected = [r[: r.index(eos)] if eos in r else r for r in reference]
  assert out == expected
  assert len(out[1]) < 10


def test_pad_prompts():
  ids, mask = pad_prompts([[5, 6, 7], [8]], pad_id=0, side="left", multiple=4)
  np.testing.assert_array_equal(ids, [[0, 5, 6, 7], [0, 0, 0, 8]])
  np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1]])
  ids, mask = pad_prompts([[5, 6, 7], [8]], pad_id=9, side="right")
  np.testing.assert_array_equal(ids, [[5, 6, 7], [8, 9, 9]])
  np.testing.assert_array_equal(mask, [[1, 1, 1], [1, 0, 0]])
  with pytest.raises(ValueError, match="side must be"):
    pad_prompts([[1]], pad_id=0, side="middle")
  with pytest.raises(ValueError, match="non-empty"):
    pad_prompts([[1], []], pad_id=0)


def test_rejects_bad_max_new_tokens(model):
  with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
    greedy_generate(model, [[3]], max_new_tokens=0, eos_id=EOS, pad_id=PAD)
