"""The Flax LM example runs and prints the intended outcome (forget loss up, retain loss low)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_flax_lm_example_forgets_and_retains():
  proc = subprocess.run(
    [sys.executable, str(ROOT / "examples" / "flax_lm_dualoptim.py")],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  for mode in ("static", "traced"):
    assert f"{mode} RESULT: as intended" in lines, proc.stdout
