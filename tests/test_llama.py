"""Tests for dualoptim_jax.models.llama."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dualoptim_jax.models.llama import Llama, LlamaConfig, apply_rotary, rotary_angles

V = 61


def _model(seed=0, **overrides):
  cfg = dataclasses.replace(LlamaConfig.tiny(V), **overrides)
  return Llama(cfg, rngs=nnx.Rngs(seed))


def _ids(shape, seed=0):
  return jax.random.randint(jax.random.key(seed), shape, 3, V, dtype=jnp.int32)


def _n_params(model):
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@nnx.jit
def _fwd(model, ids, positions=None, mask=None):
  # Jitted forward for the tests: eager NNX dispatches (and compiles) op by op, seconds per call.
  return model(ids, positions, attention_mask=mask)


def _mesh(shape, names):
  return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))


@pytest.fixture(scope="module")
def model():
  return _model()


def test_config_validation():
  with pytest.raises(ValueError, match="n_kv_heads=3 must divide n_heads=4"):
    dataclasses.replace(LlamaConfig.tiny(V), n_kv_heads=3)
  with pytest.raises(ValueError, match="head_dim must be an even"):
    dataclasses.replace(LlamaConfig.tiny(V), head_dim=7)
  with pytest.raises(ValueError, match="dim=30 is not divisible by n_heads=4"):
    dataclasses.replace(LlamaConfig.tiny(V), dim=30, head_dim=None)
  with pytest.raises(ValueError, match="vocab_size must be a positive int"):
    LlamaConfig.tiny(0)
  assert LlamaConfig.tiny(V).head_dim == 16


@pytest.mark.parametrize("tie", [True, False])
def test_num_params_matches_model(tie):
  m = _model(tie_embeddings=tie)
  assert _n_params(m) == m.config.num_params
  assert (m.lm_head is None) == tie


@pytest.mark.parametrize(
  "cfg", [LlamaConfig.small(4096), LlamaConfig.smollm2_135m()], ids=["small", "smollm2"]
)
def test_preset_num_params(cfg):
  abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
  assert _n_params(abstract) == cfg.num_params
  if cfg.vocab_size == 49152:  # published size of SmolLM2-135M
    assert round(cfg.num_params / 1e6, 1) == 134.5


def test_shapes_and_dtypes(model):
  logits = _fwd(model, _ids((3, 7)))
  assert logits.shape == (3, 7, V) and logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))
  bf16 = Llama(model.config, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16)
  assert bf16.embed_tokens.embedding.dtype == jnp.bfloat16
  assert _fwd(bf16, _ids((2, 5))).dtype == jnp.float32


def test_causal(model):
  ids = _ids((2, 10))
  changed = ids.at[:, 6].set((ids[:, 6] + 1 - 3) % (V - 3) + 3)
  a, b = _fwd(model, ids), _fwd(model, changed)
  np.testing.assert_allclose(a[:, :6], b[:, :6], atol=1e-6)
  assert float(jnp.max(jnp.abs(a[:, 6:] - b[:, 6:]))) > 1e-4


def test_gqa_equals_mha_with_repeated_kv_heads():
  # GQA with n_kv_heads=2, 4 query heads: query head h reads KV head h // 2 (HF repeat_kv order).
  gqa = _model(seed=3)
  mha = _model(seed=4, n_kv_heads=4)
  g_state, m_state = nnx.state(gqa, nnx.Param), nnx.state(mha, nnx.Param)
  hd = gqa.config.head_dim

  def repeat(kernel):  # (dim, 2*hd) -> (dim, 4*hd), each KV head used by 2 consecutive q heads
    k = kernel.reshape(kernel.shape[0], 2, 1, hd)
    return jnp.broadcast_to(k, (kernel.shape[0], 2, 2, hd)).reshape(kernel.shape[0], 4 * hd)

  flat_g = dict(nnx.to_flat_state(g_state))
  new = {}
  for path, _ in nnx.to_flat_state(m_state):
    value = flat_g[path][...]
    if path[-2] in ("k_proj", "v_proj"):
      value = repeat(value)
    new[path] = value
  for path, var in nnx.to_flat_state(m_state):
    var[...] = new[path]
  nnx.update(mha, m_state)
  ids = _ids((2, 9))
  np.testing.assert_allclose(_fwd(gqa, ids), _fwd(mha, ids), atol=1e-5)
  assert _n_params(gqa) < _n_params(mha)


def test_rotary_matches_hf_rotate_half():
  x = np.asarray(jax.random.normal(jax.random.key(1), (2, 5, 3, 8)))
  pos = np.array([[0, 1, 2, 3, 4], [7, 9, 11, 13, 15]])
  cos, sin = rotary_angles(jnp.asarray(pos), 8, 10000.0)
  # Reference: HF Llama apply_rotary_pos_emb with cos/sin duplicated over the two halves.
  inv = 1.0 / 10000.0 ** (np.arange(0, 8, 2) / 8)
  ang = pos[..., None] * inv
  c = np.concatenate([np.cos(ang)] * 2, -1)[:, :, None]
  s = np.concatenate([np.sin(ang)] * 2, -1)[:, :, None]
  rot_half = np.concatenate([-x[..., 4:], x[..., :4]], -1)
  np.testing.assert_allclose(
    apply_rotary(jnp.asarray(x), cos, sin), x * c + rot_half * s, atol=1e-5
  )


def test_rotary_depends_only_on_relative_positions(model):
  ids = _ids((2, 8))
  base = jnp.broadcast_to(jnp.arange(8), (2, 8))
  ref = _fwd(model, ids)
  np.testing.assert_allclose(_fwd(model, ids, base + 37), ref, atol=2e-4)
  # Non-uniform gaps change relative distances, so the logits must change.
  stretched = _fwd(model, ids, base * 3)
  assert float(jnp.max(jnp.abs(stretched - ref))) > 1e-3


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_mask(model, side):
  lengths = [7, 3, 5]
  width = 9
  rows = [_ids((1, n), seed=i)[0] for i, n in enumerate(lengths)]
  ids = np.zeros((3, width), np.int32)
  mask = np.zeros((3, width), np.int32)
  for r, (row, n) in enumerate(zip(rows, lengths)):
    sl = slice(width - n, width) if side == "left" else slice(0, n)
    ids[r, sl], mask[r, sl] = row, 1
  logits = _fwd(model, jnp.asarray(ids), None, jnp.asarray(mask))
  assert bool(jnp.all(jnp.isfinite(logits)))
  for r, (row, n) in enumerate(zip(rows, lengths)):
    sl = slice(width - n, width) if side == "left" else slice(0, n)
    np.testing.assert_allclose(logits[r, sl], _fwd(model, row[None])[0], atol=2e-5)


def test_tied_embeddings_share_storage(model):
  assert model.lm_head is None
  params = nnx.state(model, nnx.Param)
  assert sum(1 for x in jax.tree.leaves(params) if x.shape == (V, model.config.dim)) == 1
  ids = _ids((1, 4))
  h, _ = nnx.jit(lambda m, x: m.hidden_states(x))(model, ids)
  np.testing.assert_allclose(_fwd(model, ids), h @ model.embed_tokens.embedding[...].T, atol=1e-5)

  # The gradient of a logit w.r.t. E has an output-side term: non-zero on a token not in the input.
  unused = next(t for t in range(3, V) if t not in set(np.asarray(ids[0]).tolist()))
  grads = nnx.jit(nnx.grad(lambda m: m(ids)[0, -1, unused]))(model)
  assert float(jnp.abs(grads.embed_tokens.embedding[...][unused]).sum()) > 0


def test_jit_equals_eager(model):
  ids = _ids((2, 6))
  mask = jnp.array([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
  eager = model(ids, attention_mask=mask)
  jitted = nnx.jit(lambda m, x, a: m(x, attention_mask=a))(model, ids, mask)
  np.testing.assert_allclose(jitted, eager, atol=1e-5)


def test_kv_cache_chunks_equal_full_forward(model):
  ids = _ids((2, 10))
  mask = jnp.array([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1], [1] * 10])
  full = _fwd(model, ids, None, mask)
  cache = model.init_cache(2, 16)
  step = nnx.jit(lambda m, x, a, c: m(x, attention_mask=a, cache=c))
  outs = []
  for lo, hi in [(0, 4), (4, 5), (5, 10)]:
    logits, cache = step(model, ids[:, lo:hi], mask[:, lo:hi], cache)
    outs.append(logits)
  assert int(cache.index) == 10
  np.testing.assert_array_equal(cache.mask[:, :10], mask.astype(bool))
  np.testing.assert_allclose(jnp.concatenate(outs, 1)[mask > 0], full[mask > 0], atol=2e-5)


def _loss(model, ids):
  logits = model(ids[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()


def test_adam_decreases_loss():
  model = _model(seed=1)
  ids = _ids((2, 12), seed=5)
  params = nnx.state(model, nnx.Param)
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.adam(1e-2)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(lambda p: _loss(nnx.merge(graphdef, p, rest), ids))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for _ in range(15):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  assert losses[-1] < 0.5 * losses[0], losses


def test_nnx_optimizer_with_partition_annotations():
  model = _model(seed=2)
  opt = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
  ids = _ids((2, 8))

  @nnx.jit
  def step(model, opt):
    loss, grads = nnx.value_and_grad(_loss)(model, ids)
    opt.update(model, grads)
    return loss

  before = model.layers[0].self_attn.q_proj.kernel[...]
  l0, l1 = float(step(model, opt)), float(step(model, opt))
  assert l1 < l0
  assert not np.allclose(before, model.layers[0].self_attn.q_proj.kernel[...])
  # Optimizer moments inherit the parameters' partition metadata.
  specs = nnx.get_partition_spec(nnx.state(opt))
  mu_spec = specs["opt_state"][0].mu["layers"][0]["self_attn"]["q_proj"]["kernel"]
  assert mu_spec.get_value() == jax.sharding.PartitionSpec("fsdp", None)


def test_partition_specs_and_one_device_mesh():
  model = _model(tie_embeddings=False)
  specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
  P = jax.sharding.PartitionSpec
  assert specs["embed_tokens"]["embedding"].get_value() == P(None, "fsdp")
  assert specs["layers"][1]["mlp"]["up_proj"]["kernel"].get_value() == P("fsdp", None)
  assert specs["layers"][1]["mlp"]["down_proj"]["kernel"].get_value() == P(None, "fsdp")
  assert specs["lm_head"]["kernel"].get_value() == P("fsdp", None)
  assert specs["norm"]["scale"].get_value() == P(None)

  mesh = _mesh((1, 1), ("data", "fsdp"))
  state = nnx.state(model)
  sharded = jax.device_put(state, nnx.get_named_sharding(state, mesh))
  nnx.update(model, sharded)
  kernel = model.layers[0].self_attn.o_proj.kernel[...]
  assert kernel.sharding.spec == P(None, "fsdp") and kernel.sharding.mesh.shape == mesh.shape
  ids = _ids((2, 5))
  with jax.set_mesh(mesh):
    out = nnx.jit(lambda m, x: m(x))(model, ids)
    built = Llama(model.config, rngs=nnx.Rngs(0))  # created sharded under the mesh
  assert out.shape == (2, 5, V)
  assert built.layers[0].mlp.gate_proj.kernel[...].sharding.spec == P("fsdp", None)


def test_tensor_parallel_axis_annotation():
  model = Llama(LlamaConfig.tiny(V), rngs=nnx.Rngs(0), tp_axis="tp")
  P = jax.sharding.PartitionSpec
  specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
  assert specs["layers"][0]["self_attn"]["q_proj"]["kernel"].get_value() == P("fsdp", "tp")
  assert specs["embed_tokens"]["embedding"].get_value() == P("tp", "fsdp")
  mesh = _mesh((1, 1, 1), ("data", "fsdp", "tp"))
  state = jax.device_put(nnx.state(model), nnx.get_named_sharding(nnx.state(model), mesh))
  nnx.update(model, state)
  assert _fwd(model, _ids((1, 3))).shape == (1, 3, V)
