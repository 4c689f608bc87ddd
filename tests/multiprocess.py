"""Runs a command as a local multi-process JAX job (:mod:`dualoptim_jax.launch`) for the tests.

Each process gets ``devices_per_process`` virtual CPU devices; its output lines are collected
per process (the launcher prefixes them with ``[i]``).
"""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

from dualoptim_jax import launch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def job_env() -> dict[str, str]:
  """The base environment: this checkout's package and the tests' helpers importable, quiet XLA."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(HERE), env.get("PYTHONPATH", "")])
  env["TF_CPP_MIN_LOG_LEVEL"] = "2"
  env["JAX_PLATFORMS"] = "cpu"
  return env


class Job:
  """The exit codes and per-process output lines of a launched job."""

  def __init__(self, codes: list[int], text: str):
    self.codes = codes
    self.text = text
    self.lines: dict[int, list[str]] = {i: [] for i in range(len(codes))}
    for line in text.splitlines():
      if line.startswith("[") and "] " in line and line[1 : line.index("]")].isdigit():
        i = int(line[1 : line.index("]")])
        self.lines[i].append(line[line.index("] ") + 2 :])

  def json(self, process: int = 0) -> dict:
    """The last JSON line that ``process`` printed."""
    for line in reversed(self.lines[process]):
      if line.startswith("{"):
        return json.loads(line)
    raise AssertionError(f"process {process} printed no JSON:\n{self.tail()}")

  def tail(self, chars: int = 6000) -> str:
    return self.text[-chars:]


def run_job(
  command: list[str],
  *,
  num_processes: int = 2,
  devices_per_process: int = 4,
  timeout: float = 600,
  grace: float = 30,
  env: dict[str, str] | None = None,
) -> Job:
  """Launches ``command`` (``python`` is this interpreter) and waits for every process; ``env``
  defaults to :func:`job_env`."""
  out = io.StringIO()
  codes = launch.launch(
    command,
    num_processes,
    devices_per_process=devices_per_process,
    env=job_env() if env is None else env,
    out=out,
    timeout=timeout,
    grace=grace,
  )
  return Job(codes, out.getvalue())


def script(name: str, *args: str) -> list[str]:
  """``python tests/<name> args...``."""
  return [sys.executable, str(HERE / name), *args]
