"""The real-world task: golden answers, neighbour utility, and a tiny end-to-end run."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from dualoptim_jax.unlearn import cli, metrics
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


def test_built_in_model_is_taught_the_neighbour_facts_that_mu_scores(shared_data):
  """The neighbour evaluation set asks other questions than the neighbour training set, so a
  built-in model (no pretrained knowledge) learns them in both initial fine-tunes; a pretrained
  --model is tuned on the forget / neighbour training items only."""
  cfg = cli.parse_args(["--task", "real_world", "--data-dir", str(shared_data)])
  task = make_task(cfg)
  data = task.data
  assert not {it.question for it in data.retain} & {it.question for it in data.retain_eval}
  tuned = {}
  tune = lambda kind, items: tuned.setdefault(kind, [it.question for it in items])
  task.initial_models(tune, None, None)
  scored = [it.question for it in data.retain_eval]
  assert set(scored) <= set(tuned["full"]) and set(scored) <= set(tuned["retain"])
  assert not set(it.question for it in data.forget) & set(tuned["retain"])
  tuned.clear()
  task.initial_models(tune, object(), None)
  assert not set(scored) & set(tuned["full"])


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
    "retain_prob",
    "retain_rouge",
    "retain_truth_ratio",
    "retain_token_entropy",
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


def test_real_world_evaluates_with_the_tofu_jobs_settings(shared_data, monkeypatch):
  """Token entropy counts in MU and the greedy answers have TOFU's length (128 new tokens on
  file data, or --max-new-tokens): the settings of the TOFU job's own evaluation."""
  seen = []
  monkeypatch.setattr(metrics, "evaluate", lambda *args, **kw: seen.append(kw) or {"per_item": {}})
  for flags, tokens in (([], 128), (["--max-new-tokens", "7"], 7)):
    cfg = cli.parse_args(["--task", "real_world", "--data-dir", str(shared_data), *flags])
    make_task(cfg).evaluate(None, None)
    cli.evaluate(SimpleNamespace(tok=None, data=None), cfg, None)
    task_kw, tofu_kw = seen[-2:]
    assert task_kw["extra_metrics"] == ("token_entropy",) and task_kw["max_new_tokens"] == tokens
    assert task_kw == tofu_kw


def _split(n, offset):
  return {
    "prob": [0.1 * (i + offset) for i in range(n)],
    "rouge": [0.05 * (i + offset) for i in range(n)],
    "truth_ratio": [0.5 + 0.01 * i for i in range(n)],
    "generation": ["x"] * n,
    "token_entropy": [0.9] * n,
  }


def test_real_world_half_is_tofus_half_plus_downstream_halves(shared_data):
  """A half of a real-world evaluation: TOFU's summarize_half of the forget / neighbour items
  (token entropy in MU, forget quality against the retain-only ratios of the same half) and the
  downstream accuracy of the same half of each set's items."""
  cfg = cli.parse_args(["--task", "real_world", "--data-dir", str(shared_data)])
  task = make_task(cfg)
  task._ratios = np.array([0.4, 0.5, 0.6, 0.7, 0.8])
  per_item = {"forget": _split(5, 1), "retain": _split(5, 2)}
  downstream = {
    "gsm8k": {"per_item": {"correct": [True, False, False, True, True]}},
    "arc": {"per_item": {"prediction": [0, 1, 2, 3], "answer": [0, 0, 2, 0]}},
  }
  result = {"per_item": {**per_item, "downstream": downstream}}
  for which, gsm8k, arc in (("validation", 2 / 3, 1.0), ("test", 0.5, 0.0)):
    got = task.summarize_half(result, which)
    want = metrics.summarize_half(
      {"per_item": per_item}, which, retain_only_truth_ratios=task._ratios
    )
    assert got["overall"] == want["overall"] and got["forget_quality"] == want["forget_quality"]
    assert "retain_token_entropy" in got["components"]["model_utility"]
    assert got["downstream_gsm8k"] == pytest.approx(gsm8k) and got["downstream_arc"] == arc


def _validation_ovr(out, method, value):
  """Mean OVR over the seeds of one setting's validation halves, from its run records (OVR does
  not involve forget quality, so no retain-only ratios are needed)."""
  ovr = []
  for path in sorted((out / "runs" / method / f"forget_lr_scale={value:g}").glob("seed*.json")):
    per_item = json.loads(path.read_text())["result"]["per_item"]
    per_item = {k: v for k, v in per_item.items() if k != "downstream"}
    ovr.append(metrics.summarize_half({"per_item": per_item}, "validation")["overall"])
  return float(np.mean(ovr))


@pytest.mark.slow  # ~45 s on a loaded 2-core CPU (8 runs)
def test_real_world_report_has_best_settings_and_paired_comparison(shared_data, tmp_path):
  """Two seeds, a sweep: each method's best value on the validation half, its test half in
  results.md, and DualOptim+ against joint paired by seed."""
  argv = TINY + [
    "--task", "real_world", "--data-dir", str(shared_data), "--task-id", "1", "--steps", "1",
    "--eval-items", "4", "--seeds", "0,1", "--presets", "joint,dualoptim_plus",
    "--sweep", "forget_lr_scale=0.5,2",
    "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "o"),
  ]  # fmt: skip
  assert cli.main(argv) == 0
  doc = json.loads((tmp_path / "o" / "results.json").read_text())
  best = doc["best_settings"]
  assert set(best) == {"joint", "dualoptim_plus"}
  for method, chosen in best.items():
    assert [r["seed"] for r in chosen["test_half"]] == [0, 1]
    validation = {v: _validation_ovr(tmp_path / "o", method, v) for v in (0.5, 2.0)}
    assert chosen["value"] == max(validation, key=validation.__getitem__)
  (row,) = doc["paired_comparison"]["rows"]
  assert row["baseline"] == "joint" and row["seeds"] == 2
  mine = {r["seed"]: r["overall"] for r in best["dualoptim_plus"]["test_half"]}
  theirs = {r["seed"]: r["overall"] for r in best["joint"]["test_half"]}
  assert row["differences"] == pytest.approx([mine[s] - theirs[s] for s in (0, 1)])
  md = (tmp_path / "o" / "results.md").read_text()
  assert "Best setting per method" in md and "Paired comparison" in md
