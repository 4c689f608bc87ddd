"""How a process decides to join a multi-process job (dualoptim_jax.unlearn.distributed)."""

from __future__ import annotations

import pytest

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


def test_timeout_is_validated():
  with pytest.raises(ValueError, match="timeout"):
    dist.initialize(timeout=0)
