"""Checkpoint integrity: checksums at save, verification at restore, fallback to an intact one."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from dualoptim_jax.unlearn import checkpoint as C
from dualoptim_jax.unlearn import integrity, metrics

FP = {"preset": "test"}


def groups(scale: float) -> dict:
  return {
    "params": {"w": jnp.arange(4096, dtype=jnp.float32) * scale, "b": jnp.ones((3, 5)) * scale},
    "opt_state": {"count": jnp.int32(7), "codes": jnp.full((64,), 3, jnp.uint8)},
  }


def write(directory: Path, steps=(2, 4)) -> None:
  with C.Checkpointer(directory, fingerprint=FP, async_save=False, keep=None) as ckpt:
    for step in steps:
      ckpt.save(step, groups(float(step)), {"update": step}, force=True)


def flip_bytes(path: Path) -> None:
  data = bytearray(path.read_bytes())
  for i in range(len(data) // 2, len(data) // 2 + 8):
    data[i] ^= 0xFF
  path.write_bytes(bytes(data))


def largest_array_file(step_dir: Path) -> Path:
  files = [p for p in (step_dir / "arrays").rglob("*") if p.is_file() and "/d/" in str(p)]
  return max(files, key=lambda p: p.stat().st_size)


def test_checksum_detects_any_changed_element_and_moved_elements():
  x = jnp.arange(1000, dtype=jnp.float32)
  base = integrity.checksums({"g": {"x": x}})["g"]["x"]
  assert len(base) == 16
  assert integrity.checksums({"g": {"x": x.at[500].set(500.00006)}})["g"]["x"] != base  # 1 ulp
  assert integrity.checksums({"g": {"x": x[::-1]}})["g"]["x"] != base  # same values, moved
  assert integrity.checksums({"g": {"x": x + 0}})["g"]["x"] == base


@pytest.mark.parametrize(
  "value",
  [
    jnp.ones((4, 8), jnp.bfloat16),
    jnp.arange(10, dtype=jnp.uint8),
    jnp.int32(3),
    jnp.array([True, False]),
    jnp.zeros((0, 3)),
  ],
  ids=["bfloat16", "uint8", "scalar", "bool", "empty"],
)
def test_checksum_covers_every_stored_dtype(value):
  assert len(integrity.checksums({"g": {"v": value}})["g"]["v"]) == 16


def test_intact_checkpoint_restores_and_verifies(tmp_path):
  write(tmp_path)
  with C.Checkpointer(tmp_path, fingerprint=FP) as ckpt:
    arrays, state, step = ckpt.restore(groups(0.0))
  assert step == 4 and state == {"update": 4}  # the checksums are not part of the caller's state
  np.testing.assert_array_equal(arrays["params"]["w"], np.arange(4096) * 4.0)


@pytest.mark.parametrize("damage", ["array file", "_sharding file"])
def test_damaged_latest_checkpoint_is_named_and_the_run_falls_back(tmp_path, damage):
  write(tmp_path)
  if damage == "array file":
    flip_bytes(largest_array_file(tmp_path / "4"))
  else:
    (tmp_path / "4" / "arrays" / "_sharding").write_text('{"not": json')
  with C.Checkpointer(tmp_path, fingerprint=FP) as ckpt:
    with pytest.raises(C.CheckpointCorruptError, match=r"checkpoint .*/4 is damaged"):
      ckpt.restore(groups(0.0), 4)
    lines = []
    arrays, _, step = ckpt.restore_intact(groups(0.0), log=lines.append)
    assert step == 2
    np.testing.assert_array_equal(arrays["params"]["w"], np.arange(4096) * 2.0)
    assert len(lines) == 1 and "\n" not in lines[0]
    assert f"{tmp_path}/4 is damaged" in lines[0] and "trying update 2" in lines[0]
    why = "does not match the checksum" if damage == "array file" else "cannot be read"
    assert why in lines[0], lines[0]
    assert ckpt.all_steps() == [2]  # the damaged one is gone: the resumed run writes step 4 again


def test_every_checkpoint_damaged_raises(tmp_path):
  write(tmp_path)
  for step in (2, 4):
    flip_bytes(largest_array_file(tmp_path / str(step)))
  with C.Checkpointer(tmp_path, fingerprint=FP) as ckpt:
    with pytest.raises(C.CheckpointCorruptError, match="every checkpoint"):
      ckpt.restore_intact(groups(0.0), log=lambda _: None)


def test_evaluation_names_non_finite_model_outputs():
  def logprob_fn(questions, answers):
    return np.full(len(questions), np.nan), np.ones(len(questions))

  with pytest.raises(metrics.NonFiniteOutputError, match="not finite"):
    metrics._batched_avg_logprob(logprob_fn, ["q"] * 3, ["a"] * 3, 2, _NoBar())


class _NoBar:
  def update(self, n):
    del n
