"""Batched greedy decoding for :class:`~dualoptim_jax.models.llama.Llama`, with a KV cache.

Ragged prompts are padded into one batch (left padding by default; right padding is supported
too). Every row writes its new tokens at the same cache slot; the cache's mask hides padding slots
and rotary positions are counted per row, so a padded row decodes exactly like the same prompt
alone. Prefill and the whole decoding loop (a ``lax.while_loop`` that stops early once every row
has emitted EOS) run in one compiled function per (batch, padded length, max_new_tokens) shape.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dualoptim_jax.models.llama import Llama
from dualoptim_jax.sharding import committed, host_value

__all__ = ["greedy_generate", "pad_prompts"]


def pad_prompts(
  prompts: Sequence[Sequence[int]], *, pad_id: int, side: str = "left", multiple: int = 1
) -> tuple[np.ndarray, np.ndarray]:
  """Pads token lists into ``(ids, mask)`` int32 arrays of shape (B, P).

  ``P`` is the longest prompt rounded up to ``multiple`` (fewer distinct shapes, fewer compiles);
  ``mask`` is 1 on prompt tokens and 0 on padding; ``side`` is ``"left"`` or ``"right"``.
  """
  if side not in ("left", "right"):
    raise ValueError(f"side must be 'left' or 'right', got {side!r}")
  if multiple < 1:
    raise ValueError(f"multiple must be >= 1, got {multiple}")
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("prompts must be a non-empty list of non-empty token lists")
  longest = max(len(p) for p in prompts)
  width = -(-longest // multiple) * multiple
  ids = np.full((len(prompts), width), pad_id, np.int32)
  mask = np.zeros((len(prompts), width), np.int32)
  for row, p in enumerate(prompts):
    sl = slice(width - len(p), width) if side == "left" else slice(0, len(p))
    ids[row, sl] = p
    mask[row, sl] = 1
  return ids, mask


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens"))
def _generate_cached(graphdef, state, ids, mask, eos_id, pad_id, *, max_new_tokens: int):
  model = nnx.merge(graphdef, state)
  batch, width = ids.shape
  rows = jnp.arange(batch)
  cache = model.init_cache(batch, width + max_new_tokens)
  h, cache = model.hidden_states(ids, attention_mask=mask, cache=cache)
  # The last real prompt token of each row: slot width-1 when left-padded, length-1 otherwise.
  last = jnp.max(jnp.where(mask > 0, jnp.arange(width), -1), axis=-1)
  tok = jnp.argmax(model.logits(h[rows, last]), axis=-1).astype(jnp.int32)
  out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(tok)
  done = tok == eos_id

  def cond(carry):
    i, _, _, _, done = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def step(carry):
    i, tok, cache, out, done = carry
    logits, cache = model(tok[:, None], cache=cache)
    tok = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
    out = out.at[:, i].set(jnp.where(done, pad_id, tok))
    return i + 1, tok, cache, out, done | (tok == eos_id)

  _, _, _, out, _ = jax.lax.while_loop(cond, step, (jnp.int32(1), tok, cache, out, done))
  return out


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _uncached_step(graphdef, state, buf, lengths):
  """One full forward over the right-padded buffer; the argmax after each row's last token."""
  logits = nnx.merge(graphdef, state)(buf)
  return jnp.argmax(logits[jnp.arange(buf.shape[0]), lengths - 1], axis=-1).astype(jnp.int32)


def _generate_uncached(model, prompts, max_new_tokens, eos_id, pad_id):
  # Reference decoder: recompute the whole prefix every step (no cache, no padding mask: the
  # padding sits after each row's tokens, which causal attention never looks at).
  graphdef, state = nnx.split(model)
  buf, _ = pad_prompts(prompts, pad_id=pad_id, side="right")
  buf = np.concatenate([buf, np.full((len(prompts), max_new_tokens), pad_id, np.int32)], axis=1)
  lengths = np.array([len(p) for p in prompts], np.int32)
  out = np.full((len(prompts), max_new_tokens), pad_id, np.int32)
  done = np.zeros(len(prompts), bool)
  for i in range(max_new_tokens):
    tok = np.asarray(_uncached_step(graphdef, state, jnp.asarray(buf), jnp.asarray(lengths)))
    out[:, i] = np.where(done, pad_id, tok)
    buf[np.arange(len(prompts)), lengths] = tok
    lengths += 1
    done |= tok == eos_id
    if done.all():
      break
  return out


def greedy_generate(
  model: Llama,
  prompts: Sequence[Sequence[int]],
  *,
  max_new_tokens: int,
  eos_id: int,
  pad_id: int,
  padding_side: str = "left",
  pad_to_multiple: int = 8,
  use_cache: bool = True,
) -> list[list[int]]:
  """Greedy (argmax) continuation of each prompt, decoded as one batch.

  Args:
    model: a :class:`Llama`.
    prompts: token-id lists, any lengths (at least one token each).
    max_new_tokens: most tokens generated per prompt.
    eos_id: generation of a row stops after this token.
    pad_id: id used for padding (never attended to).
    padding_side: ``"left"`` (default) or ``"right"``; results are the same either way.
    pad_to_multiple: prompts are padded to a multiple of this length to limit recompilation.
    use_cache: ``False`` selects the slow reference decoder that recomputes the full forward pass
      for every new token (for tests).

  Returns:
    For each prompt, the new tokens only, ending before the first ``eos_id`` (EOS not included).
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  prompts = [list(map(int, p)) for p in prompts]
  if use_cache:
    ids, mask = pad_prompts(prompts, pad_id=pad_id, side=padding_side, multiple=pad_to_multiple)
    graphdef, state = nnx.split(model)
    state = committed(state)  # a fine-tuned or a restored model: one program
    out = host_value(  # every process decodes the same batch (a multi-process model included)
      _generate_cached(
        graphdef,
        state,
        ids,
        mask,
        jnp.int32(eos_id),
        jnp.int32(pad_id),
        max_new_tokens=max_new_tokens,
      )
    )
  else:
    pad_prompts(prompts, pad_id=pad_id)  # same validation as the cached path
    out = _generate_uncached(model, prompts, max_new_tokens, eos_id, pad_id)
  results = []
  for row in out.tolist():
    results.append(row[: row.index(eos_id)] if eos_id in row else row)
  return results
