"""Two processes x 4 CPU devices joined by jax.distributed, against one process with 8.

The processes are started by :mod:`dualoptim_jax.launch` (free loopback port, Gloo collectives).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from multidevice import run_json
from multiprocess import job_env, run_job, script
from test_integrity import flip_bytes, largest_array_file

from dualoptim_jax import launch


@pytest.mark.slow
def test_optimizer_across_two_processes_matches_one(tmp_path):
  """Eager and jitted init, static and traced objective, float32 and 8-bit DualOptim+."""
  two = run_job(script("multiprocess_checks.py", str(tmp_path / "two.npz")), timeout=600)
  assert two.codes == [0, 0], two.tail()
  report = two.json(0)
  assert report["process_count"] == 2 and report["device_count"] == 8
  assert report["local_device_count"] == 4
  assert not report["params_fully_addressable"]  # the parameters really span both processes
  assert not any(line.startswith("{") for line in two.lines[1])  # process 0 alone reports
  assert len(report["checks"]) == 4
  for name, check in report["checks"].items():
    for stage in ("init", "after_update"):
      assert check[stage]["wrong"] == [], (name, stage, check[stage]["wrong"])
      assert check[stage]["num_sharded"] >= 12, (name, stage)  # 3 params x (base + 2 deltas) x 2
      # Only leaves that are no parameter's state (step counters) may be left to jit's placement.
      assert all(n.split(".")[-1] in ("count", "counts") for n in check[stage]["local_scalars"])
    assert check["collectives"] == [], name

  one = run_json("multiprocess_checks.py", str(tmp_path / "one.npz"), num_devices=8)
  assert one["process_count"] == 1 and one["params_fully_addressable"]
  a, b = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
  assert sorted(a.files) == sorted(b.files) and len(a.files) > 100
  different = [k for k in a.files if not np.array_equal(a[k], b[k])]
  assert different == [], different[:5]


# ------------------------------------------------------------------------------------------------
# The main job (dualoptim-unlearn) on 2 processes x 4 CPU devices.

PRESETS = ("dualoptim_plus", "dualoptim_plus_8bit")
UPDATES = 24  # --steps 4 forget updates in cycles of 1 forget + 5 retain updates
SMALL = [  # a tiny model and evaluation: the subject is the runtime, not the metrics
  "--model-size", "tiny", "--finetune-steps", "4", "--eval-items", "2", "--max-new-tokens", "2",
  "--batch-size", "8", "--seeds", "0", "--no-progress", "--distributed-timeout", "30",
]  # fmt: skip


def job(out: Path, ckpt: Path, cache: Path, *extra: str, presets=PRESETS, mesh="data=1,fsdp=8"):
  return [
    sys.executable, "-m", "dualoptim_jax.unlearn", "--presets", ",".join(presets),
    "--steps", "4", "--mesh", mesh, "--out", str(out), "--cache-dir", str(cache),
    "--checkpoint-dir", str(ckpt), "--checkpoint-every", "6", *SMALL, *extra,
  ]  # fmt: skip


def one_process(command: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
  """``command`` in one process with 8 devices that joins as a job of one (``launch -n 1``): on
  Gloo's collectives, like the 2-process job, so the two runs are bitwise comparable."""
  env = launch.process_env(
    job_env(),
    coordinator=f"127.0.0.1:{launch.free_port()}",
    num_processes=1,
    process_id=0,
    devices_per_process=8,
  )
  return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def relative_l2(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> float:
  assert sorted(got) == sorted(want)
  a = np.concatenate([got[k].ravel() for k in sorted(want)]).astype(np.float64)
  b = np.concatenate([want[k].ravel() for k in sorted(want)]).astype(np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def final_params(ckpt: Path, preset: str) -> dict[str, np.ndarray]:
  """The parameters of a run's newest checkpoint, read in this (one-device) process."""
  run = ckpt / preset / "seed0"
  step = max(int(p.name) for p in run.iterdir() if p.name.isdigit())
  assert step == UPDATES, f"{run}: newest checkpoint is at update {step}"
  with ocp.StandardCheckpointer() as reader:
    meta = reader.metadata(run / str(step) / "arrays")
    tree = getattr(meta, "item_metadata", meta)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
    arrays = reader.restore(run / str(step) / "arrays", target)
  return {k: np.asarray(v) for k, v in arrays["params"].items()}


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  """The uninterrupted 2-process run (its checkpoints and report), with a shared model cache."""
  root = tmp_path_factory.mktemp("job")
  t0 = time.monotonic()
  done = run_job(job(root / "out", root / "ckpt", root / "cache"), timeout=1500)
  seconds = time.monotonic() - t0
  assert done.codes == [0, 0], done.tail()
  return root, done, seconds


@pytest.mark.slow
def test_job_on_two_processes_matches_one_process(two_process_run):
  root, done, seconds = two_process_run
  print(f"2-process job: {seconds:.0f} s")
  written = {p.name for p in (root / "out").iterdir()}
  assert {"results.json", "results.md", "results.png", "tradeoff.png"} <= written, written
  assert len(list((root / "out").rglob("results.md"))) == 1
  assert any("wrote" in line for line in done.lines[0])
  assert not any("wrote" in line or "|" in line for line in done.lines[1])  # process 0 reports
  t0 = time.monotonic()
  single = one_process(job(root / "out1", root / "ckpt1", root / "cache"))
  print(f"1-process job: {time.monotonic() - t0:.0f} s")
  assert single.returncode == 0, single.stderr[-4000:]
  for preset in PRESETS:
    two, one = losses(root / "ckpt", preset), losses(root / "ckpt1", preset)
    assert len(two) == len(one) == UPDATES
    # The same data and program, the same Gloo collectives (the one process joins) and the same
    # XLA:CPU thread pool size in every process (test_distributed.py): every update's loss agrees.
    np.testing.assert_array_equal(two, one)
    rel = relative_l2(final_params(root / "ckpt", preset), final_params(root / "ckpt1", preset))
    print(f"{preset}: final params relative L2 difference 2 vs 1 process {rel:.2e}")
    assert rel <= 1e-6


def losses(ckpt: Path, preset: str) -> np.ndarray:
  """The loss of every update (forget or retain) from the run's final checkpoint state."""
  state_dir = ckpt / preset / "seed0" / str(UPDATES) / "state"
  for f in state_dir.iterdir():
    try:
      rows = json.loads(f.read_text())["history"]
    except (ValueError, KeyError):
      continue
    return np.asarray([float(r[2] if r[1] == 0 else r[3]) for r in rows], np.float64)
  raise AssertionError(f"no loss history in {state_dir}")


@pytest.mark.slow
def test_killed_process_stops_the_job_and_resume_is_exact(two_process_run, tmp_path):
  root, _, _ = two_process_run
  ckpt, first = tmp_path / "ckpt", tmp_path / "ckpt" / PRESETS[0] / "seed0"
  command = job(tmp_path / "out", ckpt, root / "cache")
  coordinator = f"127.0.0.1:{launch.free_port()}"
  procs = [
    subprocess.Popen(
      command,
      env=launch.process_env(
        job_env(),
        coordinator=coordinator,
        num_processes=2,
        process_id=i,
        devices_per_process=4,
      ),
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  deadline = time.monotonic() + 900
  while not (first / "18" / "commit_success.txt").exists():  # mid-run of the first preset
    assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
    time.sleep(0.2)
  procs[1].kill()
  t_kill = time.monotonic()
  _, err = procs[0].communicate(timeout=300)
  stopped = time.monotonic() - t_kill
  procs[1].wait()
  print(f"process 0 stopped {stopped:.1f} s after process 1 was killed: rc {procs[0].returncode}")
  assert procs[0].returncode != 0
  assert stopped < 30 + 60  # the heartbeat timeout, plus slack for a loaded machine
  assert not (tmp_path / "out" / "results.md").exists()
  # A copy of the checkpoints the 2-process run left, resumed by one process (2 -> 1).
  shutil.copytree(ckpt, tmp_path / "ckpt_single")

  # A longer heartbeat timeout than the killed run's: on a loaded machine a process can be
  # silent for 30 s while it compiles, and that must not pass for a death here.
  # Damage the newest two checkpoints, one in each way: the job must name both, in one line each,
  # and resume from the one before (updates 6 to 18 are replayed, so the end is the same).
  assert sorted(int(p.name) for p in first.iterdir() if p.name.isdigit()) == [6, 12, 18]
  flip_bytes(largest_array_file(first / "18"))
  (first / "12" / "arrays" / "_sharding").write_text('{"not": json')
  slow = ("--resume", "--distributed-timeout", "300")
  resumed = run_job(job(tmp_path / "out", ckpt, root / "cache", *slow), timeout=1500)
  assert resumed.codes == [0, 0], resumed.tail()
  said = [line for line in resumed.lines[0] if "is damaged" in line]  # process 0 reports
  assert len(said) == 2, resumed.tail()
  assert f"{first}/18 is damaged" in said[0] and "does not match the checksum" in said[0]
  assert f"{first}/12 is damaged" in said[1] and "cannot be read" in said[1]
  assert any(f"resumed from {first} at update 6" in line for line in resumed.lines[0])
  for preset in PRESETS:
    want, got = final_params(root / "ckpt", preset), final_params(ckpt, preset)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=f"{preset} {k}")

  # 2 -> 1, from the intact copy: the restore is exact (every array's checksum is verified), and
  # so are the updates after it (see test_job_on_two_processes_matches_one_process).
  single = one_process(
    job(tmp_path / "out_single", tmp_path / "ckpt_single", root / "cache", "--resume")
  )
  assert single.returncode == 0, single.stderr[-4000:]
  assert f"resumed from {tmp_path / 'ckpt_single'}" in single.stdout
  for preset in PRESETS:
    want, got = final_params(root / "ckpt", preset), final_params(tmp_path / "ckpt_single", preset)
    rel = relative_l2(got, want)
    print(f"{preset}: resumed in 1 process vs uninterrupted 2-process run, relative L2 {rel:.2e}")
    assert rel <= 1e-6


@pytest.mark.slow
def test_launcher_runs_the_job_on_a_data_and_fsdp_mesh(two_process_run, tmp_path):
  root, _, _ = two_process_run
  script_path = shutil.which("dualoptim-unlearn")
  head = ["dualoptim-unlearn"] if script_path else [sys.executable, "-m", "dualoptim_jax.unlearn"]
  command = [
    sys.executable, "-m", "dualoptim_jax.launch", "-n", "2", "--",
    *head, "--presets", "dualoptim_plus", "--seeds", "0", "--steps", "2",
    "--mesh", "data=2,fsdp=4", "--out", str(tmp_path / "out"), "--cache-dir", str(root / "cache"),
    *SMALL,
  ]  # fmt: skip
  proc = subprocess.run(command, env=job_env(), capture_output=True, text=True, timeout=1500)
  assert proc.returncode == 0, proc.stdout[-4000:]
  assert (tmp_path / "out" / "results.md").is_file()
  assert "[launch] exit codes [0, 0]" in proc.stdout
