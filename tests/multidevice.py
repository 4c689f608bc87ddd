"""Runs a check script in a process of its own with N virtual CPU devices.

The pytest process has initialised JAX with one CPU device, and a backend cannot be re-created
with more, so multi-device checks run in a subprocess started with
``XLA_FLAGS=--xla_force_host_platform_device_count=N``. The script prints one JSON document as
its last stdout line; the tests assert on it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def device_env(num_devices: int) -> dict[str, str]:
  """The environment of a CPU-only JAX process with ``num_devices`` devices."""
  env = dict(os.environ)
  flags = [
    f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f
  ]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={num_devices}"])
  env["JAX_PLATFORMS"] = "cpu"
  env["TF_CPP_MIN_LOG_LEVEL"] = "2"  # keep the compiler's performance warnings off stderr
  env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
  return env


def run_json(script: str, *args: str, num_devices: int = 8, timeout: float = 300) -> dict:
  """Runs ``tests/<script>`` with ``args`` on ``num_devices`` devices; returns its JSON output."""
  proc = subprocess.run(
    [sys.executable, str(HERE / script), *args],
    env=device_env(num_devices),
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  if proc.returncode != 0:
    raise AssertionError(
      f"{script} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
      f"{proc.stderr[-8000:]}"
    )
  return json.loads(proc.stdout.strip().splitlines()[-1])


def toy_unlearning_arrays(seed: int, n: int, vocab: int, length: int) -> dict[str, np.ndarray]:
  """``n`` random forget/retain examples in the layout of ``tokenize_unlearning_set``."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, vocab, size=(n, length)).astype(np.int32)
  mask = np.zeros((n, length), np.float32)
  mask[:, length // 2 :] = 1
  token_mask = np.ones((n, length), np.float32)
  token_mask[:, 0] = 0
  idk = rng.integers(1, vocab, size=(n, length)).astype(np.int32)
  return {
    "input_ids": ids,
    "answer_mask": mask,
    "token_mask": token_mask,
    "idk_input_ids": idk,
    "idk_answer_mask": mask,
    "idk_token_mask": token_mask,
  }
