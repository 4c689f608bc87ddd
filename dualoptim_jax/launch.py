"""Starts one command as N local processes of one JAX multi-process job.

``python -m dualoptim_jax.launch -n 2 -- dualoptim-unlearn --mesh data=2,fsdp=4 ...`` runs the
command twice on this machine, as processes 0 and 1 of a :mod:`jax.distributed` job: it picks a
free loopback port for the coordinator, gives each process ``--devices-per-process`` virtual CPU
devices (``XLA_FLAGS=--xla_force_host_platform_device_count``), tells each process who it is
through the environment (:data:`ENV_COORDINATOR`, :data:`ENV_NUM_PROCESSES`,
:data:`ENV_PROCESS_ID`, read by :func:`dualoptim_jax.unlearn.distributed.initialize`), prefixes
every output line with ``[i]`` and returns the worst exit code.

It is the local stand-in for what a cluster's scheduler does (``srun``, a TPU pod's
``--worker=all``; see ``docs/scale.md``), for testing a multi-process job on one machine. If a
process fails, the others get ``--grace`` seconds to stop by themselves (the JAX runtime stops
them when a peer dies) and are then terminated, so the launcher never hangs on a dead job.

The command runs as given (found on ``PATH``); a leading ``python`` / ``python3`` is replaced by
this interpreter, so ``-- python -m dualoptim_jax.unlearn ...`` uses the same environment.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO

__all__ = [
  "DEVICE_COUNT_FLAG",
  "ENV_COORDINATOR",
  "ENV_NUM_PROCESSES",
  "ENV_PROCESS_ID",
  "free_port",
  "process_env",
  "worst_exit_code",
  "launch",
  "main",
]

ENV_COORDINATOR = "DUALOPTIM_COORDINATOR"
ENV_NUM_PROCESSES = "DUALOPTIM_NUM_PROCESSES"
ENV_PROCESS_ID = "DUALOPTIM_PROCESS_ID"
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def free_port() -> int:
  """A TCP port on 127.0.0.1 that is free now (the OS picks it)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(
  base: dict[str, str],
  *,
  coordinator: str,
  num_processes: int,
  process_id: int,
  devices_per_process: int,
) -> dict[str, str]:
  """The environment of local process ``process_id``: its identity and its CPU devices.

  ``XLA_FLAGS`` keeps every flag of ``base`` except an earlier device count; ``JAX_PLATFORMS``
  defaults to ``cpu`` (virtual devices exist only there).
  """
  env = dict(base)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT_FLAG)]
  env["XLA_FLAGS"] = " ".join([*flags, f"{DEVICE_COUNT_FLAG}={devices_per_process}"])
  env.setdefault("JAX_PLATFORMS", "cpu")
  env["PYTHONUNBUFFERED"] = "1"  # lines reach the prefixer as they are printed
  env[ENV_COORDINATOR] = coordinator
  env[ENV_NUM_PROCESSES] = str(num_processes)
  env[ENV_PROCESS_ID] = str(process_id)
  return env


def worst_exit_code(codes: Sequence[int]) -> int:
  """The exit code of the job: 0 if all are 0, else the first failure's, as a shell reports it.

  A process killed by signal ``s`` (``returncode == -s``) counts as ``128 + s``.
  """
  failures = [128 - c if c < 0 else c for c in codes if c != 0]
  return failures[0] if failures else 0


def _pump(stream: IO[str], prefix: str, out: IO[str], lock: threading.Lock) -> None:
  for line in stream:
    # A progress bar redraws with \r: keep only the latest state of the line.
    text = line.rstrip("\n").split("\r")[-1]
    with lock:
      out.write(f"{prefix}{text}\n")
      out.flush()


def _resolve(command: Sequence[str]) -> list[str]:
  cmd = list(command)
  if cmd and cmd[0] in ("python", "python3"):
    cmd[0] = sys.executable
  return cmd


