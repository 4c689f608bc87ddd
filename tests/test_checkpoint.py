"""Tests for dualoptim_jax.unlearn.checkpoint.

In process (one device): round trips, the save/keep policy, and the mismatch messages. In
processes of their own with 8 virtual CPU devices (tests/checkpoint_job.py): a job killed with
SIGKILL after a checkpoint resumes to parameters bit-identical to an uninterrupted run, and a
checkpoint written on fsdp=8 restores onto data=2,fsdp=4 and onto one device.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from multidevice import HERE, device_env, run_json

import dualoptim_jax as dj
from dualoptim_jax.models.llama import Llama, LlamaConfig
from dualoptim_jax.quantize import QuantizedArray
from dualoptim_jax.unlearn import checkpoint as C
from dualoptim_jax.unlearn import losses as L
from dualoptim_jax.unlearn import trainer as T

CONFIG = LlamaConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64)


def _unlearner(preset="dualoptim_plus", config=CONFIG):
  return T.Unlearner(
    Llama(config, rngs=nnx.Rngs(0)), L.make_objective("GA+GD"), T.make_optimizer(preset, 1e-3)
  )


def _fingerprint(preset="dualoptim_plus", config=CONFIG, **extra):
  return C.fingerprint(
    model=config,
    preset=preset,
    optimizer={"learning_rate": 1e-3},
    loss={"name": "GA+GD"},
    schedule={"forget_steps": 1, "retain_steps": 5},
    **extra,
  )


def _save(path, runner, fp, step=3):
  with C.Checkpointer(path, fingerprint=fp) as ckpt:
    ckpt.save(
      step, {"params": runner.params, "opt_state": runner.opt_state}, {"update": step}, force=True
    )


def _restore_error(path, runner, fp) -> str:
  with (
    C.Checkpointer(path, fingerprint=fp) as ckpt,
    pytest.raises(C.CheckpointMismatchError) as err,
  ):
    ckpt.restore({"params": runner.params, "opt_state": runner.opt_state})
  return str(err.value)


# --------------------------------------------------------------------------- round trip and policy


def test_round_trip_is_exact_for_quantized_states_counters_and_empty_nodes(tmp_path):
  params = {"w": jax.random.normal(jax.random.key(0), (4, 8)), "b": jnp.ones(3)}
  tx = optax.chain(
    dj.dualoptim_plus(1e-2, storage=dj.state_storage(state_bits=8, block_size=4, min_8bit_size=0)),
    optax.add_decayed_weights(0.0),
  )  # an optax EmptyState / empty-tuple node too
  state = tx.init(params)
  update = jax.jit(
    lambda s, k: tx.update(jax.tree.map(jnp.ones_like, params), s, params, objective=k)[1]
  )
  for k in (0, 1, 1):
    state = update(state, jnp.int32(k))
  assert any(
    isinstance(x, QuantizedArray)
    for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, QuantizedArray))
  )
  fp = C.fingerprint(preset="p", optimizer={"state_bits": 8})
  with C.Checkpointer(tmp_path, fingerprint=fp) as ckpt:
    assert ckpt.save(
      3, {"params": params, "opt_state": state}, {"update": 3, "note": [1, None]}, force=True
    )
    ckpt.wait()
    fresh = tx.init(params)
    arrays, extra, step = ckpt.restore({"params": params, "opt_state": fresh})
  assert step == 3 and extra == {"update": 3, "note": [1, None]}
  assert jax.tree.structure(arrays["opt_state"]) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(arrays), jax.tree.leaves({"params": params, "opt_state": state})):
    assert a.dtype == b.dtype and np.array_equal(a, b)


def test_every_and_keep(tmp_path):
  params = {"w": jnp.zeros(2)}
  with C.Checkpointer(tmp_path, fingerprint={}, every=3, keep=2) as ckpt:
    saved = [s for s in range(1, 11) if ckpt.save(s, {"params": params})]
    assert saved == [3, 6, 9]
    assert ckpt.save(10, {"params": params}, force=True)
    assert not ckpt.save(10, {"params": params}, force=True)  # already on disk
    ckpt.wait()
    assert ckpt.all_steps() == [9, 10] and ckpt.latest_step() == 10
  with pytest.raises(ValueError, match="every must be an int >= 1 or None, got 0"):
    C.Checkpointer(tmp_path, fingerprint={}, every=0)
  with pytest.raises(ValueError, match="keep must be an int >= 1 or None, got 0"):
    C.Checkpointer(tmp_path, fingerprint={}, keep=0)


def test_named_leaves_are_readable_paths():
  params = nnx.state(Llama(CONFIG, rngs=nnx.Rngs(0)), nnx.Param)
  names = C.named_leaves(params)
  assert "layers.0.self_attn.q_proj.kernel" in names and "embed_tokens.embedding" in names
  assert list(C.named_leaves((jnp.zeros(1), {"a": [jnp.zeros(1)]}))) == ["0", "1.a.0"]
  with pytest.raises(ValueError, match="both named 'a.b'"):
    C.named_leaves({"a.b": 1, "a": {"b": 2}})


def test_a_run_never_overwrites_checkpoints_without_resume(tmp_path):
  runner = _unlearner()
  _save(tmp_path, runner, _fingerprint())
  with (
    C.Checkpointer(tmp_path, fingerprint=_fingerprint()) as ckpt,
    pytest.raises(FileExistsError, match=r"already holds checkpoints \(latest: update 3\); resume"),
  ):
    C.run_with_checkpoints(runner, iter(()), iter(()), 5, ckpt, progress=False)


def test_params_round_trip_and_mismatch(tmp_path):
  model = Llama(LlamaConfig.tiny(50), rngs=nnx.Rngs(0))
  C.save_params(model, tmp_path / "m")
  other = Llama(LlamaConfig.tiny(50), rngs=nnx.Rngs(1))
  C.load_params(other, tmp_path / "m")
  for a, b in zip(
    jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(other, nnx.Param))
  ):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(C.CheckpointMismatchError, match="has shape"):
    C.load_params(Llama(LlamaConfig.tiny(60), rngs=nnx.Rngs(0)), tmp_path / "m")


# --------------------------------------------------------------------------- mismatches


def test_mismatched_preset_is_named(tmp_path):
  _save(tmp_path, _unlearner("dualoptim_plus"), _fingerprint("dualoptim_plus"))
  msg = _restore_error(tmp_path, _unlearner("dualoptim"), _fingerprint("dualoptim"))
  assert "checkpoint was written for preset 'dualoptim_plus' but this run uses 'dualoptim'" in msg
  assert len(msg.splitlines()) == 2  # one line of context, one difference


def test_mismatched_model_config_is_named(tmp_path):
  _save(tmp_path, _unlearner(), _fingerprint())
  bigger = LlamaConfig(vocab_size=64, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64)
  msg = _restore_error(tmp_path, _unlearner(config=bigger), _fingerprint(config=bigger))
  assert "checkpoint was written for model.dim 32 but this run uses 64" in msg
  assert "checkpoint was written for model.head_dim 8 but this run uses 16" in msg


def test_mismatched_param_shape_is_named_even_without_a_model_fingerprint(tmp_path):
  fp = _fingerprint(config=None)  # the arrays themselves are still checked, by name
  _save(tmp_path, _unlearner(), fp)
  bigger = LlamaConfig(vocab_size=64, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64)
  msg = _restore_error(tmp_path, _unlearner(config=bigger), fp)
  assert (
    "param 'layers.0.self_attn.o_proj.kernel' has shape (32, 32) in the checkpoint but (64, 64) in this run"
    in msg
  )
  assert "... and 3 more param differences" in msg
  assert "optimizer state arrays that follow from the parameters" in msg
  assert "PyTreeDef" not in msg and len(msg.splitlines()) <= 12


def test_mismatched_optimizer_state_is_summarised(tmp_path):
  fp = _fingerprint(preset=None)
  _save(tmp_path, _unlearner("dualoptim_plus"), fp)
  msg = _restore_error(tmp_path, _unlearner("dualoptim"), fp)
  assert re.search(
    r"\n  46 optimizer state arrays are in this run but not in the checkpoint, "
    r"e\.g\. '1\.0\.inner_states\.0\.count'",
    msg,
  ), msg
  assert re.search(
    r"\n  68 optimizer state arrays are in the checkpoint but not in this run, e\.g\. '1\.0\.base\.0\.",
    msg,
  ), msg
  assert "PyTreeDef" not in msg and len(msg.splitlines()) <= 4


def test_fingerprint_mismatches_lists_every_difference():
  saved = C.fingerprint(preset="a", optimizer={"lr": 1e-3, "bits": 8}, seed=1)
  now = C.fingerprint(preset="a", optimizer={"lr": 3e-4}, loss={"name": "IDK+AP"}, seed=1)
  assert C.fingerprint_mismatches(saved, now) == [
    "checkpoint has no loss.name but this run uses 'IDK+AP'",
    "checkpoint was written with optimizer.bits 8, which this run does not set",
    "checkpoint was written for optimizer.lr 0.001 but this run uses 0.0003",
  ]
  assert C.fingerprint_mismatches(saved, saved) == []


# --------------------------------------------------------------------------- 8 devices, real kills


def _job(tmp, name, *args, num_devices=8, cache=None):
  extra = ["--compilation-cache", str(cache)] if cache else []
  return run_json(
    "checkpoint_job.py",
    "--dir",
    str(tmp / name),
    "--out",
    str(tmp / f"{name}.npz"),
    *args,
    *extra,
    num_devices=num_devices,
  )


def _kill_after_checkpoint(tmp, name, step, *args, cache=None):
  """Starts the job slowed down, SIGKILLs it once checkpoint ``step`` is on disk."""
  extra = ["--compilation-cache", str(cache)] if cache else []
  proc = subprocess.Popen(
    [
      sys.executable,
      str(HERE / "checkpoint_job.py"),
      "--dir",
      str(tmp / name),
      "--out",
      str(tmp / f"{name}.npz"),
      "--delay",
      "0.4",
      *args,
      *extra,
    ],
    env=device_env(8),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  deadline = time.monotonic() + 240
  try:
    while not (tmp / name / str(step)).is_dir():
      assert proc.poll() is None, (
        f"the job ended before checkpoint {step}:\n{proc.communicate()[1][-4000:]}"
      )
      assert time.monotonic() < deadline, "no checkpoint within 240 s"
      time.sleep(0.05)
    still_running = proc.poll() is None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  return still_running, proc.returncode


def _load(path):
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def _same(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k], equal_nan=True) for k in a)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("ckpt")
  cache = tmp / "jax-cache"  # the later jobs reuse the compiled steps
  out = _job(tmp, "full", cache=cache)
  return tmp, cache, out


def test_uninterrupted_job_keeps_the_last_checkpoints(uninterrupted):
  _, _, out = uninterrupted
  assert out["steps"] == [12, 14]  # every 4, keep 2, and the end
  assert out["update_count"] == 14 and out["mesh"] == {"data": 1, "fsdp": 8}
  assert out["param_specs"]["layers.0.self_attn.q_proj.kernel"] == "P('fsdp',)"


def test_killed_job_resumes_bit_identical_mid_cycle(uninterrupted):
  tmp, cache, _ = uninterrupted
  running, code = _kill_after_checkpoint(tmp, "killed", 4, cache=cache)
  assert running and code == -signal.SIGKILL
  killed_steps = sorted(int(p.name) for p in (tmp / "killed").iterdir() if p.name.isdigit())
  assert killed_steps and 14 not in killed_steps  # it really died before the end
  out = _job(tmp, "killed", "--resume", cache=cache)
  # Cycles are 2 forget + 3 retain updates: resuming at 4, 8 or 12 is mid-cycle.
  assert out["start"] in (4, 8, 12) and out["start"] % 5 != 0
  assert out["update_count"] == 14
  full, resumed = _load(tmp / "full.npz"), _load(tmp / "killed.npz")
  assert _same(full, resumed)  # parameters and the loss history of all 14 updates


@pytest.mark.parametrize("mesh, devices", [("data=2,fsdp=4", 8), ("none", 1)])
def test_restore_onto_another_mesh(uninterrupted, mesh, devices):
  """A checkpoint written on fsdp=8 read onto another layout: the same values, the new shardings."""
  tmp, cache, _ = uninterrupted
  target = tmp / f"moved-{devices}"
  shutil.copytree(tmp / "full", target)
  out = _job(tmp, target.name, "--resume", "--mesh", mesh, num_devices=devices)
  assert out["start"] == 14 and out["update_count"] == 14 and out["num_devices"] == devices
  if devices == 1:
    assert out["mesh"] is None and set(out["param_specs"].values()) == {"single-device"}
  else:
    assert out["mesh"] == {"data": 2, "fsdp": 4}
    assert out["param_specs"]["layers.0.mlp.down_proj.kernel"] == "P(None, 'fsdp')"
  assert _same(_load(tmp / "full.npz"), _load(tmp / f"{target.name}.npz"))


@pytest.mark.slow
def test_job_resume_with_another_preset_fails_naming_it(uninterrupted, tmp_path):
  tmp, _, _ = uninterrupted
  proc = subprocess.run(
    [
      sys.executable,
      str(HERE / "checkpoint_job.py"),
      "--dir",
      str(tmp / "full"),
      "--out",
      str(tmp_path / "x.npz"),
      "--resume",
      "--optimizer",
      "dualoptim",
      "--mesh",
      "none",
    ],
    env=device_env(1),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode != 0
  assert (
    "checkpoint was written for preset 'dualoptim_plus' but this run uses 'dualoptim'"
    in proc.stderr
  )
  assert "PyTreeDef" not in proc.stderr


@pytest.mark.slow
def test_killed_8bit_job_resumes_bit_identical(tmp_path):
  """Quantized codes and block scales survive the kill and the resume exactly."""
  cache = tmp_path / "jax-cache"
  _job(tmp_path, "full8", "--optimizer", "dualoptim_plus_8bit", cache=cache)
  running, code = _kill_after_checkpoint(
    tmp_path, "killed8", 8, "--optimizer", "dualoptim_plus_8bit", cache=cache
  )
  assert running and code == -signal.SIGKILL
  out = _job(tmp_path, "killed8", "--resume", "--optimizer", "dualoptim_plus_8bit", cache=cache)
  assert out["start"] in (8, 12)
  assert _same(_load(tmp_path / "full8.npz"), _load(tmp_path / "killed8.npz"))


# --------------------------------------------------------------------------- the main job's flags


def test_main_job_flags():
  from dualoptim_jax.unlearn import cli

  cfg = cli.parse_args(
    [
      "--mesh",
      "fsdp=1",
      "--checkpoint-dir",
      "ck",
      "--checkpoint-every",
      "7",
      "--keep-checkpoints",
      "2",
      "--resume",
    ]
  )
  assert (cfg.mesh, cfg.checkpoint_dir, cfg.checkpoint_every, cfg.keep_checkpoints, cfg.resume) == (
    "fsdp=1",
    "ck",
    7,
    2,
    True,
  )
  defaults = cli.parse_args([])
  assert defaults.mesh is None and defaults.checkpoint_dir is None and not defaults.resume


@pytest.mark.parametrize(
  "argv, message",
  [
    (["--mesh", "data=2"], "--mesh: mesh spec 'data=2': 2 does not divide the 1 devices"),
    (["--mesh", "model=1"], "--mesh: mesh spec 'model=1': unknown axis 'model'"),
    (["--resume"], "--resume needs --checkpoint-dir"),
    (["--checkpoint-every", "0"], "--checkpoint-every must be >= 1, got 0"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints must be >= 1, got 0"),
  ],
)
def test_main_job_flag_errors(argv, message, capsys):
  from dualoptim_jax.unlearn import cli

  with pytest.raises(SystemExit):
    cli.parse_args(argv)
  assert message in capsys.readouterr().err


CLI_TINY = [
  "--model-size",
  "tiny",
  "--finetune-steps",
  "20",
  "--eval-items",
  "3",
  "--max-new-tokens",
  "4",
  "--vocab-size",
  "300",
  "--seeds",
  "0",
  "--no-progress",
  "--presets",
  "dualoptim_plus",
  "--steps",
  "40",
  "--mesh",
  "data=2,fsdp=4",
  "--checkpoint-every",
  "4",
]


@pytest.mark.slow
def test_main_job_killed_and_resumed_on_a_mesh_matches_an_uninterrupted_run(tmp_path):
  """``dualoptim-unlearn --mesh data=2,fsdp=4 --checkpoint-dir``: SIGKILL after a checkpoint,
  ``--resume``, and the unlearned model's metrics and loss history equal the uninterrupted run's."""
  cache = ["--cache-dir", str(tmp_path / "cache")]
  job = [sys.executable, "-m", "dualoptim_jax.unlearn", *CLI_TINY, *cache]
  env = device_env(8)
  full = subprocess.run(
    job + ["--checkpoint-dir", str(tmp_path / "ck-a"), "--out", str(tmp_path / "a")],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert full.returncode == 0, full.stderr[-4000:]
  run_dir = tmp_path / "ck-b" / "dualoptim_plus" / "seed0"
  proc = subprocess.Popen(
    job + ["--checkpoint-dir", str(tmp_path / "ck-b"), "--out", str(tmp_path / "b")],
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    deadline = time.monotonic() + 600
    while not (run_dir / "4").is_dir():
      assert proc.poll() is None, proc.communicate()[1][-4000:]
      assert time.monotonic() < deadline
      time.sleep(0.05)
    assert proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert 240 not in [
    int(p.name) for p in run_dir.iterdir() if p.name.isdigit()
  ]  # 40 cycles of 1 + 5
  again = subprocess.run(
    job + ["--checkpoint-dir", str(tmp_path / "ck-b"), "--out", str(tmp_path / "b"), "--resume"],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert again.returncode == 0, again.stderr[-4000:]
  assert "[dualoptim_plus] resumed from" in again.stdout
  a = json.loads((tmp_path / "a" / "results.json").read_text())
  b = json.loads((tmp_path / "b" / "results.json").read_text())
  assert a["loss_histories"] == b["loss_histories"]
  assert a["rows"]["dualoptim_plus"] == b["rows"]["dualoptim_plus"]
  # A checkpoint written for another preset is refused by name, before any array is read.
  other = subprocess.run(
    job
    + [
      "--checkpoint-dir",
      str(tmp_path / "ck-b"),
      "--out",
      str(tmp_path / "c"),
      "--resume",
      "--lr",
      "1e-3",
    ],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert other.returncode == 2
  assert (
    "checkpoint was written for optimizer.learning_rate 0.0003 but this run uses 0.001"
    in other.stderr
  )
