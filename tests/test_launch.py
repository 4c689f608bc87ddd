"""The local multi-process launcher (dualoptim_jax.launch)."""

from __future__ import annotations

import io
import sys
import time

import pytest
from multiprocess import job_env, run_job

from dualoptim_jax import launch


def test_worst_exit_code():
  assert launch.worst_exit_code([0, 0]) == 0
  assert launch.worst_exit_code([0, 3, 5]) == 3
  assert launch.worst_exit_code([-9, 0]) == 128 + 9  # killed by SIGKILL, as a shell reports it


def test_process_env_sets_identity_and_replaces_device_count():
  base = {"XLA_FLAGS": "--xla_foo=1 --xla_force_host_platform_device_count=8", "PATH": "/bin"}
  env = launch.process_env(
    base, coordinator="127.0.0.1:1234", num_processes=2, process_id=1, devices_per_process=4
  )
  assert env["XLA_FLAGS"].split() == ["--xla_foo=1", "--xla_force_host_platform_device_count=4"]
  assert env[launch.ENV_COORDINATOR] == "127.0.0.1:1234"
  assert (env[launch.ENV_NUM_PROCESSES], env[launch.ENV_PROCESS_ID]) == ("2", "1")
  assert env["JAX_PLATFORMS"] == "cpu" and env["PATH"] == "/bin"
  assert "XLA_FLAGS" in base and base["XLA_FLAGS"].endswith("=8")  # the caller's dict is untouched


def test_launch_prefixes_output_and_returns_every_code():
  code = (
    "import os, sys; i = int(os.environ['DUALOPTIM_PROCESS_ID']); "
    "print('hello', i, os.environ['DUALOPTIM_NUM_PROCESSES'], os.environ['XLA_FLAGS']); "
    "sys.exit(i)"
  )
  job = run_job(["python", "-c", code], num_processes=3, devices_per_process=2, timeout=60)
  assert job.codes == [0, 1, 2]
  assert launch.worst_exit_code(job.codes) == 1
  for i in range(3):
    assert job.lines[i] == [f"hello {i} 3 --xla_force_host_platform_device_count=2"]


def test_a_failed_process_stops_the_others_after_the_grace_period():
  code = (
    "import os, sys, time; i = int(os.environ['DUALOPTIM_PROCESS_ID']); "
    "time.sleep(0 if i == 0 else 120); sys.exit(3)"
  )
  t0 = time.monotonic()
  job = run_job(["python", "-c", code], num_processes=2, timeout=100, grace=0.5)
  assert time.monotonic() - t0 < 30
  assert job.codes[0] == 3 and job.codes[1] != 0  # terminated, not left running
  assert launch.worst_exit_code(job.codes) == 3
  assert "process 0 failed; terminating process 1" in job.text


def test_timeout_terminates_every_process():
  job = run_job(["python", "-c", "import time; time.sleep(120)"], timeout=1, grace=60)
  assert all(c != 0 for c in job.codes) and "launch timeout" in job.text


def test_main_runs_the_command_and_reports_the_worst_code(capsys, monkeypatch):
  for k, v in job_env().items():
    monkeypatch.setenv(k, v)
  code = "import os, sys; sys.exit(int(os.environ['DUALOPTIM_PROCESS_ID']) * 4)"
  assert launch.main(["-n", "2", "--", "python", "-c", code]) == 4
  assert "job exit code 4" in capsys.readouterr().out
  with pytest.raises(SystemExit):
    launch.main(["-n", "2"])  # no command
  assert launch.main(["-n", "1", "--", "no-such-program-dualoptim"]) == 127


def test_launched_processes_join_one_jax_job():
  code = (
    "from dualoptim_jax.unlearn import distributed; s = distributed.initialize(timeout=60); "
    "import jax; print('job', s.source, jax.process_index(), jax.process_count(), "
    "jax.local_device_count(), jax.device_count())"
  )
  job = run_job([sys.executable, "-c", code], timeout=120)
  assert job.codes == [0, 0], job.tail()
  for i in range(2):
    assert f"job launcher {i} 2 4 8" in job.lines[i], job.lines[i]


def test_launch_rejects_bad_arguments():
  with pytest.raises(ValueError, match="num_processes"):
    launch.launch(["true"], 0)
  with pytest.raises(FileNotFoundError):
    launch.launch(["no-such-program-dualoptim"], 1, out=io.StringIO())