def launch(
  command: Sequence[str],
  num_processes: int,
  *,
  devices_per_process: int = 4,
  port: int | None = None,
  grace: float = 30.0,
  timeout: float | None = None,
  env: dict[str, str] | None = None,
  out: IO[str] | None = None,
) -> list[int]:
  """Runs ``command`` as ``num_processes`` local processes of one JAX job; returns their exit codes.

  Args:
    command: the program and its arguments.
    num_processes: how many processes, >= 1.
    devices_per_process: virtual CPU devices per process.
    port: the coordinator's port on 127.0.0.1 (default: a free one).
    grace: seconds the other processes get to stop after one fails, before they are terminated.
    timeout: seconds after which every process still running is terminated (None: no limit).
    env: the base environment (default ``os.environ``).
    out: where the prefixed lines go (default ``sys.stdout``).
  """
  if num_processes < 1:
    raise ValueError(f"num_processes must be >= 1, got {num_processes}")
  if devices_per_process < 1:
    raise ValueError(f"devices_per_process must be >= 1, got {devices_per_process}")
  if not command:
    raise ValueError("no command to launch")
  stream: IO[str] = sys.stdout if out is None else out
  cmd = _resolve(command)
  if shutil.which(cmd[0]) is None:
    raise FileNotFoundError(f"{cmd[0]!r} is not an executable on PATH")
  coordinator = f"127.0.0.1:{port or free_port()}"
  lock = threading.Lock()
  procs, pumps = [], []
  for i in range(num_processes):
    proc = subprocess.Popen(
      cmd,
      env=process_env(
        dict(os.environ if env is None else env),
        coordinator=coordinator,
        num_processes=num_processes,
        process_id=i,
        devices_per_process=devices_per_process,
      ),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      errors="replace",
    )
    procs.append(proc)
    assert proc.stdout is not None
    pump = threading.Thread(target=_pump, args=(proc.stdout, f"[{i}] ", stream, lock), daemon=True)
    pump.start()
    pumps.append(pump)
  stop_at = None if timeout is None else time.monotonic() + timeout
  try:
    _wait(procs, grace, stop_at, stream, lock)
  except KeyboardInterrupt:
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGINT)
    _wait(procs, grace, None, stream, lock)
  for pump in pumps:
    pump.join(timeout=5)
  return [p.returncode for p in procs]


def _wait(
  procs: list[subprocess.Popen],
  grace: float,
  stop_at: float | None,
  out: IO[str],
  lock: threading.Lock,
) -> None:
  """Waits for every process; once one fails (or at ``stop_at``) the rest get ``grace`` seconds
  (none at ``stop_at``), then SIGTERM, then SIGKILL."""
  deadline, why = None, ""
  while any(p.poll() is None for p in procs):
    failed = [i for i, p in enumerate(procs) if p.returncode not in (None, 0)]
    if failed and deadline is None:
      deadline, why = time.monotonic() + grace, f"process {failed[0]} failed"
    if stop_at is not None and time.monotonic() > stop_at:
      deadline, why = time.monotonic(), "the launch timeout passed"
    if deadline is not None and time.monotonic() >= deadline:
      for i, p in enumerate(procs):
        if p.poll() is None:
          with lock:
            out.write(f"[launch] {why}; terminating process {i}\n")
          p.terminate()
      break
    time.sleep(0.1)
  for p in procs:
    try:
      p.wait(timeout=10)
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--" in argv:
    split = argv.index("--")
    own, command = argv[:split], argv[split + 1 :]
  else:
    own, command = argv, []
  p = argparse.ArgumentParser(
    prog="python -m dualoptim_jax.launch",
    description="Run COMMAND as N local processes of one JAX multi-process job (CPU devices).",
    usage="%(prog)s [-n N] [-d D] [--port P] [--grace S] -- COMMAND [ARGS ...]",
  )
  p.add_argument("-n", "--num-processes", type=int, default=2)
  p.add_argument(
    "-d",
    "--devices-per-process",
    type=int,
    default=4,
    help="virtual CPU devices per process (default 4: two processes make an 8-device mesh)",
  )
  p.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
  p.add_argument(
    "--grace",
    type=float,
    default=30.0,
    help="seconds the other processes get after one fails, before they are terminated",
  )
  p.add_argument(
    "--timeout", type=float, default=None, help="terminate every process after this many seconds"
  )
  a = p.parse_args(own)
  if not command:
    p.error("give the command after --, e.g. -- dualoptim-unlearn --mesh data=2,fsdp=4")
  if a.num_processes < 1 or a.devices_per_process < 1:
    p.error("-n and -d must be >= 1")
  try:
    codes = launch(
      command,
      a.num_processes,
      devices_per_process=a.devices_per_process,
      port=a.port,
      grace=a.grace,
      timeout=a.timeout,
    )
  except FileNotFoundError as e:
    print(f"launch: cannot start {command[0]!r}: {e}", file=sys.stderr)
    return 127
  worst = worst_exit_code(codes)
  print(f"[launch] exit codes {codes}; job exit code {worst}", flush=True)
  return worst


if __name__ == "__main__":
  sys.exit(main())
