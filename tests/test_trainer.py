"""Tests for dualoptim_jax.unlearn.trainer: presets, modes, determinism, resume, end to end."""

import gc
import threading
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dualoptim_jax.unlearn import data as D
from dualoptim_jax.unlearn import losses as L
from dualoptim_jax.unlearn import trainer as T
from dualoptim_jax.unlearn.placement import make_mesh
from dualoptim_jax.unlearn.synthetic import synthetic_tofu

V, LEN = 11, 8


class Bigram(nnx.Module):
  """Smallest causal LM: logits of token t+1 from token t alone."""

  def __init__(self, rngs):
    self.embed = nnx.Embed(V, 16, rngs=rngs)
    self.out = nnx.Linear(16, V, rngs=rngs)

  def __call__(self, ids):
    return self.out(jnp.tanh(self.embed(ids)))


def _arrays(seed, n):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, V, size=(n, LEN)).astype(np.int32)
  mask = np.zeros((n, LEN), np.float32)
  mask[:, 4:] = 1
  idk = rng.integers(1, V, size=(n, LEN)).astype(np.int32)
  token_mask = np.ones((n, LEN), np.float32)
  token_mask[:, 0] = 0
  return {
    "input_ids": ids,
    "answer_mask": mask,
    "token_mask": token_mask,
    "idk_input_ids": idk,
    "idk_answer_mask": mask,
    "idk_token_mask": token_mask,
  }


@pytest.fixture
def toy():
  return Bigram(nnx.Rngs(0)), _arrays(0, 12), _arrays(1, 30)


def _iters(forget, retain, seed=0, batch=4):
  return D.BatchIterator(forget, batch, seed=seed), D.BatchIterator(retain, batch, seed=seed + 1)


def _params(model):
  return jax.tree.leaves(nnx.state(model, nnx.Param))


def _same(a, b):
  return all(np.array_equal(x, y) for x, y in zip(_params(a), _params(b)))


# --------------------------------------------------------------------------- presets


def test_preset_table_is_the_papers_six_settings():
  assert list(T.PRESETS) == [
    "joint",
    "alternate",
    "dualoptim",
    "dualoptim_8bit",
    "dualoptim_plus",
    "dualoptim_plus_8bit",
  ]
  assert [p.mode for p in T.PRESETS.values()] == ["joint"] + ["alternate"] * 5
  assert [p.state_bits for p in T.PRESETS.values()] == [32, 32, 32, 8, 32, 8]
  with pytest.raises(ValueError, match="unknown preset 'adam'; presets are joint, alternate"):
    T.make_optimizer("adam", 1e-3)


def test_full_precision_names_each_presets_32bit_method():
  assert T.full_precision("dualoptim_8bit") == "dualoptim"
  assert T.full_precision("dualoptim_plus_8bit") == "dualoptim_plus"
  assert [T.full_precision(p) for p in ("joint", "alternate")] == ["joint", "alternate"]


@pytest.mark.parametrize("name", list(T.PRESETS))
def test_every_preset_builds(name):
  tx = T.make_optimizer(name, 1e-3, forget_lr_scale=2.0)
  assert isinstance(tx, optax.GradientTransformationExtraArgs)
  config = T.optimizer_config(name, 1e-3, forget_lr_scale=2.0)
  assert config["state_bits"] == T.PRESETS[name].state_bits and config["forget_lr_scale"] == 2.0
  assert config["weight_decay"] == 0.01  # defaults are filled in


# --------------------------------------------------------------------------- modes


