"""Tests for dualoptim_jax.unlearn.losses against independent NumPy computations on tiny logits."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dualoptim_jax.unlearn import losses as L

V = 7  # vocabulary of the toy bigram "models" below


def np_log_softmax(z):
  z = np.asarray(z, np.float64)
  return (
    z
    - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
    - z.max(-1, keepdims=True)
  )


def np_token_logprobs(logits, ids):
  """Loop version: out[b, t] = log softmax(logits[b, t-1])[ids[b, t]], 0 at t = 0."""
  B, T = ids.shape
  out = np.zeros((B, T))
  for b in range(B):
    for t in range(1, T):
      out[b, t] = np_log_softmax(logits[b, t - 1])[ids[b, t]]
  return out


def np_log_sigmoid(x):
  return -np.log1p(np.exp(-np.asarray(x, np.float64)))


@pytest.fixture
def toy():
  rng = np.random.default_rng(0)
  ids = rng.integers(1, V, size=(3, 6)).astype(np.int32)
  mask = np.array([[0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1], [0, 1, 1, 0, 0, 0]], np.float32)
  idk_ids = rng.integers(1, V, size=(3, 6)).astype(np.int32)
  idk_mask = np.array([[0, 0, 0, 0, 1, 1], [0, 0, 1, 1, 1, 1], [0, 0, 1, 0, 0, 0]], np.float32)
  token_mask = np.array([[0, 1, 1, 1, 1, 1]] * 3, np.float32)
  table = (
    rng.normal(size=(V, V)).astype(np.float32) * 2
  )  # bigram logits: next-token scores per token
  ref_table = table + rng.normal(size=(V, V)).astype(np.float32)
  batch = {
    "input_ids": ids,
    "answer_mask": mask,
    "token_mask": token_mask,
    "idk_input_ids": idk_ids,
    "idk_answer_mask": idk_mask,
    "idk_token_mask": token_mask,
  }
  model_fn = lambda x: jnp.asarray(table)[x]
  ref_fn = lambda x: jnp.asarray(ref_table)[x]
  return batch, table, ref_table, model_fn, ref_fn


def _np_answer_lp(table, ids, mask):
  return (np_token_logprobs(table[ids], ids) * mask).sum(-1)


# --------------------------------------------------------------------------- log-probabilities


def test_answer_logprobs_match_a_loop(toy):
  batch, table, _, _, _ = toy
  ids, mask = batch["input_ids"], batch["answer_mask"]
  logits = table[ids]
  want = _np_answer_lp(table, ids, mask)
  np.testing.assert_allclose(L.answer_logprobs(logits, ids, mask), want, rtol=1e-5)
  np.testing.assert_allclose(
    L.answer_mean_logprobs(logits, ids, mask), want / mask.sum(-1), rtol=1e-5
  )
  np.testing.assert_allclose(L.masked_nll(logits, ids, mask), -want.sum() / mask.sum(), rtol=1e-5)
  np.testing.assert_allclose(
    L.token_logprobs(logits, ids), np_token_logprobs(logits, ids), rtol=1e-5, atol=1e-6
  )


def test_uniform_logits_give_log_vocab():
  ids = jnp.array([[1, 2, 3, 4]])
  mask = jnp.array([[0.0, 1.0, 1.0, 0.0]])
  zeros = jnp.zeros((1, 4, V))
  assert float(L.answer_logprobs(zeros, ids, mask)[0]) == pytest.approx(-2 * math.log(V), rel=1e-6)
  assert float(L.uniform_kl(zeros, mask)) == pytest.approx(0.0, abs=1e-6)
  assert float(L.reference_kl(zeros, zeros, mask)) == pytest.approx(0.0, abs=1e-6)
  empty = jnp.zeros((1, 4))
  assert float(L.answer_mean_logprobs(zeros, ids, empty)[0]) == 0.0
  assert float(L.masked_nll(zeros, ids, empty)) == 0.0


def test_padding_and_prompt_tokens_do_not_count(toy):
  batch, table, _, _, _ = toy
  ids, mask = batch["input_ids"].copy(), batch["answer_mask"]
  base = L.answer_logprobs(table[ids], ids, mask)
  ids2 = ids.copy()
  ids2[0, 5] = (ids2[0, 5] + 1) % V  # after the answer of row 0 (mask 0): changes nothing
  np.testing.assert_allclose(
    L.answer_logprobs(jnp.asarray(table)[ids2], ids2, mask), base, rtol=1e-6
  )
  ids2[0, 3] = (ids2[0, 3] + 1) % V  # inside the answer of row 0
  assert not np.isclose(
    float(L.answer_logprobs(jnp.asarray(table)[ids2], ids2, mask)[0]), float(base[0])
  )


# --------------------------------------------------------------------------- losses on numbers


def test_preference_losses_on_numbers():
  logp, ref = np.array([-2.0, -5.0]), np.array([-1.0, -6.0])
  beta = 0.5
  np.testing.assert_allclose(
    L.npo_loss(logp, ref, beta),
    -(2 / beta) * np_log_sigmoid(-beta * (logp - ref)).mean(),
    rtol=1e-6,
  )
  n = np.array([2.0, 4.0])
  np.testing.assert_allclose(
    L.simnpo_loss(logp, n, beta, gamma=0.3),
    -(2 / beta) * np_log_sigmoid(-beta * logp / n - 0.3).mean(),
    rtol=1e-6,
  )
  idk, ref_idk = np.array([-3.0, -1.0]), np.array([-4.0, -2.0])
  np.testing.assert_allclose(
    L.dpo_loss(idk, logp, ref_idk, ref, beta),
    -(2 / beta) * np_log_sigmoid(beta * ((idk - logp) - (ref_idk - ref))).mean(),
    rtol=1e-6,
  )
  np.testing.assert_allclose(
    L.ap_loss(logp, idk, beta), -(1 / beta) * np_log_sigmoid(beta * (logp - idk)).mean(), rtol=1e-6
  )
  # At theta = ref, NPO is (2/beta) log 2 and DPO the same.
  assert float(L.npo_loss(ref, ref, beta)) == pytest.approx(2 / beta * math.log(2), rel=1e-6)


def test_npo_gradient_pushes_forget_probability_down_and_vanishes_as_it_falls():
  grad = jax.grad(lambda lp: L.npo_loss(lp, jnp.zeros(1), 0.1))
  g_at_ref, g_far = float(grad(jnp.zeros(1))[0]), float(grad(jnp.full(1, -100.0))[0])
  assert g_at_ref == pytest.approx(1.0, rel=1e-5)  # 2 sigma(0) = 1, like GA on the sum
  assert 0 < g_far < 1e-3 * g_at_ref


def test_me_and_kl_on_logits(toy):
  batch, table, ref_table, _, _ = toy
  ids, mask = batch["input_ids"], batch["answer_mask"]
  logits, ref_logits = table[ids], ref_table[ids]
  lp, ref_lp = np_log_softmax(logits), np_log_softmax(ref_logits)
  m = mask[:, 1:]
  kl_u = -math.log(V) - lp[:, :-1].mean(-1)  # KL(U || p) per position
  np.testing.assert_allclose(L.uniform_kl(logits, mask), (kl_u * m).sum() / m.sum(), rtol=1e-5)
  kl_ref = (np.exp(ref_lp) * (ref_lp - lp)).sum(-1)[:, :-1]
  np.testing.assert_allclose(
    L.reference_kl(logits, ref_logits, mask), (kl_ref * m).sum() / m.sum(), rtol=1e-5
  )
  assert float(L.reference_kl(logits, ref_logits, mask)) > 0


# --------------------------------------------------------------------------- objectives


@pytest.mark.parametrize("name", ["GA", "NPO", "SimNPO", "DPO", "IDK", "ME"])
def test_forget_losses_of_objectives(toy, name):
  batch, table, ref_table, model_fn, ref_fn = toy
  obj = L.make_objective(name + "+GD", beta=0.2, gamma=0.1)
  ids, mask = batch["input_ids"], batch["answer_mask"]
  iids, imask = batch["idk_input_ids"], batch["idk_answer_mask"]
  lp, ref_lp = _np_answer_lp(table, ids, mask), _np_answer_lp(ref_table, ids, mask)
  lp_idk, ref_idk = _np_answer_lp(table, iids, imask), _np_answer_lp(ref_table, iids, imask)
  want = {
    "GA": lp.sum() / mask.sum(),
    "NPO": -(2 / 0.2) * np_log_sigmoid(-0.2 * (lp - ref_lp)).mean(),
    "SimNPO": -(2 / 0.2) * np_log_sigmoid(-0.2 * lp / mask.sum(-1) - 0.1).mean(),
    "DPO": -(2 / 0.2) * np_log_sigmoid(0.2 * ((lp_idk - lp) - (ref_idk - ref_lp))).mean(),
    "IDK": -lp_idk.sum() / imask.sum(),
    "ME": float(L.uniform_kl(table[ids], mask)),
  }[name]
  got = obj.forget_loss(model_fn, ref_fn, batch)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  jitted = jax.jit(lambda b: obj.forget_loss(model_fn, ref_fn, b))(batch)
  np.testing.assert_allclose(jitted, got, rtol=1e-5)
  assert obj.needs_reference == (name in ("NPO", "DPO"))


@pytest.mark.parametrize("name", ["GD", "KL", "AP"])
def test_retain_losses_of_objectives(toy, name):
  batch, table, ref_table, model_fn, ref_fn = toy
  obj = L.make_objective("IDK+" + name, beta=0.5)
  ids, mask = batch["input_ids"], batch["answer_mask"]
  lp = _np_answer_lp(table, ids, mask)
  lp_idk = _np_answer_lp(table, batch["idk_input_ids"], batch["idk_answer_mask"])
  want = {
    "GD": -lp.sum() / mask.sum(),
    "KL": float(L.reference_kl(table[ids], ref_table[ids], mask)),
    "AP": -(1 / 0.5) * np_log_sigmoid(0.5 * (lp - lp_idk)).mean(),
  }[name]
  np.testing.assert_allclose(obj.retain_loss(model_fn, ref_fn, batch), want, rtol=1e-5)
  assert obj.needs_reference == (name == "KL")


def test_reference_losses_stop_gradients_through_the_reference(toy):
  batch, table, _, _, _ = toy
  obj = L.make_objective("NPO+KL")
  # The same parameters feed model and reference: only the model path may carry gradient.
  g = jax.grad(lambda t: obj.forget_loss(lambda x: t[x], lambda x: t[x], batch))(jnp.asarray(table))
  lp_grad = jax.grad(
    lambda t: L.answer_logprobs(
      t[batch["input_ids"]], batch["input_ids"], batch["answer_mask"]
    ).mean()
  )(jnp.asarray(table))
  # At theta = ref, d NPO / d logp_i = 2 sigma(0) / B = 1 / B: NPO's gradient is that of mean logp
  # (descending it lowers the forget log-probability); a gradient through the reference would cancel it.
  np.testing.assert_allclose(g, lp_grad, rtol=1e-4, atol=1e-6)
  assert float(jnp.abs(g).max()) > 0.1
  ids, mask = batch["input_ids"], batch["answer_mask"]
  g_kl = jax.grad(lambda t: obj.retain_loss(lambda x: t[x], lambda x: 2 * t[x], batch))(
    jnp.asarray(table)
  )
  want = jax.grad(lambda t: L.reference_kl(t[ids], jax.lax.stop_gradient(2 * t[ids]), mask))(
    jnp.asarray(table)
  )
  leaky = jax.grad(lambda t: L.reference_kl(t[ids], 2 * t[ids], mask))(jnp.asarray(table))
  np.testing.assert_allclose(g_kl, want, rtol=1e-4, atol=1e-6)
  assert not np.allclose(g_kl, leaky, atol=1e-3)


def test_me_scope_all_scores_prompt_tokens(toy):
  batch, table, _, model_fn, _ = toy
  answer = L.make_objective("ME+GD").forget_loss(model_fn, None, batch)
  everything = L.make_objective("ME+GD", me_scope="all").forget_loss(model_fn, None, batch)
  np.testing.assert_allclose(
    everything, L.uniform_kl(table[batch["input_ids"]], batch["token_mask"]), rtol=1e-5
  )
  assert not np.isclose(float(answer), float(everything))


def test_make_objective_parsing_and_validation(toy):
  batch, _, _, model_fn, _ = toy
  obj = L.make_objective("idk+ap", forget_coef=0.5)
  assert (obj.forget, obj.retain, obj.name, obj.forget_coef) == ("IDK", "AP", "IDK+AP", 0.5)
  solo = L.make_objective("simnpo")
  assert solo.name == "SimNPO" and float(solo.retain_loss(model_fn, None, batch)) == 0.0
  with pytest.raises(
    ValueError, match="unknown forget loss 'XX' in 'XX\\+GD'; forget losses are GA, NPO"
  ):
    L.make_objective("XX+GD")
  with pytest.raises(ValueError, match="unknown retain loss 'GA'"):
    L.make_objective("IDK+GA")
  with pytest.raises(ValueError, match="FORGET\\+RETAIN"):
    L.make_objective("IDK+GD+KL")
  with pytest.raises(ValueError, match="beta must be finite and > 0, got 0"):
    L.make_objective("NPO", beta=0)
  with pytest.raises(ValueError, match="retain_coef must be finite and >= 0, got -1"):
    L.make_objective("NPO+GD", retain_coef=-1)
  with pytest.raises(ValueError, match="me_scope must be"):
    L.make_objective("ME+GD", me_scope="question")
  with pytest.raises(ValueError, match="objective NPO\\+GD needs a reference model"):
    L.make_objective("NPO+GD").forget_loss(model_fn, None, batch)
