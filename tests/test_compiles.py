"""Tests for dualoptim_jax.unlearn.compiles and .memory: the job's compile counts and allocator."""

import platform

import jax
import jax.numpy as jnp

from dualoptim_jax.unlearn import compiles, memory


def test_a_new_program_is_counted_once_and_a_cached_one_not_at_all():
  start = compiles.snapshot()
  f = jax.jit(lambda x: jnp.sin(x) * 3.0 + 1.0)
  f(jnp.ones(7)).block_until_ready()
  first = compiles.snapshot().since(start)
  f(jnp.ones(7)).block_until_ready()  # jit's in-memory cache: no new program
  second = compiles.snapshot().since(start)
  assert first.programs >= 1 and first.compile_s > 0
  assert second == first
  assert first.xla_compiles == first.programs - first.cache_hits
  assert set(first.as_dict()) == {"programs", "xla_compiles", "cache_hits", "compile_s", "trace_s"}


def test_heap_settings_take_on_glibc():
  if platform.libc_ver()[0] != "glibc":
    assert memory.limit_heap_growth() is False
    return
  assert memory.limit_heap_growth() is True
  memory.release_freed_memory()  # returns whether anything was freed: either is fine