def test_joint_update_descends_the_weighted_sum(toy):
  model, forget, retain = toy
  obj = L.make_objective("GA+GD", forget_coef=0.3, retain_coef=2.0)
  runner = T.Unlearner(model, obj, optax.sgd(0.1), mode="joint")
  fi, ri = _iters(forget, retain)
  fb, rb = fi.indices(0), ri.indices(0)
  losses = runner.step(fi, ri)

  graphdef, params = nnx.split(model, nnx.Param)
  fbatch = {k: v[fb] for k, v in forget.items()}
  rbatch = {k: v[rb] for k, v in retain.items()}

  def total(p):
    fn = nnx.merge(graphdef, p)
    return 0.3 * obj.forget_loss(fn, None, fbatch) + 2.0 * obj.retain_loss(fn, None, rbatch)

  want = jax.tree.map(lambda p, g: p - 0.1 * g, params, jax.jit(jax.grad(total))(params))
  for got, exp in zip(jax.tree.leaves(nnx.state(runner.model, nnx.Param)), jax.tree.leaves(want)):
    np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-6)
  fn = nnx.merge(graphdef, params)
  assert losses["forget"] == pytest.approx(float(obj.forget_loss(fn, None, fbatch)), rel=1e-5)
  assert losses["retain"] == pytest.approx(float(obj.retain_loss(fn, None, rbatch)), rel=1e-5)


def test_alternate_mode_follows_the_schedule_and_passes_the_objective(toy):
  model, forget, retain = toy
  # forget learning rate 0: forget updates must leave the parameters as they are.
  tx = T.make_optimizer("alternate", 1e-2, forget_lr_scale=0.0)
  runner = T.Unlearner(
    model, L.make_objective("GA+GD"), tx, mode="alternate", forget_steps=2, retain_steps=3
  )
  fi, ri = _iters(forget, retain)
  before = _params(runner.model)
  runner.step(fi, ri)
  assert all(np.array_equal(a, b) for a, b in zip(before, _params(runner.model)))
  history = runner.run(fi, ri, 9, progress=False)
  assert history.objective.tolist() == [0, 1, 1, 1, 0, 0, 1, 1, 1]
  assert history.update.tolist() == list(range(1, 10))
  assert (fi.position, ri.position) == (4, 6)  # forget batches on forget steps only
  assert np.isnan(history.retain[history.objective == 0]).all()
  assert np.isfinite(history.forget[history.objective == 0]).all()
  assert not _same(model, runner.model)
  series = history.series()
  assert [u for u, _ in series["forget"]] == [1, 5, 6] and len(series["retain"]) == 6


def test_plain_optax_transform_in_alternate_mode_and_validation(toy):
  model, forget, retain = toy
  runner = T.Unlearner(model, L.make_objective("IDK+AP"), optax.adam(1e-2))
  h = runner.run(*_iters(forget, retain), 6, progress=False)
  assert h.objective.tolist() == [0, 1, 1, 1, 1, 1]
  with pytest.raises(ValueError, match="mode must be 'joint' or 'alternate', got 'both'"):
    T.Unlearner(model, L.make_objective("GA+GD"), optax.sgd(0.1), mode="both")
  with pytest.raises(ValueError, match="retain_steps must be an int >= 1, got 0"):
    T.Unlearner(model, L.make_objective("GA+GD"), optax.sgd(0.1), retain_steps=0)


def test_reference_defaults_to_the_model_before_unlearning(toy):
  model, forget, retain = toy
  obj = L.make_objective("NPO+KL", beta=0.5)
  runner = T.Unlearner(model, obj, optax.sgd(0.0), mode="joint")
  losses = runner.step(*_iters(forget, retain))
  # theta = ref: NPO = (2/beta) log 2 and KL = 0.
  assert losses["forget"] == pytest.approx(2 / 0.5 * np.log(2), rel=1e-5)
  assert losses["retain"] == pytest.approx(0.0, abs=1e-6)
  other = Bigram(nnx.Rngs(5))
  runner = T.Unlearner(model, obj, optax.sgd(0.0), mode="joint", ref_model=other)
  assert runner.step(*_iters(forget, retain))["retain"] > 1e-3


# --------------------------------------------------------------------------- determinism and resume


def test_runs_are_deterministic_and_leave_the_input_model_alone(toy):
  model, forget, retain = toy
  snapshot = [np.array(p) for p in _params(model)]
  outs = [
    T.unlearn(
      model,
      L.make_objective("GA+GD"),
      *_iters(forget, retain, seed=3),
      preset="alternate",
      learning_rate=1e-2,
      num_updates=8,
      progress=False,
    )
    for _ in range(2)
  ]
  assert _same(outs[0].model, outs[1].model)
  np.testing.assert_array_equal(outs[0].history.forget, outs[1].history.forget)
  assert not _same(model, outs[0].model)
  assert all(np.array_equal(a, b) for a, b in zip(snapshot, _params(model)))


