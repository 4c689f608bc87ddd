"""How a process decides to join a multi-process job (dualoptim_jax.unlearn.distributed)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from multiprocess import job_env, run_job

from dualoptim_jax import launch
from dualoptim_jax.unlearn import distributed as dist


def test_flags_win_and_must_come_together():
  setup = dist.resolve("10.0.0.1:1234", 4, 3, environ={})
  assert (setup.source, setup.coordinator, setup.num_processes, setup.process_id) == (
    "flags",
    "10.0.0.1:1234",
    4,
    3,
  )
  assert setup.distributed
  with pytest.raises(ValueError, match=r"missing \['--process-id'\]"):
    dist.resolve("10.0.0.1:1234", 4, None, environ={})


@pytest.mark.parametrize(
  "args, match",
  [
    (("10.0.0.1", 2, 0), "HOST:PORT"),
    (("10.0.0.1:99999", 2, 0), "HOST:PORT"),
    (("h:1", 0, 0), "num-processes"),
    (("h:1", 2, 2), r"process-id must be in \[0, 2\)"),
  ],
)
def test_bad_flags_are_named(args, match):
  with pytest.raises(ValueError, match=match):
    dist.resolve(*args, environ={})


def test_launcher_environment():
  env = {
    launch.ENV_COORDINATOR: "127.0.0.1:5555",
    launch.ENV_NUM_PROCESSES: "2",
    launch.ENV_PROCESS_ID: "1",
  }
  setup = dist.resolve(environ=env)
  assert (setup.source, setup.coordinator, setup.num_processes, setup.process_id) == (
    "launcher",
    "127.0.0.1:5555",
    2,
    1,
  )


def test_no_flags_no_cluster_is_one_process(monkeypatch):
  for var in ("SLURM_JOB_ID", "SLURM_NTASKS", "OMPI_MCA_orte_hnp_uri", "OMPI_MCA_ess_base_jobid"):
    monkeypatch.delenv(var, raising=False)
  setup = dist.resolve(environ={})
  assert setup.source == "single process" and not setup.distributed
  assert dist.initialize(timeout=5) == setup  # joins nothing, touches no backend state


def test_slurm_with_several_tasks_is_detected(monkeypatch):
  slurm = {
    "SLURM_JOB_ID": "7",
    "SLURM_STEP_NODELIST": "node[1-2]",
    "SLURM_NTASKS": "2",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
  }
  for k, v in slurm.items():
    monkeypatch.setenv(k, v)
  assert dist.detected_cluster() == "SlurmCluster"
  monkeypatch.setenv("SLURM_NTASKS", "1")  # one task: a single process, not a cluster
  assert dist.detected_cluster() is None


def test_cpu_thread_pool_size_counts_the_jobs_devices():
  flags = {"XLA_FLAGS": "--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=4"}
  assert dist.cpu_thread_pool_size(2, flags, cpus=2) == 8
  assert dist.cpu_thread_pool_size(1, {"XLA_FLAGS": flags["XLA_FLAGS"][:-1] + "8"}, cpus=2) == 8
  assert dist.cpu_thread_pool_size(2, flags, cpus=64) == 64  # never fewer than XLA's default
  assert dist.cpu_thread_pool_size(3, {}, cpus=1) == 3  # one device per process by default


def test_timeout_is_validated():
  with pytest.raises(ValueError, match="timeout"):
    dist.initialize(timeout=0)


ALL_REDUCE = """
from dualoptim_jax.unlearn import distributed
distributed.initialize(timeout=60)
import hashlib, jax, jax.numpy as jnp, numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
mesh = Mesh(np.array(jax.devices()), ("x",))
rng = np.random.default_rng(0)
x = (rng.standard_normal((8, 4096)) * np.exp(5 * rng.standard_normal((8, 4096)))).astype(np.float32)
a = jax.make_array_from_callback(x.shape, NamedSharding(mesh, P("x")), lambda i: x[i])
total = jax.jit(lambda a: a.sum(0), out_shardings=NamedSharding(mesh, P()))(a)
total = np.asarray(multihost_utils.process_allgather(total, tiled=True))
exact = x.astype(np.float64).sum(0)
print("sum", hashlib.sha256(total.tobytes()).hexdigest()[:16], int(np.sum(total != exact.astype(np.float32))))
"""


def test_a_joined_single_process_sums_over_devices_bitwise_like_two_processes():
  """Gloo reduces in the same order whichever process holds the devices, so a one-process job
  that joins (launch -n 1) sums bitwise like a two-process job, where the plain single process's
  in-process all-reduce does not (the reason the job's results depend on the process count)."""
  outputs = {}
  for n, devices in ((1, 8), (2, 4)):
    job = run_job([sys.executable, "-c", ALL_REDUCE], num_processes=n, devices_per_process=devices)
    assert job.codes == [0] * n, job.tail()
    outputs[n] = [line for line in job.lines[0] if line.startswith("sum ")][-1]
  plain_env = {**job_env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  plain = subprocess.run(
    [sys.executable, "-c", ALL_REDUCE], env=plain_env, capture_output=True, text=True, timeout=120
  )
  assert plain.returncode == 0, plain.stderr[-3000:]
  in_process = [line for line in plain.stdout.splitlines() if line.startswith("sum ")][-1]
  assert outputs[1] == outputs[2], outputs
  # The data is chosen so that summation order shows (float32 sums that differ from the exact
  # one); otherwise the equality above would hold trivially.
  assert int(outputs[2].split()[2]) > 0
  print(f"Gloo {outputs[2]}; in-process all-reduce {in_process}")


TRAINER_STEP = """
import os, sys
from dualoptim_jax.unlearn import distributed
distributed.initialize(timeout=60)
import dataclasses, hashlib, jax, numpy as np, optax
from flax import nnx
from jax.experimental import multihost_utils
from dualoptim_jax.models.llama import Llama, LlamaConfig
from dualoptim_jax.unlearn import checkpoint, losses, placement, trainer
model = Llama(LlamaConfig.tiny(1024), rngs=nnx.Rngs(0))
ids = np.random.default_rng(0).integers(0, 1024, (8, 128)).astype(np.int32)
ones = np.ones(ids.shape, np.float32)
batch = {"input_ids": ids, "answer_mask": ones, "idk_input_ids": ids[::-1].copy(), "idk_answer_mask": ones}
runner = trainer.Unlearner(model, losses.make_objective("GA+GD", 1.0, 1.0, 0.1), optax.sgd(1e-2),
                           mesh=placement.make_mesh("data=1,fsdp=8"))
runner.step(iter(lambda: batch, None), iter(lambda: batch, None))
for name, x in checkpoint.named_leaves(runner.params).items():
  x = np.asarray(multihost_utils.process_allgather(x, tiled=True))
  print("param", name, hashlib.sha256(x.tobytes()).hexdigest()[:16])
"""


def _trainer_step(num_processes: int, devices: int, **env: str) -> dict[str, str]:
  job = run_job(
    [sys.executable, "-c", TRAINER_STEP],
    num_processes=num_processes,
    devices_per_process=devices,
    env={**job_env(), **env},
  )
  assert job.codes == [0] * num_processes, job.tail()
  return dict(line.split()[1:] for line in job.lines[0] if line.startswith("param "))


def test_a_trainer_step_is_bitwise_the_same_on_one_or_two_processes():
  """One FSDP update of the tiny Llama (8 rows of 128 tokens) as 1 joined process x 8 devices
  and as 2 x 4: every parameter bitwise equal, because every process's XLA:CPU thread pool is
  sized by the job's devices (``PJRT_NPROC``, :func:`distributed.cpu_thread_pool_size`). With
  the 2 processes held to 4 threads each instead, the output projection's gradient (here the
  tied embedding) is summed in another order and differs: what the sizing prevents."""
  one, two = _trainer_step(1, 8), _trainer_step(2, 4)
  assert len(one) > 10 and one == two
  small_pools = _trainer_step(2, 4, PJRT_NPROC="4")
  assert "embed_tokens.embedding" in [k for k in one if one[k] != small_pools[k]]
