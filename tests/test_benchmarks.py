"""The benchmark scripts run (``--quick``) and write JSON with the documented keys.

These tests check that the scripts work, never what they measure: timings on a
shared machine are not test material.
"""

import json
import pathlib
import subprocess
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"

COMMON_KEYS = {"benchmark", "machine", "notes", "results"}
ROW_KEYS = {
  "bench_update.py": {
    "size",
    "params",
    "optimizer",
    "objective",
    "compiler_options",
    "median_ms",
    "ratio_to_adamw",
    "ratio_to_static",
    "min_bytes_per_param",
    "gb_per_s",
    "fraction_of_triad",
    "hlo_bytes_per_param",
    "hlo_copies",
  },
  "bench_memory.py": {
    "optimizer",
    "params",
    "state_bytes",
    "bytes_per_param",
    "touched_bytes_per_param",
  },
  "bench_train_step.py": {"preset", "objective", "median_ms", "tokens_per_s", "ratio_to_adamw"},
  "bench_compile.py": {
    "optimizer",
    "program",
    "compiler_options",
    "lower_s",
    "compile_s",
    "total_s",
  },
}


def run_quick(script: str, tmp_path: pathlib.Path, *extra: str) -> dict:
  out = tmp_path / f"{script}.json"
  proc = subprocess.run(
    [sys.executable, str(BENCHMARKS / script), "--quick", "--out", str(out), *extra],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "|" in proc.stdout  # the table was printed
  return json.loads(out.read_text())


def check_rows(script: str, payload: dict) -> list[dict]:
  assert COMMON_KEYS <= payload.keys()
  rows = payload["results"]
  assert rows, "no result rows"
  for row in rows:
    missing = ROW_KEYS[script] - row.keys()
    assert not missing, f"{script}: row {row} lacks {missing}"
  return rows


def test_bench_memory_quick(tmp_path):
  rows = check_rows("bench_memory.py", run_quick("bench_memory.py", tmp_path))
  by_name = {r["optimizer"]: r for r in rows}
  # The state sizes follow from the state layouts: Adam keeps 2 moments, DualOptim 2 per
  # objective (K = 2), DualOptim+ 2 base + 2 per objective; counters add a few bytes.
  assert by_name["optax.adamw"]["bytes_per_param"] == pytest.approx(8, rel=1e-2)
  assert by_name["dualoptim"]["bytes_per_param"] == pytest.approx(16, rel=1e-2)
  assert by_name["dualoptim_plus"]["bytes_per_param"] == pytest.approx(24, rel=1e-2)
  assert by_name["dualoptim_plus"]["touched_bytes_per_param"] == pytest.approx(16, rel=1e-2)


def test_bench_update_quick(tmp_path):
  rows = check_rows(
    "bench_update.py",
    run_quick("bench_update.py", tmp_path, "--optimizers", "dualoptim_plus", "--options", "region"),
  )
  kinds = {(r["optimizer"], r["objective"]) for r in rows}
  assert {
    ("optax.adamw", "-"),
    ("dualoptim_plus", "static"),
    ("dualoptim_plus", "traced"),
    ("triad", "triad"),
  } <= kinds
  for r in rows:
    assert r["median_ms"] > 0 and r["gb_per_s"] > 0
    if r["optimizer"] == "optax.adamw":
      assert r["ratio_to_adamw"] == pytest.approx(1.0)
      # g, p, m, v read; p, m, v written (the step counters add a few bytes).
      assert r["min_bytes_per_param"] == pytest.approx(28, rel=1e-3)
    if r["optimizer"] == "dualoptim_plus":
      assert r["min_bytes_per_param"] == pytest.approx(
        44, rel=1e-3
      )  # + 2 base arrays, read, written


@pytest.mark.slow
def test_bench_update_quick_all_options(tmp_path):
  check_rows("bench_update.py", run_quick("bench_update.py", tmp_path))


@pytest.mark.slow
def test_bench_compile_quick(tmp_path):
  rows = check_rows("bench_compile.py", run_quick("bench_compile.py", tmp_path))
  assert any(r["program"] == "traced" for r in rows)


@pytest.mark.slow
def test_bench_train_step_quick(tmp_path):
  rows = check_rows("bench_train_step.py", run_quick("bench_train_step.py", tmp_path))
  assert any(r["preset"] == "optax.adamw" for r in rows)
  assert all(r["tokens_per_s"] > 0 for r in rows)


@pytest.mark.slow
def test_bench_lm_pipeline_quick(tmp_path):
  payload = run_quick("bench_lm_pipeline.py", tmp_path, "--presets", "joint,dualoptim_plus")
  assert {"step_ratio", "generation", "model"} <= payload.keys()
  assert set(payload["step_ratio"]) == {"joint", "dualoptim_plus"}
  assert all(r > 0 for r in payload["step_ratio"].values())
  assert payload["model"]["n_layers"] == 2
  decoders = {row["decoder"]: row for row in payload["generation"]}
  assert set(decoders) == {"generate.py", "bare loop"}
  # Both decoders are greedy on the same prompts: they must produce the same tokens.
  assert all(row["same_tokens"] for row in decoders.values())
  assert decoders["bare loop"]["ratio_to_bare"] == pytest.approx(1.0)


def test_bench_lm_update_quick(tmp_path):
  payload = run_quick(
    "bench_lm_update.py", tmp_path, "--presets", "alternate,dualoptim_plus", "--bare-step-ms", "500"
  )
  rows = {r["preset"]: r for r in payload["results"]}
  assert list(rows) == ["alternate", "dualoptim_plus"] and payload["parameters"] > 0
  for row in rows.values():
    assert row["adamw_ms"] > 0 and row["update_ms"] > 0
    assert row["excess_ms"] == pytest.approx(row["update_ms"] - row["adamw_ms"])
    assert row["predicted_ratio"] == pytest.approx(1 + row["excess_ms"] / 500)


@pytest.mark.slow
def test_bench_step_costs_quick(tmp_path):
  payload = run_quick("bench_step_costs.py", tmp_path)
  rows = {r["step"]: r for r in payload["results"]}
  assert list(rows) == ["bare", "bare+clip", "joint", "dualoptim_plus"]
  assert rows["bare"]["bytes"] == 1.0 and payload["layers"] == 1
  # Clipping and DualOptim+'s two extra moments move more bytes than the bare Adam step.
  assert (
    rows["bare+clip"]["bytes"] > 1.0 and rows["dualoptim_plus"]["bytes"] > rows["joint"]["bytes"]
  )
  assert all(r["temps_x_params"] > 0 for r in rows.values())


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
  out = tmp_path / "gpu_check.json"
  proc = subprocess.run(
    [sys.executable, str(BENCHMARKS / "gpu_check.py"), "--dry-run", "--out", str(out)],
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  payload = json.loads(out.read_text())
  assert payload["dry_run"] and not payload["notes"]
  parts = payload["results"]
  assert set(parts) == {"update", "lm_step", "tofu_run"}
  assert all(p["returncode"] == 0 and "result" in p for p in parts.values())
  assert {"dualoptim_plus", "optax.adamw"} <= {
    r["optimizer"] for r in parts["update"]["result"]["results"]
  }
  assert "dualoptim_plus" in parts["lm_step"]["result"]["step_ratio"]
  run = parts["tofu_run"]["result"]["config"]
  assert {"alternate", "dualoptim_plus"} <= set(run["presets"])
  assert run["compiles"]["total"]["programs"] >= 1 and 0 < run["evaluation_share"] < 1
