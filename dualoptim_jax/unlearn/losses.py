"""Unlearning losses: pure, jittable functions of logits and token masks that score answers only.

Notation: for a sequence ``x`` of ``T`` tokens and a model with logits ``z`` (``(B, T, V)``), token
``t`` is predicted by ``z[t - 1]``; ``log p(x_t) = z[t-1, x_t] - logsumexp(z[t-1])``. The answer
mask ``m`` (from :func:`dualoptim_jax.unlearn.data.collate`) marks the answer tokens ``y`` of a
question ``q``, so ``log p(y|q) = sum_t m_t log p(x_t)`` and ``|y| = sum_t m_t``.

Forget losses (``L_f``; ``theta`` the trained model, ``ref`` the frozen model before unlearning,
``y_idk`` a refusal answer to the same question, ``sigma`` the logistic function):

======= ========================================================================================
GA      gradient ascent: ``-NLL(y|q)``, the token-mean over the batch (``NLL`` is
        :func:`masked_nll`)
NPO     ``-(2/beta) E log sigma(-beta (log p_theta(y|q) - log p_ref(y|q)))``
        (Zhang et al., 2024, "Negative Preference Optimization")
SimNPO  ``-(2/beta) E log sigma(-(beta/|y|) log p_theta(y|q) - gamma)``, reference free
        (Fan et al., 2024, "Simplicity Prevails")
DPO     ``-(2/beta) E log sigma(beta [(log p_theta(y_idk|q) - log p_theta(y|q))
        - (log p_ref(y_idk|q) - log p_ref(y|q))])``: the refusal is preferred (the ``2/beta``
        scale is the closer-look code's)
IDK     ``NLL(y_idk|q)``: fine-tune on the refusal
ME      maximum entropy: mean over scored positions of ``KL(U || p_theta) = -log V - (1/V)
        sum_v log p_theta(v)``, ``U`` uniform over the vocabulary (Yuan et al., 2024, ME+GD)
======= ========================================================================================

Retain losses (``L_r``, on retain questions):

======= ========================================================================================
GD      ``NLL(y|q)``
KL      mean over answer positions of ``KL(p_ref || p_theta)``
AP      answer preservation (Yuan et al., 2024, "A Closer Look at Machine Unlearning for Large
        Language Models", the retain loss DualOptim pairs with IDK):
        ``-(1/beta) E log sigma(beta (log p_theta(y|q) - log p_theta(y_idk|q)))``: keep the true
        answer more likely than a refusal on retained questions
======= ========================================================================================

``E`` is the mean over the batch; all log-probabilities are sums over the answer tokens. Where
the closer-look code differs: its KL runs over every position of the padded sequence and its
ME+GD scores the question tokens too; here KL scores answer positions only, and ME scores the
answer (``me_scope="answer"``, default) or every real token (``me_scope="all"``, the closer-look
setting for ME+GD).

:func:`make_objective` combines one forget and one retain loss by name ("IDK+AP", "ME+GD",
"NPO+KL", ...) into an :class:`UnlearningLoss` that the trainer drives.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

__all__ = [
  "FORGET_LOSSES",
  "RETAIN_LOSSES",
  "UnlearningLoss",
  "make_objective",
  "token_logprobs",
  "answer_logprobs",
  "answer_mean_logprobs",
  "masked_nll",
  "npo_loss",
  "simnpo_loss",
  "dpo_loss",
  "ap_loss",
  "uniform_kl",
  "reference_kl",
]

Array = jax.Array
Batch = Mapping[str, Array]
LogitsFn = Callable[[Array], Array]


# ------------------------------------------------------------------------------------------------
# Log-probabilities of answer tokens.


def token_logprobs(logits: Array, input_ids: Array) -> Array:
  """``(B, T)`` log-probability of each token given the ones before it; 0 at ``t = 0``."""
  logits = logits[:, :-1].astype(jnp.float32)
  targets = input_ids[:, 1:]
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  lp = picked - jax.nn.logsumexp(logits, axis=-1)
  return jnp.pad(lp, ((0, 0), (1, 0)))


def answer_logprobs(logits: Array, input_ids: Array, answer_mask: Array) -> Array:
  """``(B,)`` ``log p(y|q) = sum_t m_t log p(x_t | x_<t)``, the summed answer log-probability."""
  return jnp.sum(token_logprobs(logits, input_ids) * answer_mask, axis=-1)


def answer_mean_logprobs(logits: Array, input_ids: Array, answer_mask: Array) -> Array:
  """``(B,)`` ``log p(y|q) / |y|``, the per-token mean (0 for an empty answer)."""
  n = jnp.sum(answer_mask, axis=-1)
  return answer_logprobs(logits, input_ids, answer_mask) / jnp.maximum(n, 1.0)


def masked_nll(logits: Array, input_ids: Array, mask: Array) -> Array:
  """Scalar ``-sum_{b,t} m log p / sum_{b,t} m``: the token-mean NLL over the whole batch
  (the Hugging Face causal-LM loss with non-answer labels ignored)."""
  total = jnp.sum(token_logprobs(logits, input_ids) * mask)
  return -total / jnp.maximum(jnp.sum(mask), 1.0)


# ------------------------------------------------------------------------------------------------
# Losses on log-probabilities (the maths, testable on numbers).


def npo_loss(logp: Array, ref_logp: Array, beta: float) -> Array:
  """NPO: ``-(2/beta) mean log sigma(-beta (logp - ref_logp))`` over the batch."""
  return -2.0 / beta * jnp.mean(jax.nn.log_sigmoid(-beta * (logp - ref_logp)))


def simnpo_loss(logp: Array, n_tokens: Array, beta: float, gamma: float = 0.0) -> Array:
  """SimNPO: ``-(2/beta) mean log sigma(-(beta / |y|) logp - gamma)`` over the batch."""
  return (
    -2.0 / beta * jnp.mean(jax.nn.log_sigmoid(-beta * logp / jnp.maximum(n_tokens, 1.0) - gamma))
  )


def dpo_loss(
  logp_chosen: Array, logp_rejected: Array, ref_chosen: Array, ref_rejected: Array, beta: float
) -> Array:
  """DPO: ``-(2/beta) mean log sigma(beta [(chosen - rejected) - (ref_chosen - ref_rejected)])``."""
  margin = (logp_chosen - logp_rejected) - (ref_chosen - ref_rejected)
  return -2.0 / beta * jnp.mean(jax.nn.log_sigmoid(beta * margin))


def ap_loss(logp_true: Array, logp_idk: Array, beta: float) -> Array:
  """Answer preservation: ``-(1/beta) mean log sigma(beta (logp_true - logp_idk))``."""
  return -1.0 / beta * jnp.mean(jax.nn.log_sigmoid(beta * (logp_true - logp_idk)))


def _position_mean(per_position: Array, mask: Array) -> Array:
  """Mean of ``(B, T-1)`` values over the positions that predict a masked token."""
  m = mask[:, 1:]
  return jnp.sum(per_position * m) / jnp.maximum(jnp.sum(m), 1.0)


def uniform_kl(logits: Array, mask: Array) -> Array:
  """ME: mean of ``KL(U || softmax(z)) = -log V - mean_v log_softmax(z)_v`` over the positions
  that predict a token with ``mask = 1``."""
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  per_position = -math.log(logits.shape[-1]) - jnp.mean(logp, axis=-1)
  return _position_mean(per_position, mask)


def reference_kl(logits: Array, ref_logits: Array, mask: Array) -> Array:
  """KL: mean of ``KL(p_ref || p_theta)`` over the positions that predict a masked token."""
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  ref_logp = jax.nn.log_softmax(ref_logits[:, :-1].astype(jnp.float32), axis=-1)
  per_position = jnp.sum(jnp.exp(ref_logp) * (ref_logp - logp), axis=-1)
  return _position_mean(per_position, mask)


# ------------------------------------------------------------------------------------------------
# Objectives by name.

FORGET_LOSSES: tuple[str, ...] = ("GA", "NPO", "SimNPO", "DPO", "IDK", "ME")
RETAIN_LOSSES: tuple[str, ...] = ("GD", "KL", "AP")
_REFERENCE_LOSSES = frozenset({"NPO", "DPO", "KL"})


def _pair_logprobs(fn: LogitsFn, batch: Batch) -> tuple[Array, Array]:
  """Answer log-probs of the true and the refusal answers, in one forward pass."""
  ids = jnp.concatenate([batch["input_ids"], batch["idk_input_ids"]])
  mask = jnp.concatenate([batch["answer_mask"], batch["idk_answer_mask"]])
  logp = answer_logprobs(fn(ids), ids, mask)
  n = batch["input_ids"].shape[0]
  return logp[:n], logp[n:]


@dataclasses.dataclass(frozen=True)
class UnlearningLoss:
  """The unlearning objective ``c_f L_f + c_r L_r``: a forget loss, a retain loss, their coefficients.

  ``forget_loss`` / ``retain_loss`` take ``model_fn`` (``input_ids -> logits``, the trained model),
  ``ref_fn`` (the frozen reference, or None when :attr:`needs_reference` is False) and a batch
  from :func:`dualoptim_jax.unlearn.data.tokenize_unlearning_set` (keys ``input_ids``,
  ``answer_mask``, ``token_mask`` and their ``idk_`` twins), and return the *unweighted* scalar
  loss; the trainer applies the coefficients. A missing retain loss (``retain=None``) is 0.
  """

  forget: str
  retain: str | None
  forget_coef: float = 1.0
  retain_coef: float = 1.0
  beta: float = 0.1
  gamma: float = 0.0
  me_scope: str = "answer"

  @property
  def name(self) -> str:
    return self.forget if self.retain is None else f"{self.forget}+{self.retain}"

  @property
  def needs_reference(self) -> bool:
    """Whether a frozen copy of the model before unlearning is needed."""
    return self.forget in _REFERENCE_LOSSES or self.retain in _REFERENCE_LOSSES

  def forget_loss(self, model_fn: LogitsFn, ref_fn: LogitsFn | None, batch: Batch) -> Array:
    ids, mask = batch["input_ids"], batch["answer_mask"]
    if self.forget == "GA":
      return -masked_nll(model_fn(ids), ids, mask)
    if self.forget == "IDK":
      return masked_nll(
        model_fn(batch["idk_input_ids"]), batch["idk_input_ids"], batch["idk_answer_mask"]
      )
    if self.forget == "ME":
      return uniform_kl(model_fn(ids), mask if self.me_scope == "answer" else batch["token_mask"])
    if self.forget == "SimNPO":
      return simnpo_loss(
        answer_logprobs(model_fn(ids), ids, mask), jnp.sum(mask, -1), self.beta, self.gamma
      )
    ref_fn = self._reference(ref_fn)
    if self.forget == "NPO":
      ref = jax.lax.stop_gradient(answer_logprobs(ref_fn(ids), ids, mask))
      return npo_loss(answer_logprobs(model_fn(ids), ids, mask), ref, self.beta)
    # DPO
    true, idk = _pair_logprobs(model_fn, batch)
    ref_true, ref_idk = jax.tree.map(jax.lax.stop_gradient, _pair_logprobs(ref_fn, batch))
    return dpo_loss(idk, true, ref_idk, ref_true, self.beta)

  def retain_loss(self, model_fn: LogitsFn, ref_fn: LogitsFn | None, batch: Batch) -> Array:
    ids, mask = batch["input_ids"], batch["answer_mask"]
    if self.retain is None:
      return jnp.zeros((), jnp.float32)
    if self.retain == "GD":
      return masked_nll(model_fn(ids), ids, mask)
    if self.retain == "AP":
      true, idk = _pair_logprobs(model_fn, batch)
      return ap_loss(true, idk, self.beta)
    # KL
    ref_logits = jax.lax.stop_gradient(self._reference(ref_fn)(ids))
    return reference_kl(model_fn(ids), ref_logits, mask)

  def _reference(self, ref_fn: LogitsFn | None) -> LogitsFn:
    if ref_fn is None:
      raise ValueError(f"objective {self.name} needs a reference model (ref_fn), got None")
    return ref_fn


def make_objective(
  name: str,
  forget_coef: float = 1.0,
  retain_coef: float = 1.0,
  beta: float = 0.1,
  *,
  gamma: float = 0.0,
  me_scope: str = "answer",
) -> UnlearningLoss:
  """Builds an :class:`UnlearningLoss` from a name such as ``"IDK+AP"``, ``"ME+GD"``, ``"NPO"``.

  Args:
    name: ``"<forget>"`` or ``"<forget>+<retain>"``, forget in :data:`FORGET_LOSSES`, retain in
      :data:`RETAIN_LOSSES` (case-insensitive).
    forget_coef, retain_coef: ``c_f``, ``c_r`` >= 0.
    beta: inverse temperature of NPO / SimNPO / DPO / AP, > 0.
    gamma: SimNPO reward margin, >= 0.
    me_scope: tokens the ME loss scores: ``"answer"`` or ``"all"`` (every real token).
  """
  parts = name.split("+")
  if not 1 <= len(parts) <= 2:
    raise ValueError(f"objective name must be 'FORGET' or 'FORGET+RETAIN', got {name!r}")
  forget = _pick(parts[0], FORGET_LOSSES, "forget", name)
  retain = _pick(parts[1], RETAIN_LOSSES, "retain", name) if len(parts) == 2 else None
  for label, value in (
    ("forget_coef", forget_coef),
    ("retain_coef", retain_coef),
    ("gamma", gamma),
  ):
    if not (math.isfinite(value) and value >= 0):
      raise ValueError(f"{label} must be finite and >= 0, got {value}")
  if not (math.isfinite(beta) and beta > 0):
    raise ValueError(f"beta must be finite and > 0, got {beta}")
  if me_scope not in ("answer", "all"):
    raise ValueError(f"me_scope must be 'answer' or 'all', got {me_scope!r}")
  return UnlearningLoss(
    forget, retain, float(forget_coef), float(retain_coef), float(beta), float(gamma), me_scope
  )


def _pick(part: str, allowed: tuple[str, ...], kind: str, name: str) -> str:
  """The canonical spelling of ``part`` in ``allowed`` (case-insensitive)."""
  for a in allowed:
    if a.lower() == part.strip().lower():
      return a
  raise ValueError(
    f"unknown {kind} loss {part!r} in {name!r}; {kind} losses are {', '.join(allowed)}"
  )