def test_resume_mid_cycle_is_bit_identical(toy):
  model, forget, retain = toy
  preset = "dualoptim_plus"
  obj = L.make_objective("NPO+GD")
  build = lambda: T.Unlearner(
    model, obj, T.make_optimizer(preset, 1e-2), mode=T.PRESETS[preset].mode
  )
  straight = build()
  straight.run(*_iters(forget, retain), 10, progress=False)

  first = build()
  fi, ri = _iters(forget, retain)
  first.run(fi, ri, 4, progress=False)  # stops inside the 1 + 5 cycle
  saved, fstate, rstate = first.state_dict(), fi.state_dict(), ri.state_dict()
  first.run(fi, ri, 3, progress=False)  # keeps going: the saved copy must stay valid

  resumed = build()
  resumed.load_state_dict(saved)
  fi2, ri2 = _iters(forget, retain)
  fi2.load_state_dict(fstate)
  ri2.load_state_dict(rstate)
  resumed.run(fi2, ri2, 6, progress=False)
  assert resumed.update_count == 10
  assert _same(resumed.model, straight.model)

  with pytest.raises(ValueError, match="cannot resume: saved params do not match"):
    T.Unlearner(Bigram(nnx.Rngs(0)), obj, optax.sgd(0.1)).load_state_dict(
      {**saved, "params": {"w": jnp.zeros(3)}}
    )


# --------------------------------------------------------------------------- end to end on a tiny Llama


@pytest.fixture(scope="module")
def tuned():
  """A tiny Llama fine-tuned to memorise a small synthetic TOFU."""
  from dualoptim_jax.models.llama import Llama, LlamaConfig
  from dualoptim_jax.models.tokenizer import Tokenizer

  data = synthetic_tofu(seed=0, n_authors=8, qa_per_author=5, forget_fraction=0.25)
  tok = Tokenizer.train(
    [f"{it.question} {it.answer}" for it in data.forget + data.retain] + data.idk_answers,
    vocab_size=400,
  )
  forget = D.tokenize_unlearning_set(tok, data.forget, data.idk_answers, 64)
  retain = D.tokenize_unlearning_set(tok, data.retain, data.idk_answers, 64)
  everything = D.encode_pairs(
    tok, [(it.question, it.answer) for it in data.forget + data.retain], 64
  )
  model = Llama(LlamaConfig.tiny(tok.vocab_size), rngs=nnx.Rngs(0))
  result = T.finetune(
    model, D.BatchIterator(everything, 16, seed=0), optax.adamw(3e-3), 200, progress=False
  )
  return result, forget, retain


@nnx.jit
def _mean_logprob(model, ids, mask):
  return L.answer_mean_logprobs(model(ids), ids, mask).mean()


def _mean_answer_logprob(model, arrays):
  return float(
    _mean_logprob(model, jnp.asarray(arrays["input_ids"]), jnp.asarray(arrays["answer_mask"]))
  )


def test_finetune_memorises(tuned):
  result, forget, retain = tuned
  assert result.losses[-10:].mean() < 0.1 * result.losses[:10].mean()
  assert _mean_answer_logprob(result.model, forget) > -0.1  # p(answer token) > 0.9 on average
  assert _mean_answer_logprob(result.model, retain) > -0.1


def test_unlearning_lowers_forget_probability_far_more_than_retain(tuned):
  result, forget, retain = tuned
  f0, r0 = _mean_answer_logprob(result.model, forget), _mean_answer_logprob(result.model, retain)
  out = T.unlearn(
    result.model,
    L.make_objective("GA+GD"),
    *_iters(forget, retain, batch=8),
    preset="dualoptim_plus",
    learning_rate=2e-3,
    num_updates=24,
    progress=False,
  )
  f_drop = f0 - _mean_answer_logprob(out.model, forget)  # nats per answer token
  r_drop = r0 - _mean_answer_logprob(out.model, retain)
  # Measured: f_drop ~ 0.97, r_drop ~ 0.02 (4 forget and 20 retain updates).
  assert f_drop > 0.5
  assert f_drop > 10 * max(r_drop, 0.01)
  assert (
    len(out.history.series()["forget"]) > 0
    and np.isfinite(out.history.forget[~np.isnan(out.history.forget)]).all()
  )


