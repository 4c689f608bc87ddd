"""Tests for dualoptim_jax.unlearn.cli: flags, model cache, and tiny end-to-end runs."""

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from dualoptim_jax.unlearn import cli
from dualoptim_jax.unlearn import data as D
from dualoptim_jax.unlearn.synthetic import synthetic_tofu

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

# The smallest settings that still exercise every stage.
TINY = [
  "--model-size",
  "tiny",
  "--finetune-steps",
  "20",
  "--steps",
  "2",
  "--eval-items",
  "3",
  "--max-new-tokens",
  "4",
  "--vocab-size",
  "300",
  "--seeds",
  "0",
  "--no-progress",
]


def test_defaults_and_flag_parsing():
  cfg = cli.parse_args([])
  assert cfg.data_dir is None and cfg.presets == tuple(cli.PRESETS) and cfg.seeds == (0, 1, 2)
  assert (cfg.forget_steps, cfg.retain_steps, cfg.loss, cfg.out) == (1, 5, "IDK+AP", "results")
  cfg = cli.parse_args(
    [
      "--presets",
      "joint, dualoptim_plus",
      "--seeds",
      "1,2",
      "--loss",
      "npo+kl",
      "--forget-lr-scale",
      "2",
      "--split",
      "forget05",
      "--task-id",
      "3",
    ]
  )
  assert cfg.presets == ("joint", "dualoptim_plus") and cfg.seeds == (1, 2)
  assert (cfg.loss, cfg.forget_lr_scale, cfg.split, cfg.task_id) == ("npo+kl", 2.0, "forget05", 3)


