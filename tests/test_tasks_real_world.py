"""The real-world task: golden answers, neighbour utility, and a tiny end-to-end run."""

import json

import pytest

from dualoptim_jax.unlearn import cli
from dualoptim_jax.unlearn.data import DataFormatError
from dualoptim_jax.unlearn.tasks import make_task
from dualoptim_jax.unlearn.tasks import real_world as RW

TINY = [
  "--model-size", "tiny", "--finetune-steps", "10", "--steps", "2", "--eval-items", "3",
  "--max-new-tokens", "4", "--vocab-size", "1024", "--max-len", "96", "--seeds", "0",
  "--no-progress",
]  # fmt: skip


def test_loader_uses_golden_answers(shared_data):
  data = RW.load_real_world_task(shared_data)
  assert len(data.forget) == 400 and len(data.retain) == 400
  assert data.forget[0].answer == "Eddie Van Halen was born on January 26, 1955."
  assert all(it.perturbed_answers and it.paraphrased_answer for it in data.retain_eval)
  assert not data.real_authors and not data.world_facts  # utility is the task's own
  one = RW.load_real_world_task(shared_data, task_id=1)
  assert 0 < len(one.forget) < 400 and one.name == "real_world/task1"


def test_loader_errors_name_file_line_and_field(tmp_path):
  (tmp_path / "forget.json").write_text(
    '{"question": "q", "golden_answer": "a", "task_id": 1}\n{"question": "q2", "task_id": 1}\n'
  )
  with pytest.raises(DataFormatError, match=r"forget\.json:2: missing field 'golden_answer'"):
    RW.load_real_world_task(tmp_path)


def test_task_adds_downstream_columns(shared_data, tmp_path):
  gsm = shared_data / "downstream" / "gsm8k_test.jsonl"
  cfg = cli.parse_args(
    TINY + ["--task", "real_world", "--data-dir", str(shared_data), "--downstream", f"gsm8k={gsm}"]
  )
  task = make_task(cfg)
  keys = [k for k, _ in task.columns]
  assert keys[-1] == "downstream_gsm8k" and "forget_efficacy" in keys and "overall" in keys


@pytest.mark.slow  # ~2 min on a loaded 2-core CPU
def test_tiny_real_world_run_writes_ufe_mu_ovr(shared_data, tmp_path):
  gsm = shared_data / "downstream" / "gsm8k_test.jsonl"
  argv = TINY + [
    "--task", "real_world", "--data-dir", str(shared_data), "--presets", "alternate,dualoptim_plus",
    "--downstream", f"gsm8k={gsm}", "--downstream-items", "2",
    "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "o"),
  ]  # fmt: skip
  assert cli.main(argv) == 0
  header = (tmp_path / "o" / "results.md").read_text().split("\n")[2]
  for column in ("UFE", "MU", "OVR", "gsm8k"):
    assert column in header
  doc = json.loads((tmp_path / "o" / "results.json").read_text())
  assert list(doc["rows"]) == ["Initial", "Retain-only", "alternate", "dualoptim_plus"]
  assert doc["components"]["model_utility"] == [
    "retain_prob", "retain_rouge", "retain_truth_ratio", "retain_token_entropy"
  ]
  for row in doc["rows"].values():
    assert 0.0 <= row["mean"]["downstream_gsm8k"] <= 1.0
  assert doc["config"]["data"].startswith("real_world: forget=400, retain=400")


@pytest.mark.slow  # ~1 min on a loaded 2-core CPU
def test_real_world_sweep_records_reruns_and_tradeoff(shared_data, tmp_path, capsys):
  """--sweep on the real-world task: a record per run, joint's forget loss weighted by the lr
  scale, a rerun that runs nothing, and the UFE / MU trade-off plot."""
  argv = TINY + [
    "--task", "real_world", "--data-dir", str(shared_data), "--task-id", "1", "--steps", "1",
    "--presets", "joint,dualoptim_plus", "--sweep", "forget_lr_scale=0.5,2",
    "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "o"),
  ]  # fmt: skip
  assert cli.main(argv) == 0
  runs = tmp_path / "o" / "runs"
  assert len(list(runs.rglob("seed0.json"))) == 4
  for v in ("0.5", "2"):
    joint = json.loads((runs / "joint" / f"forget_lr_scale={v}" / "seed0.json").read_text())
    assert (
      joint["run"]["loss"]["forget_coef"] == float(v) and joint["run"]["loss"]["forget"] == "IDK"
    )
    do = json.loads((runs / "dualoptim_plus" / f"forget_lr_scale={v}" / "seed0.json").read_text())
    assert do["run"]["loss"]["forget_coef"] == 1.0
    assert do["run"]["optimizer"]["forget_lr_scale"] == float(v)
  assert (tmp_path / "o" / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
  doc = json.loads((tmp_path / "o" / "results.json").read_text())
  assert list(doc["rows"])[2:] == [
    f"{p} [forget_lr_scale={v}]" for p in ("joint", "dualoptim_plus") for v in ("0.5", "2")
  ]
  capsys.readouterr()
  assert cli.main(argv) == 0
  logged = capsys.readouterr().out
  assert logged.count("finished earlier") == 4 and "max |update|/lr" not in logged