def test_runs_that_differ_only_in_seed_share_compiled_steps(toy, monkeypatch):
  model, forget, retain = toy
  run = lambda seed: T.unlearn(
    model,
    L.make_objective("GA+GD", forget_coef=0.7),
    *_iters(forget, retain, seed=seed),
    preset="dualoptim",
    learning_rate=1e-2,
    num_updates=7,
    progress=False,
  )
  run(0)
  made, compiled_update = [], T._compiled_update
  monkeypatch.setattr(T, "_compiled_update", lambda *a: made.append(a) or compiled_update(*a))
  out = run(1)
  assert made == []  # seed 1 ran seed 0's programs
  assert not np.array_equal(
    out.history.forget, run(0).history.forget, equal_nan=True
  )  # the seed still matters


# --------------------------------------------------------------------------- one recipe


def test_one_objectives_stream_gives_joint_alternate_and_dualoptim_the_same_updates():
  """The recipe is the same for every preset: clipping -> Adam (0.9, 0.95) -> decay on weights
  only -> linearly decaying learning rate. Fed only forget gradients, the three make the updates
  of that reference chain, a huge gradient clipped alike and the bias and norm scale undecayed."""
  params = {
    "dense": {"kernel": jnp.full((3, 4), 0.5), "bias": jnp.full((4,), 0.5)},
    "final_norm": {"scale": jnp.full((4,), 0.5)},
  }
  rng = np.random.default_rng(0)
  grads = [
    jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    for _ in range(6)
  ]
  grads[2] = jax.tree.map(lambda g: 1e6 * g, grads[2])  # clipped to norm 1 like the others
  reference = optax.chain(
    optax.clip_by_global_norm(1.0),
    optax.scale_by_adam(0.9, 0.95, 1e-8),
    optax.add_decayed_weights(
      0.1, {"dense": {"kernel": True, "bias": False}, "final_norm": {"scale": False}}
    ),
    optax.scale_by_learning_rate(optax.linear_schedule(1e-2, 0.0, 6)),
  )

  def run(tx, **kwargs):
    state, p, out = tx.init(params), params, []
    for g in grads:
      u, state = tx.update(g, state, p, **kwargs)
      p = optax.apply_updates(p, u)
      out.append(u)
    return out

  want = run(reference)
  for preset, kwargs in (
    ("joint", {}),
    ("alternate", {"objective": 0}),
    ("dualoptim", {"objective": 0}),
  ):
    tx = T.make_optimizer(preset, 1e-2, weight_decay=0.1, decay_steps=6, retain_lr_scale=3.0)
    for got, exp in zip(run(tx, **kwargs), want):
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(exp)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-12, err_msg=preset)
  assert [
    T.decays(n)
    for n in (
      "layers.0.mlp.up_proj.kernel",
      "out.bias",
      "layers.0.input_layernorm.scale",
      "norm.scale",
      "embed_tokens.embedding",
    )
  ] == [True, False, False, False, True]
  with pytest.raises(ValueError, match="max_grad_norm must be >= 0"):
    T.make_optimizer("joint", 1e-2, max_grad_norm=-1)


def test_learning_rate_schedule_is_the_trainers_linear_warmup_and_decay():
  lr = T.learning_rate_schedule(1.0, warmup_steps=2, decay_steps=6)
  assert [float(lr(n)) for n in range(7)] == pytest.approx([0, 0.5, 1, 0.75, 0.5, 0.25, 0])
  assert T.learning_rate_schedule(0.3) == 0.3  # no horizon: constant
  config = T.optimizer_config("dualoptim_plus", 1.0, decay_steps=4, forget_lr_scale=2.0)
  assert T.step_size(config, 1, 0) == pytest.approx(1.5) and T.step_size(config, 1, 1) == 0.75
  assert (
    config["b2"] == 0.95 and config["max_grad_norm"] == 1.0 and config["careful_rounding"] is False
  )


