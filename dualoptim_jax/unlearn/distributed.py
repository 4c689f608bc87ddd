"""Joining JAX's multi-process runtime: flags, the local launcher, a cluster, or one process.

In a multi-process JAX job the same program runs in every process and ``jax.devices()`` lists the
devices of all of them, so a mesh built from it (:func:`dualoptim_jax.sharding.make_mesh`) spans
every host. Each process must call :func:`jax.distributed.initialize` before any other JAX call;
:func:`initialize` decides how, in this order:

1. explicit arguments (``dualoptim-unlearn --coordinator HOST:PORT --num-processes N
   --process-id I``);
2. the environment set by the local launcher (:mod:`dualoptim_jax.launch`);
3. a cluster JAX can detect by itself (SLURM with more than one task, a Cloud TPU VM / pod slice,
   Open MPI): ``jax.distributed.initialize()`` with no arguments;
4. otherwise nothing: a single process, as before.

``timeout`` bounds every wait on the other processes: joining (``initialization_timeout``), and
the heartbeat after which the coordination service declares a silent process dead
(``heartbeat_timeout_seconds``). When a process dies, the others stop within about ``timeout``
seconds (the runtime terminates them with "the JAX distributed service detected fatal errors";
a collective with the dead peer fails at once with a ``JaxRuntimeError``) instead of hanging.

On CPU a run is made bitwise independent of how its devices are spread over processes:

* The cross-process collectives are Gloo's (``jax_cpu_collectives_implementation``). A job of
  *one* process that is given a coordinator (``--num-processes 1``, ``launch -n 1``) joins too, and
  so uses Gloo's collectives as well: Gloo reduces over the devices in the same order whichever
  process holds them. XLA's in-process collectives, which a plain single process uses, sum in
  another order.
* XLA:CPU runs each device's kernels on an intra-op thread pool of ``max(PJRT_NPROC or the usable
  cores, local devices)`` threads, and its dot and reduction kernels split their work by the
  pool's size: 4 devices in each of 2 processes and 8 devices in one process sum in different
  orders. :func:`initialize` sets ``PJRT_NPROC`` (unless it is set) to
  :func:`cpu_thread_pool_size`, the larger of the usable cores and the job's devices, so every
  layout of the same devices gets the same pool.

Both differences are in the last bits, but training amplifies them (DualOptim+ most of all);
with both removed, the 2-process and the 1-process job end bitwise equal
(``tests/test_multiprocess.py``, docs/scale.md).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import jax
import numpy as np

from dualoptim_jax.launch import (
  DEVICE_COUNT_FLAG,
  ENV_COORDINATOR,
  ENV_NUM_PROCESSES,
  ENV_PROCESS_ID,
)

__all__ = [
  "DEFAULT_TIMEOUT",
  "ProcessSetup",
  "detected_cluster",
  "resolve",
  "cpu_thread_pool_size",
  "initialize",
  "is_primary",
  "all_true",
]

DEFAULT_TIMEOUT = 120  # seconds


@dataclasses.dataclass(frozen=True)
class ProcessSetup:
  """How this process joins the job (``coordinator`` etc. None where JAX detects them)."""

  source: str  # "flags", "launcher", "cluster <name>" or "single process"
  coordinator: str | None = None
  num_processes: int | None = None
  process_id: int | None = None

  @property
  def distributed(self) -> bool:
    return self.source != "single process"


def detected_cluster() -> str | None:
  """The name of the cluster environment JAX's auto-detection would use, or None.

  Uses JAX's own detectors (``jax._src.clusters``; private, so any failure means "none"). A SLURM
  allocation of one task is a single process, not a cluster.
  """
  if os.environ.get("SLURM_NTASKS", "1") == "1":
    skip = {"SlurmCluster"}
  else:
    skip = set()
  try:
    from jax._src.clusters import ClusterEnv  # noqa: PLC0415 (private: keep the import local)

    for env in ClusterEnv._cluster_types:
      if env.opt_in_only_method or env.__name__ in skip:
        continue
      if env.is_env_present():
        return env.__name__
  except Exception:  # noqa: BLE001 (a detector that fails cannot be used)
    return None
  return None


def _check_address(coordinator: str) -> None:
  host, sep, port = coordinator.rpartition(":")
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f"--coordinator must be HOST:PORT (e.g. 10.0.0.1:1234), got {coordinator!r}")


def resolve(
  coordinator: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  *,
  environ: Mapping[str, str] | None = None,
) -> ProcessSetup:
  """Decides how to join (see the module docstring) without joining.

  Raises:
    ValueError: naming what is missing or out of range when only some of the three are given.
  """
  env = os.environ if environ is None else environ
  given = {
    "--coordinator": coordinator,
    "--num-processes": num_processes,
    "--process-id": process_id,
  }
  if any(v is not None for v in given.values()):
    missing = [k for k, v in given.items() if v is None]
    if missing:
      raise ValueError(f"a multi-process run needs all of {', '.join(given)}; missing {missing}")
    source = "flags"
  elif env.get(ENV_COORDINATOR):
    coordinator = env[ENV_COORDINATOR]
    num_processes, process_id = int(env[ENV_NUM_PROCESSES]), int(env[ENV_PROCESS_ID])
    source = "launcher"
  else:
    cluster = detected_cluster()
    return ProcessSetup(f"cluster {cluster}" if cluster else "single process")
  assert coordinator is not None and num_processes is not None and process_id is not None
  _check_address(coordinator)
  if num_processes < 1:
    raise ValueError(f"--num-processes must be >= 1, got {num_processes}")
  if not 0 <= process_id < num_processes:
    raise ValueError(f"--process-id must be in [0, {num_processes}), got {process_id}")
  return ProcessSetup(source, coordinator, num_processes, process_id)


def cpu_thread_pool_size(
  num_processes: int, environ: Mapping[str, str] | None = None, cpus: int | None = None
) -> int:
  """The XLA:CPU intra-op pool size that every process of a job of ``num_processes`` should use:
  the larger of the usable cores (``cpus``, default this machine's) and the job's CPU devices
  (``num_processes`` times the ``--xla_force_host_platform_device_count`` of ``XLA_FLAGS``).

  The same for every layout of the same devices, and never fewer threads than XLA's default."""
  env = os.environ if environ is None else environ
  per_process = 1
  for flag in env.get("XLA_FLAGS", "").split():
    if flag.startswith(DEVICE_COUNT_FLAG + "="):
      per_process = int(flag.split("=", 1)[1])
  if cpus is None:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return max(cpus or 1, num_processes * per_process)


def initialize(
  coordinator: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  *,
  timeout: int = DEFAULT_TIMEOUT,
) -> ProcessSetup:
  """Joins the job :func:`resolve` finds (or stays a single process); call before any JAX work.

  Args:
    coordinator: ``HOST:PORT`` of process 0's coordination service.
    num_processes: processes in the job.
    process_id: this process's index, ``0 <= process_id < num_processes``.
    timeout: seconds to wait for the others to join, and the heartbeat timeout after which a
      silent process is declared dead and the job stops.

  Returns:
    The setup used. Calling it again after a successful join is a no-op.
  """
  if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout < 1:
    raise ValueError(f"timeout must be an int >= 1 (seconds), got {timeout!r}")
  setup = resolve(coordinator, num_processes, process_id)
  if not setup.distributed or jax.distributed.is_initialized():
    return setup
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if setup.num_processes is not None:  # (a cluster JAX detects keeps XLA's own pool size)
    # Read when the CPU backend starts, which is after this.
    os.environ.setdefault("PJRT_NPROC", str(cpu_thread_pool_size(setup.num_processes)))
  jax.distributed.initialize(
    setup.coordinator,
    setup.num_processes,
    setup.process_id,
    initialization_timeout=timeout,
    heartbeat_timeout_seconds=timeout,
    shutdown_timeout_seconds=timeout,
  )
  return setup


def is_primary() -> bool:
  """True in the process that writes reports and prints progress (process 0)."""
  return jax.process_index() == 0


def all_true(flag: bool) -> bool:
  """Whether ``flag`` holds in every process (a collective; ``flag`` itself in one process).

  For decisions that must agree across processes although each process sees its own disk
  (e.g. a cache file written on host 0 only): otherwise one process would train while another
  loads, and the next collective would wait forever.
  """
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils  # noqa: PLC0415

  return bool(np.all(multihost_utils.process_allgather(np.asarray(bool(flag)))))