@pytest.mark.parametrize(
  "argv, message",
  [
    (["--presets", "sgd"], "unknown \\['sgd'\\]"),
    (["--loss", "IDK+XX"], "unknown retain loss 'XX'"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--lr", "-1"], "--lr must be > 0"),
    (["--split", "forget02"], "invalid choice"),
  ],
)
def test_bad_flags_exit_with_a_message(argv, message, capsys):
  with pytest.raises(SystemExit):
    cli.parse_args(argv)
  err = capsys.readouterr().err
  assert __import__("re").search(message, err)
  assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
  with pytest.raises(SystemExit, match="--seeds must be a comma list of integers"):
    cli.parse_args(["--seeds", "a,b"])


def test_num_updates_gives_joint_and_alternate_the_same_forget_batches():
  cfg = cli.RunConfig(forget_steps=2, retain_steps=3)
  assert cli.num_updates("joint", 7, cfg) == 7
  assert cli.num_updates("dualoptim_plus", 7, cfg) == 4 * 5  # ceil(7/2) cycles of 2 + 3


def test_tiny_run_writes_the_report(tmp_path):
  argv = TINY + [
    "--presets",
    "dualoptim_plus",
    "--cache-dir",
    str(tmp_path / "cache"),
    "--out",
    str(tmp_path / "a"),
  ]
  assert cli.main(argv) == 0
  doc = json.loads((tmp_path / "a" / "results.json").read_text())
  assert list(doc["rows"]) == ["Initial", "Retain-only", "dualoptim_plus"]
  assert doc["config"]["updates"] == {"dualoptim_plus": 12}  # 2 forget updates, 2 cycles of 1 + 5
  (seed,) = doc["rows"]["dualoptim_plus"]["seeds"]
  assert seed["run"]["forget_updates"] == 2 and seed["run"]["optimizer"]["b2"] == 0.95
  assert all(0 <= doc["rows"][r]["mean"]["forget_prob"] <= 1 for r in doc["rows"])
  assert (
    doc["rows"]["Retain-only"]["mean"]["forget_quality"] == 1.0
  )  # KS of a sample against itself
  hist = doc["loss_histories"]["dualoptim_plus"][0]
  assert len(hist["forget"]) == 2 and len(hist["retain"]) == 10  # 2 cycles of 1 forget + 5 retain
  for name in ("results.md", "results.png"):
    assert (tmp_path / "a" / name).stat().st_size > 0
  assert len([p for p in (tmp_path / "cache" / "models").iterdir() if p.is_dir()]) == 2


def test_tuned_model_is_cached_by_its_recipe(tmp_path):
  data = synthetic_tofu(n_authors=3, qa_per_author=2)
  cfg = cli.parse_args(TINY + ["--finetune-steps", "3"])
  tok = cli.Tokenizer.train(cli.corpus(data), vocab_size=300)
  logs = []
  first = cli.tuned_model("full", data.forget + data.retain, tok, cfg, tmp_path, log=logs.append)
  second = cli.tuned_model("full", data.forget + data.retain, tok, cfg, tmp_path, log=logs.append)
  assert "fine-tuned 3 steps" in logs[0] and "loaded cached model" in logs[1]
  for a, b in zip(
    jax.tree.leaves(nnx.state(first, nnx.Param)), jax.tree.leaves(nnx.state(second, nnx.Param))
  ):
    np.testing.assert_array_equal(a, b)
  cli.tuned_model(
    "full", data.retain, tok, cfg, tmp_path, log=logs.append
  )  # other data: another entry
  assert "fine-tuned" in logs[2] and len(list((tmp_path / "models").iterdir())) == 2


def test_a_run_trains_the_cached_base_in_place_and_reads_it_back(tmp_path):
  data = synthetic_tofu(n_authors=3, qa_per_author=2)
  cfg = cli.parse_args(TINY + ["--finetune-steps", "3"])
  tok = cli.Tokenizer.train(cli.corpus(data), vocab_size=300)
  items = data.forget + data.retain
  base = cli.tuned_model("full", items, tok, cfg, tmp_path, log=lambda *a: None)
  path = cli.tuned_model_path("full", items, tok, cfg, tmp_path)
  assert path.is_dir()  # where tuned_model cached it
  # copies: a NumPy view of a buffer would keep it from being donated
  tuned = [np.array(x, copy=True) for x in jax.tree.leaves(nnx.state(base, nnx.Param))]
  seen = []

  def run(base_path):
    def evaluate(model):
      seen.append(jax.tree.leaves(nnx.state(base, nnx.Param))[0].is_deleted())
      return {"total": float(sum(np.sum(x) for x in jax.tree.leaves(nnx.state(model))))}

    arrays = lambda its, k: D.tokenize_unlearning_set(
      tok, its, data.idk_answers, cfg.max_len, seed=k
    )
    return cli.unlearn_and_evaluate(
      cfg,
      "dualoptim_plus",
      0,
      base=base,
      objective=cli.make_objective(cfg.loss),
      batches=(
        D.BatchIterator(arrays(data.forget, 0), 2, seed=0),
        D.BatchIterator(arrays(data.retain, 1), 2, seed=1),
      ),
      objective0_size=len(data.forget),
      evaluate=evaluate,
      base_path=base_path,
    )

  lent, copied = run(path), run(None)
  assert seen == [True, False]  # the first run trained the base's own buffers
  assert lent["result"] == copied["result"] and lent["history"] == copied["history"]
  for a, b in zip(tuned, jax.tree.leaves(nnx.state(base, nnx.Param))):
    np.testing.assert_array_equal(a, b)  # read back: the next run starts from the tuned model


def test_the_cache_directory_is_absolute(tmp_path, monkeypatch):
  # JAX keys its compilation cache by the directory's spelling: a relative path would miss.
  monkeypatch.chdir(tmp_path)
  cfg = cli.parse_args(TINY + ["--cache-dir", "c"])
  assert cli._cache_dir(cfg) == tmp_path.resolve() / "c"
  monkeypatch.setenv("XDG_CACHE_HOME", "x")
  assert cli._cache_dir(cli.parse_args(TINY)) == tmp_path.resolve() / "x" / "dualoptim_jax"


def test_reference_rows_are_cached_under_their_models_items_and_settings(tmp_path):
  data = synthetic_tofu(n_authors=3, qa_per_author=2)
  cfg = cli.parse_args(TINY + ["--cache-dir", str(tmp_path)])
  setup = lambda base, retain, d=data: cli.Setup(d, None, None, None, None, base, retain)  # pyright: ignore[reportArgumentType]
  path = cli.reference_rows_path(setup(tmp_path / "a", tmp_path / "b"), cfg)
  assert path is not None and path.parent == tmp_path / "evaluations"
  assert cli.reference_rows_path(setup(tmp_path / "a", tmp_path / "b"), cfg) == path
  others = [
    cli.reference_rows_path(setup(tmp_path / "a2", tmp_path / "b"), cfg),
    cli.reference_rows_path(setup(tmp_path / "a", tmp_path / "b2"), cfg),
    cli.reference_rows_path(
      setup(tmp_path / "a", tmp_path / "b"), dataclasses.replace(cfg, max_new_tokens=5)
    ),
    cli.reference_rows_path(
      setup(tmp_path / "a", tmp_path / "b", synthetic_tofu(n_authors=3, qa_per_author=3)), cfg
    ),
  ]
  assert path not in others and len(set(others)) == len(others)
  assert cli.reference_rows_path(setup(None, tmp_path / "b"), cfg) is None


@pytest.mark.slow
def test_runs_are_deterministic_and_reruns_read_the_reference_rows_back(tmp_path, capsys):
  argv = TINY + ["--presets", "joint", "--cache-dir", str(tmp_path / "cache")]
  docs, logs = [], []
  for out in ("a", "b"):
    assert cli.main(argv + ["--out", str(tmp_path / out)]) == 0
    docs.append(json.loads((tmp_path / out / "results.json").read_text()))
    logs.append(capsys.readouterr().out)
  assert "loaded cached evaluations" not in logs[0] and "loaded cached evaluations" in logs[1]
  assert docs[0]["rows"] == docs[1]["rows"]  # the cached Initial / Retain-only rows included
  assert docs[1]["config"]["compiles"]["reference_eval"]["programs"] == 0
  # Other evaluation settings are another entry.
  assert cli.main(argv + ["--out", str(tmp_path / "c"), "--max-new-tokens", "3"]) == 0
  assert "loaded cached evaluations" not in capsys.readouterr().out
  assert len(list((tmp_path / "cache" / "evaluations").iterdir())) == 2


def test_missing_data_dir_fails_cleanly(tmp_path, capsys):
  assert cli.main(TINY + ["--data-dir", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
  err = capsys.readouterr().err
  assert "holds forget01.json" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
  "argv, message",
  [
    (["--model", "/missing.gguf"], "--model '/missing.gguf': no such file or directory"),
    (["--steps", "x"], "--steps must be an integer, got 'x'"),
    (["--lr", "fast"], "--lr must be a number, got 'fast'"),
    (["--presets", ","], "--presets must not be empty"),
    (["--max-len", "4"], "--max-len must be >= 8, got 4"),
  ],
)
def test_every_cli_error_is_one_line_without_traceback(argv, message, capsys):
  with pytest.raises(SystemExit) as exit:
    cli.main(argv)
  assert exit.value.code == 2
  (line,) = capsys.readouterr().err.splitlines()
  assert line.startswith(f"dualoptim-unlearn: error: {message}")


def test_the_flag_table_is_the_only_statement_of_the_flags():
  fields = [f.name for f in __import__("dataclasses").fields(cli.RunConfig)]
  dests = [a.dest for a in cli.build_parser()._actions if a.dest != "help"]
  assert dests == fields  # one option per field, in table order
  assert "--no-progress" in cli.build_parser().format_help()
  assert cli.parse_args(["--no-progress", "--resume", "--checkpoint-dir", "c"]).progress is False
  with pytest.raises(ValueError, match="--batch-size must be >= 1, got 0"):
    cli.RunConfig(batch_size=0)  # a config built in Python is validated by the same table


@pytest.mark.slow
@pytest.mark.real_data
@pytest.mark.skipif(
  not (SHARED / "tofu" / "forget01.json").is_file(), reason=f"TOFU files not found under {SHARED}"
)
def test_real_tofu_forget01_runs_through_data_dir(tmp_path):
  argv = [
    "--data-dir",
    str(SHARED),
    "--split",
    "forget01",
    "--task-id",
    "1",
    "--model-size",
    "tiny",
    "--finetune-steps",
    "30",
    "--steps",
    "2",
    "--eval-items",
    "5",
    "--max-new-tokens",
    "8",
    "--presets",
    "dualoptim_plus",
    "--seeds",
    "0",
    "--no-progress",
    "--cache-dir",
    str(tmp_path / "c"),
    "--out",
    str(tmp_path / "o"),
  ]
  assert cli.main(argv) == 0
  doc = json.loads((tmp_path / "o" / "results.json").read_text())
  assert doc["config"]["data"].startswith("tofu/forget01/task1: forget=40, retain=3960")
  assert doc["rows"]["dualoptim_plus"]["mean"]["forget_quality"] is not None


def test_budget_rules():
  equal = cli.RunConfig(steps=4, forget_steps=2, retain_steps=3)
  assert [cli.budget(p, equal, 20) for p in ("joint", "alternate")] == [4, 2 * 5]
  authors = cli.RunConfig(budget="authors", epochs=5.0, batch_size=4)
  assert [cli.budget(p, authors, 20) for p in ("joint", "dualoptim")] == [25, cli.AUTHORS_UPDATES]


def test_sweep_flag_parsing_and_errors(capsys):
  cfg = cli.parse_args(["--sweep", "forget-lr-scale=0.5,2"])
  assert cfg.sweep == ("forget_lr_scale", (0.5, 2.0))
  for argv, message in (
    (["--sweep", "steps=1,2"], "--sweep: 'steps' is not a float flag"),
    (["--sweep", "nope=1,2"], "--sweep: 'nope' is not a flag"),
    *(
      (["--sweep", f"{name}=1,2"], f"--sweep: {name!r} does not shape an unlearning run")
      for name in ("finetune_lr", "finetune_epochs", "model_seed", "forget_items", "eval_items")
    ),
    (["--sweep", "lr=1e-3,-1"], "--sweep lr=-1: --lr must be > 0, got -1.0"),
    (["--sweep", "lr"], "--sweep must be valid, got 'lr'"),
  ):
    with pytest.raises(SystemExit):
      cli.parse_args(argv)
    assert message in capsys.readouterr().err
  sweepable = cli.sweepable()
  assert {"lr", "forget_lr_scale", "retain_lr_scale", "beta"} <= set(sweepable)
  assert "finetune_lr" not in sweepable and "epochs" in sweepable
  for name in sweepable:  # each one parses as a sweep
    assert cli.parse_args(["--sweep", f"{name}=0.5,1"]).sweep == (name, (0.5, 1.0))


@pytest.mark.slow
def test_sweep_writes_tradeoff_and_confidence_intervals_and_reruns_skip_finished_runs(
  tmp_path, capsys
):
  """The acceptance command of issue 13 (on the tiny model)."""
  argv = TINY + [
    "--cache-dir",
    str(tmp_path / "c"),
    "--out",
    str(tmp_path / "o"),
  ]  # later flags win
  argv += ["--presets", "alternate,dualoptim_plus", "--seeds", "0,1"]
  argv += ["--sweep", "forget_lr_scale=0.5,2", "--steps", "2", "--eval-items", "6"]
  assert cli.main(argv) == 0
  out = tmp_path / "o"
  assert (out / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
  assert len(list((out / "runs").rglob("seed*.json"))) == 8  # 2 presets x 2 values x 2 seeds
  md = (out / "results.md").read_text()
  assert "| alternate [forget_lr_scale=0.5] | 2 |" in md and " [" in md  # mean ± std [CI]
  assert "Best setting per method" in md and "| dualoptim_plus vs |" in md
  doc = json.loads((out / "results.json").read_text())
  assert doc["paired_comparison"]["rows"][0]["baseline"].startswith("alternate")
  assert doc["rows"]["dualoptim_plus [forget_lr_scale=2]"]["ci95"]["overall"] is not None
  first = doc["rows"]
  capsys.readouterr()
  assert cli.main(argv) == 0  # a rerun reuses all 8 finished runs
  assert capsys.readouterr().out.count("finished earlier") == 8
  assert json.loads((out / "results.json").read_text())["rows"] == first
  assert cli.main(argv + ["--lr", "1e-3"]) == 2  # other settings never overwrite a record
  assert "was written by a run with other settings (lr 0.0003 -> 0.001)" in capsys.readouterr().err


def test_sweep_runs_records_every_run_once_for_any_run_function(tmp_path):
  """The sweep of every task: seed-major runs, one record each under OUT/runs, none run twice."""
  cfg = cli.RunConfig(
    presets=("joint", "alternate"), seeds=(0, 1), sweep=("lr", (1e-4, 1e-3)), out=str(tmp_path)
  )
  calls, logs = [], []

  def run(run_cfg, preset, seed):
    calls.append((seed, preset, run_cfg.lr))
    return {"result": {"lr": run_cfg.lr, "max_update_ratio": 1.0}, "seconds": 0.0}

  sweep = lambda data: cli.sweep_runs(cfg, run, data=data, describe=str, log=logs.append)  # noqa: E731
  runs = sweep("d")
  assert calls == [(s, p, v) for s in (0, 1) for p in ("joint", "alternate") for v in (1e-4, 1e-3)]
  assert list(runs) == ["joint", "alternate"]
  for settings in runs.values():
    assert [v for v, _ in settings] == [1e-4, 1e-3]
    assert all([r["result"]["lr"] for r in records] == [v, v] for v, records in settings)
  assert len(list((tmp_path / "runs").rglob("seed*.json"))) == 8
  assert (tmp_path / "runs" / "alternate" / "lr=0.001" / "seed1.json").is_file()
  calls.clear()
  assert sweep("d") == runs and not calls  # a rerun loads every record
  assert sum("finished earlier" in line for line in logs) == 8
  with pytest.raises(ValueError, match="other settings"):
    sweep("other data")  # a record of other settings is never reused


def test_sweep_runs_8bit_presets_at_their_methods_best_value(tmp_path):
  """An 8-bit preset beside its 32-bit method is not swept: after the sweep it runs every seed at
  the value its method scored best on the validation half."""
  presets = ("dualoptim_8bit", "dualoptim", "alternate", "dualoptim_plus_8bit")
  cfg = cli.RunConfig(presets=presets, seeds=(0, 1), sweep=("lr", (1e-4, 1e-3)), out=str(tmp_path))
  calls, logs = [], []

  def run(run_cfg, preset, seed):
    calls.append((seed, preset, run_cfg.lr))
    return {"result": {"lr": run_cfg.lr, "max_update_ratio": 1.0}, "seconds": 0.0}

  # dualoptim scores best at the smaller lr on the validation half, and only there
  summarize = lambda r, which: {"overall": -r["lr"] if which == "validation" else r["lr"]}  # noqa: E731
  runs = cli.sweep_runs(cfg, run, data="d", describe=str, summarize=summarize, log=logs.append)
  swept = [(s, p, v) for s in (0, 1) for p in presets[1:] for v in (1e-4, 1e-3)]
  assert calls == swept + [(0, "dualoptim_8bit", 1e-4), (1, "dualoptim_8bit", 1e-4)]
  assert list(runs) == list(presets)
  assert [v for v, _ in runs["dualoptim_8bit"]] == [1e-4]  # one setting, both seeds
  assert [r["result"]["lr"] for r in runs["dualoptim_8bit"][0][1]] == [1e-4, 1e-4]
  assert [v for v, _ in runs["dualoptim_plus_8bit"]] == [1e-4, 1e-3]  # its method is not run
  assert "[dualoptim_8bit] runs at dualoptim [lr=0.0001]'s value" in logs
  calls.clear()
  no_halves = cli.sweep_runs(cfg, run, data="d", describe=str, log=logs.append)
  assert [v for v, _ in no_halves["dualoptim_8bit"]] == [1e-4, 1e-3]  # without halves: swept
  assert calls == [(s, "dualoptim_8bit", 1e-3) for s in (0, 1)]


def test_run_objective_weights_any_objective_for_joint_only():
  from dualoptim_jax.unlearn.losses import make_objective
  from dualoptim_jax.unlearn.tasks.formats import SupervisedObjective

  cfg = cli.RunConfig(forget_lr_scale=0.5, retain_lr_scale=3.0, forget_coef=2.0, beta=0.2)
  sft = SupervisedObjective(retain="KL")
  joint = cli.run_objective(sft, cfg, "joint")
  assert (joint.forget_coef, joint.retain_coef, joint.retain) == (1.0, 3.0, "KL")
  assert (cli.run_objective(sft, cfg, "alternate").forget_coef, sft.forget_coef) == (2.0, 1.0)
  npo = cli.run_objective(make_objective("NPO+GD"), cfg, "dualoptim_plus")
  assert (npo.forget_coef, npo.retain_coef, npo.beta) == (2.0, 1.0, 0.2)
  assert cli.objective(cfg, "joint") == cli.run_objective(make_objective("IDK+AP"), cfg, "joint")


def test_run_checkpointer_has_a_directory_per_swept_setting(tmp_path):
  cfg = cli.RunConfig(checkpoint_dir=str(tmp_path), sweep=("lr", (1e-4, 1e-3)))
  assert cli.run_checkpointer(dataclasses.replace(cfg, checkpoint_dir=None), "joint", 0, {}) is None
  one = cli.run_checkpointer(dataclasses.replace(cfg, lr=1e-3), "joint", 1, {}, under="safety")
  assert (
    one is not None and Path(one.directory) == tmp_path / "safety" / "joint" / "lr=0.001" / "seed1"
  )
  plain = cli.run_checkpointer(dataclasses.replace(cfg, sweep=None), "joint", 1, {})
  assert plain is not None and Path(plain.directory) == tmp_path / "joint" / "seed1"  # as before