def test_update_stability_is_the_largest_magnitude_and_the_count_over_ten_step_sizes():
  updates = {"a": jnp.array([0.5, -3.0]), "b": jnp.array([[2.0, -0.1]]), "c": jnp.float32(-25.0)}
  largest, over = jax.jit(T.update_stability)(updates, jnp.float32(0.2))
  assert (float(largest), int(over)) == (25.0, 2)  # |-3| and |-25| exceed 2.0; 2.0 itself does not
  rng = np.random.default_rng(0)
  tree = [rng.normal(size=s).astype(np.float32) for s in [(7, 5), (64,), (3, 4, 2)]]
  flat = np.abs(np.concatenate([x.ravel() for x in tree]))
  largest, over = T.update_stability([jnp.asarray(x) for x in tree], jnp.float32(0.1))
  assert float(largest) == flat.max() and int(over) == int(np.sum(flat > np.float32(1.0)))


def test_unlearn_records_its_settings_and_the_largest_update(toy):
  model, forget, retain = toy
  out = T.unlearn(
    model,
    L.make_objective("GA+GD"),
    *_iters(forget, retain),
    preset="alternate",
    learning_rate=1e-2,
    num_updates=6,
    progress=False,
  )
  assert (
    out.config["optimizer"]["decay_steps"] == 6 and out.config["schedule"]["mode"] == "alternate"
  )
  # Adam's first step moves every element by about one learning rate.
  assert 0.5 < out.stability["max_update_ratio"] < 10 and out.stability["elements_over_10x_lr"] == 0


# --------------------------------------------------------------------------- memory


def test_kept_programs_are_bounded_and_the_least_recently_used_goes_first(monkeypatch):
  monkeypatch.setattr(T, "_PROGRAMS", {})
  made = []
  make = lambda i: lambda: made.append(i) or f"program {i}"  # noqa: E731
  first = T._program((0,), make(0))
  for i in range(1, T._MAX_PROGRAMS):
    T._program((i,), make(i))
  assert T._program((0,), make(0)) is first  # a hit, and now the most recently used
  T._program((T._MAX_PROGRAMS,), make(T._MAX_PROGRAMS))  # one too many: (1,) goes
  assert made == list(range(T._MAX_PROGRAMS + 1))
  assert set(T._PROGRAMS) == {(i,) for i in range(T._MAX_PROGRAMS + 1)} - {(1,)}


def test_a_run_does_not_keep_the_previous_runs_step_programs(toy, monkeypatch):
  """A run alternating forget and retain needs two programs; the bound keeps just those, so
  the next run (another preset) does not hold the last one's executables beside its own."""
  model, forget, retain = toy
  monkeypatch.setattr(T, "_PROGRAMS", {})
  kept = []
  for tx in (optax.adam(1e-2), optax.sgd(1e-2)):
    runner = T.Unlearner(model, L.make_objective("GA+GD"), tx, forget_steps=1, retain_steps=1)
    runner.run(*_iters(forget, retain), 4, progress=False)
    kept.append(set(T._PROGRAMS))
  assert len(kept[0]) == len(kept[1]) == 2 and not kept[0] & kept[1]


def test_a_run_compiles_its_programs_before_its_state_and_not_again(toy, monkeypatch):
  """Both programs of an alternating run compile when it starts, before the optimizer state
  exists (the second one used to compile at update 1, on top of the state), and no later
  update compiles."""
  model, forget, retain = toy
  monkeypatch.setattr(T, "_PROGRAMS", {})
  made, compiled_update = [], T._compiled_update
  monkeypatch.setattr(T, "_compiled_update", lambda *a: made.append(a) or compiled_update(*a))
  runner = T.Unlearner(model, L.make_objective("GA+GD"), optax.adam(1e-2), retain_steps=2)
  forget_batches, retain_batches = _iters(forget, retain)
  runner.prepare(forget_batches.peek(), retain_batches.peek(), 3)
  assert len(made) == 2 and runner._core._opt_state is None
  runner.run(forget_batches, retain_batches, 3, progress=False)
  assert len(made) == 2 and forget_batches.position == 1 and retain_batches.position == 2
  fresh = T.Unlearner(model, L.make_objective("GA+GD"), optax.sgd(1e-2))
  fresh.prepare(forget_batches.peek(), retain_batches.peek(), 1)  # one update: forget only
  assert len(made) == 3


