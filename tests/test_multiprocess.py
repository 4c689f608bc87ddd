"""Two processes x 4 CPU devices joined by jax.distributed, against one process with 8.

The processes are started by :mod:`dualoptim_jax.launch` (free loopback port, Gloo collectives).
"""

from __future__ import annotations

import numpy as np
import pytest
from multidevice import run_json
from multiprocess import run_job, script


@pytest.mark.slow
def test_optimizer_across_two_processes_matches_one(tmp_path):
  """Eager and jitted init, static and traced objective, float32 and 8-bit DualOptim+."""
  two = run_job(script("multiprocess_checks.py", str(tmp_path / "two.npz")), timeout=600)
  assert two.codes == [0, 0], two.tail()
  report = two.json(0)
  assert report["process_count"] == 2 and report["device_count"] == 8
  assert report["local_device_count"] == 4
  assert not report["params_fully_addressable"]  # the parameters really span both processes
  assert not any(line.startswith("{") for line in two.lines[1])  # process 0 alone reports
  assert len(report["checks"]) == 4
  for name, check in report["checks"].items():
    for stage in ("init", "after_update"):
      assert check[stage]["wrong"] == [], (name, stage, check[stage]["wrong"])
      assert check[stage]["num_sharded"] >= 12, (name, stage)  # 3 params x (base + 2 deltas) x 2
      # Only scalar step counters may be left to jit's placement (eager init).
      assert all(n.endswith("count") for n in check[stage]["local_scalars"]), (name, stage)
    assert check["collectives"] == [], name

  one = run_json("multiprocess_checks.py", str(tmp_path / "one.npz"), num_devices=8)
  assert one["process_count"] == 1 and one["params_fully_addressable"]
  a, b = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
  assert sorted(a.files) == sorted(b.files) and len(a.files) > 100
  different = [k for k in a.files if not np.array_equal(a[k], b[k])]
  assert different == [], different[:5]
