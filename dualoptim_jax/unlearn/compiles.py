"""How many programs a job compiled, and how long that took (``results.json``'s ``compiles``).

JAX reports every compilation through :mod:`jax.monitoring`: tracing to a jaxpr, lowering to
StableHLO and the backend compilation, whose duration includes reading the executable from the
persistent compilation cache when it is there (a cache hit). One listener per event, registered
once per process, adds them up; :func:`snapshot` reads the totals and :meth:`CompileStats.since`
gives a phase's share.

* ``programs``: executables the backend was asked for (one per distinct program and input
  shape that ``jax.jit``'s in-memory cache did not already hold);
* ``cache_hits``: of those, the ones read from the persistent cache (``--cache-dir``);
* ``xla_compiles``: ``programs - cache_hits``, the ones XLA compiled;
* ``compile_s``: backend time (compiling or reading the cache); ``trace_s``: tracing and lowering.
"""

from __future__ import annotations

import threading
from typing import Any, NamedTuple

from jax import monitoring

__all__ = ["CompileStats", "snapshot"]

_BACKEND = "/jax/core/compile/backend_compile_duration"
_TRACE = (
  "/jax/core/compile/jaxpr_trace_duration",
  "/jax/core/compile/jaxpr_to_mlir_module_duration",
)
_CACHE_HIT = "/jax/compilation_cache/cache_hits"


class CompileStats(NamedTuple):
  """Compilation totals since the process started (or, from :meth:`since`, over a phase)."""

  programs: int
  cache_hits: int
  compile_s: float
  trace_s: float

  @property
  def xla_compiles(self) -> int:
    return self.programs - self.cache_hits

  def since(self, start: CompileStats) -> CompileStats:
    return CompileStats(
      self.programs - start.programs,
      self.cache_hits - start.cache_hits,
      self.compile_s - start.compile_s,
      self.trace_s - start.trace_s,
    )

  def as_dict(self) -> dict[str, Any]:
    return dict(
      programs=self.programs,
      xla_compiles=self.xla_compiles,
      cache_hits=self.cache_hits,
      compile_s=round(self.compile_s, 2),
      trace_s=round(self.trace_s, 2),
    )


_lock = threading.Lock()
_totals: dict[str, Any] = {"programs": 0, "cache_hits": 0, "compile_s": 0.0, "trace_s": 0.0}
_registered = False


def _on_duration(event: str, duration_secs: float, **kwargs: str | int) -> None:
  del kwargs
  with _lock:
    if event == _BACKEND:
      _totals["programs"] += 1
      _totals["compile_s"] += duration_secs
    elif event in _TRACE:
      _totals["trace_s"] += duration_secs


def _on_event(event: str, **kwargs: str | int) -> None:
  del kwargs
  if event == _CACHE_HIT:
    with _lock:
      _totals["cache_hits"] += 1


def snapshot() -> CompileStats:
  """The totals so far; the first call starts counting (compilations before it are not seen)."""
  global _registered
  with _lock:
    if not _registered:
      monitoring.register_event_duration_secs_listener(_on_duration)
      monitoring.register_event_listener(_on_event)
      _registered = True
    return CompileStats(**_totals)
