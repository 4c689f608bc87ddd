import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dualoptim_jax as dj


@pytest.mark.parametrize("ff,fr", [(1, 5), (2, 3), (1, 1)])
def test_alternating_python_and_traced_agree(ff, fr):
  sched = dj.alternating(ff, fr)
  expected = [0] * ff + [1] * fr
  python = [sched(n) for n in range(3 * (ff + fr))]
  assert python == expected * 3
  assert all(isinstance(k, int) for k in python)
  traced = jax.jit(jax.vmap(sched))(jnp.arange(3 * (ff + fr)))
  assert traced.dtype == jnp.int32
  np.testing.assert_array_equal(traced, python)


@pytest.mark.parametrize("args", [(0, 5), (1, 0), (1.5, 2), (True, 2), (-1, 1)])
def test_alternating_bad_args(args):
  with pytest.raises(ValueError, match="must be an int >= 1"):
    dj.alternating(*args)


def test_alternating_negative_step():
  with pytest.raises(ValueError, match="step must be >= 0"):
    dj.alternating(1, 5)(-1)
