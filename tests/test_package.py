"""Package boundaries: the optimizer core imports and runs without the [unlearn] extra."""

import subprocess
import sys
from pathlib import Path

import dualoptim_jax as dj

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = ("flax", "orbax", "tokenizers", "rouge_score", "scipy", "matplotlib", "tqdm", "gguf")

BLOCKED = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in {EXTRAS!r}:
      raise ImportError("blocked by the test: " + name)
    return None
sys.meta_path.insert(0, Block())
import jax.numpy as jnp
import dualoptim_jax as dj
from dualoptim_jax import quantize, sharding, storage
params = {{"w": jnp.ones((64, 64))}}
for tx in (dj.dualoptim_plus(1e-3, state_bits=8, careful_rounding=True), dj.adamw_8bit(1e-3)):
  state = tx.init(params)
  u, state = tx.update(params, state, params, objective=jnp.int32(0))
  assert bool(jnp.all(jnp.isfinite(u["w"])))
print("ok", sorted(m for m in sys.modules if m.split(".")[0] in {EXTRAS!r}))
"""


def test_core_imports_and_runs_without_the_unlearn_extra():
  proc = subprocess.run(
    [sys.executable, "-c", BLOCKED], capture_output=True, text=True, cwd=ROOT, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip().splitlines()[-1] == "ok []"


def test_core_modules_use_only_public_optax():
  for path in sorted((ROOT / "dualoptim_jax").glob("*.py")):
    assert "optax._src" not in path.read_text(), path.name


def test_public_api_is_exported_and_helpers_are_not():
  for name in dj.__all__:
    assert hasattr(dj, name), name
  for name in ("Moment", "Direction", "StoragePolicy", "state_storage", "shared_base_moments"):
    assert name in dj.__all__, name
  for helper in ("check_decay", "is_traced", "adam_storage", "check_eps", "float_codec"):
    assert helper not in dj.__all__ and not hasattr(dj, helper), helper


def test_no_function_is_over_80_lines_unless_its_docstring_says_why():
  import ast

  long = []
  for path in sorted((ROOT / "dualoptim_jax").rglob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        lines = (node.end_lineno or node.lineno) - node.lineno + 1
        why = "long because" in (ast.get_docstring(node) or "").lower()
        if lines > 80 and not why:
          long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
  assert not long, long