def test_missing_programs_compile_concurrently(monkeypatch):
  monkeypatch.setattr(T, "_PROGRAMS", {})
  both = threading.Barrier(2, timeout=30)  # broken unless two compiles wait at once

  def finish(lowered):
    both.wait()
    return f"compiled {lowered}"

  got = T._programs([((0,), lambda: "a"), ((1,), lambda: "b")], finish=finish)
  assert got == ["compiled a", "compiled b"] and set(T._PROGRAMS) == {(0,), (1,)}


def test_sharded_steps_survive_eviction_of_their_programs(toy, monkeypatch):
  """On a mesh the placement keys the program; its hash must not change while it is a key (the
  state's shardings complete it), or evicting the program fails."""
  model, forget, retain = toy
  monkeypatch.setattr(T, "_PROGRAMS", {})
  monkeypatch.setattr(T, "_MAX_PROGRAMS", 1)  # every change of objective evicts
  mesh = make_mesh("data=1,fsdp=1", devices=jax.devices()[:1])
  runner = T.Unlearner(
    model, L.make_objective("GA+GD"), optax.adam(1e-2), forget_steps=1, retain_steps=1, mesh=mesh
  )
  history = runner.run(*_iters(forget, retain), 4, progress=False)
  assert len(T._PROGRAMS) == 1 and np.isfinite(history.forget[::2]).all()


def test_a_compiled_step_keeps_neither_its_jitted_function_nor_after_eviction_itself(
  monkeypatch,
):
  """JAX's caches keep a jitted function's lowering and executables while the function lives:
  the trainer keeps only the executable, and an evicted one is freed."""
  monkeypatch.setattr(T, "_PROGRAMS", {})
  jitted, compiled = [], []

  def compiled_update(*program):
    jitted.append(weakref.ref(fn := jax.jit(lambda x: x * program[0])))
    return fn

  monkeypatch.setattr(T, "_compiled_update", compiled_update)
  args = (np.zeros(3, np.float32),)
  [run] = T._executables([((2.0,), args)])
  compiled.append(weakref.ref(run))
  np.testing.assert_array_equal(run(np.ones(3, np.float32)), np.full(3, 2.0))
  del run
  gc.collect()
  assert jitted[0]() is None and compiled[0]() is not None  # the executable alone is kept
  for i in range(T._MAX_PROGRAMS):
    T._executables([((float(i + 3),), args)])
  gc.collect()
  assert compiled[0]() is None  # evicted and freed


def test_donated_model_trains_in_place_with_the_same_result_and_one_executable(toy):
  model, forget, retain = toy
  loss = L.make_objective("GA+GD")

  def run(m, donate):
    return T.unlearn(
      m,
      loss,
      *_iters(forget, retain),
      preset="dualoptim_plus",
      learning_rate=1e-2,
      num_updates=6,
      progress=False,
      donate_model=donate,
    )

  kept = run(model, False)
  programs = len(T._PROGRAMS)
  graphdef, state = nnx.split(model)
  copy = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
  given = run(copy, True)
  assert len(T._PROGRAMS) == programs  # the same programs: compiled once, shared
  assert _same(kept.model, given.model)
  assert all(x.is_deleted() for x in _params(copy))  # its buffers were the run's
  assert not any(x.is_deleted() for x in _params(model))  # the kept model is untouched


def test_a_donated_model_needs_an_explicit_reference(toy):
  model, _, _ = toy
  with pytest.raises(ValueError, match="ref_model"):
    T.Unlearner(model, L.make_objective("NPO+KL"), optax.adam(1e-3), donate_model=True)


def test_the_optimizer_state_is_made_after_the_first_step_is_compiled(toy):
  model, forget, retain = toy
  runner = T.Unlearner(model, L.make_objective("GA+GD"), optax.adam(1e-3))
  assert runner._core._opt_state is None  # nothing allocated before the first step
  runner.step(*_iters(forget, retain))
  assert runner._core._opt_state is not None and runner.update_count == 1
