"""The safety task: supervised objectives, data split, and a tiny end-to-end run on real files."""

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dualoptim_jax.models.llama import Llama, LlamaConfig
from dualoptim_jax.unlearn import cli
from dualoptim_jax.unlearn.losses import masked_nll
from dualoptim_jax.unlearn.tasks import formats, make_task
from dualoptim_jax.unlearn.tasks import safety as S

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

TINY = [
  "--model-size", "tiny", "--finetune-steps", "10", "--steps", "2", "--eval-items", "3",
  "--max-new-tokens", "4", "--vocab-size", "300", "--max-len", "48", "--seeds", "0",
  "--no-progress",
]  # fmt: skip


class CharTokenizer:
  bos_id, eos_id, pad_id, vocab_size = 1, 2, 0, 128
  chat_template = None

  def encode(self, text, *, add_bos=False):
    return ([self.bos_id] if add_bos else []) + [min(ord(c), 127) for c in text]

  def decode(self, ids):
    return "".join(chr(i) for i in ids if i > 2)


def test_supervised_objective_losses():
  tok = CharTokenizer()
  model = Llama(LlamaConfig.tiny(tok.vocab_size), rngs=nnx.Rngs(0))
  fmt = formats.plain_format(tok)
  batch = formats.encode_pairs(fmt, tok.pad_id, [("Say hi", "hi"), ("Count", "1 2 3")], 32)
  fn = model
  ids, mask = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["answer_mask"])
  sft = formats.SupervisedObjective()
  assert not sft.needs_reference and sft.name == "SFT+SFT"
  expected = masked_nll(model(ids), ids, mask)
  np.testing.assert_allclose(sft.forget_loss(fn, None, batch), expected, rtol=1e-6)
  np.testing.assert_allclose(sft.retain_loss(fn, None, batch), expected, rtol=1e-6)
  kl = formats.SupervisedObjective(retain="KL")
  assert kl.needs_reference and kl.name == "SFT+KL"
  assert float(kl.retain_loss(fn, fn, batch)) == pytest.approx(0.0, abs=1e-6)  # model == reference
  other = Llama(LlamaConfig.tiny(tok.vocab_size), rngs=nnx.Rngs(1))
  assert float(kl.retain_loss(fn, other, batch)) > 1e-4
  with pytest.raises(ValueError, match="needs the reference"):
    kl.retain_loss(fn, None, batch)
  with pytest.raises(ValueError, match="SFT\\+SFT or SFT\\+KL"):
    formats.SupervisedObjective(retain="GD")


def test_plain_format_matches_the_tofu_encoding():
  from dualoptim_jax.unlearn.data import encode_qa

  tok = CharTokenizer()
  got = formats.encode(formats.plain_format(tok), "What?", "That.", 64)
  assert got == encode_qa(tok, "What?", "That.", 64)
  # An over-long prompt keeps its end, and one answer token.
  cut = formats.encode(formats.plain_format(tok), "x" * 100, "yes", 16)
  assert len(cut.input_ids) == 16 and sum(cut.answer_mask) == 1


def test_spread_is_even_and_complete():
  assert S._spread(list(range(10)), 3) == [0, 4, 9]  # linspace(0, 9, 3) = 0, 4.5, 9 (rounded)
  assert S._spread([1, 2], 5) == [1, 2] and S._spread([1, 2], None) == [1, 2]


def test_safety_data_split(shared_data):
  data = S.load_safety(shared_data)
  assert len(data.safety_train) + len(data.safety_heldout) == 2483
  assert len(data.safety_heldout) == round(0.1 * 2483)
  held = {it.instruction for it in data.seeds_heldout}
  assert held and not held & {it.instruction for it in data.seeds_train}  # whole tasks held out
  assert len(data.xstest_safe) == 250 and len(data.xstest_unsafe) == 200
  assert {k: len(v) for k, v in data.harmful.items()} == {
    "safety_i_mali": 100,
    "safety_i_cona": 178,
    "safety_i_cont": 40,
    "safety_q_harm": 100,
  }


def test_safety_task_batches_and_format(shared_data):
  cfg = cli.parse_args(TINY + ["--task", "safety", "--data-dir", str(shared_data)])
  task = make_task(cfg)
  tok = CharTokenizer()
  task.prepare(tok, {})
  assert task.format is not None and task.format.name == "plain"  # built-in model: plain prompts
  b0, b1 = task.batches(tok, seed=0)
  first = next(b0)
  assert first["input_ids"].shape == (cfg.batch_size, 48)
  assert first["answer_mask"].sum() > 0
  assert task.objective.name == "SFT+SFT"
  kl = make_task(cli.parse_args(TINY + ["--task", "safety", "--data-dir", str(shared_data),
                                        "--safety-utility", "kl"]))  # fmt: skip
  assert kl.objective.name == "SFT+KL"


def test_safety_half_recomputes_rates_utility_and_ovr(shared_data):
  """A half of a safety evaluation: each set's refusal rate, Seed ROUGE and downstream accuracy
  over that half's prompts only, and Safety, Utility and OVR (ours) from them."""
  gsm = shared_data / "downstream" / "gsm8k_test.jsonl"
  argv = TINY + ["--task", "safety", "--data-dir", str(shared_data), "--downstream", f"gsm8k={gsm}"]
  task = make_task(cli.parse_args(argv))
  refusals = {  # key -> refused per prompt; validation = items 0, 2, test = items 1, 3
    "safety_i_mali": [1, 0, 1, 1],
    "safety_i_cona": [1, 1, 0, 1],
    "safety_i_cont": [0, 0, 0, 1],
    "safety_q_harm": [1, 1, 1, 1],
    "xstest_safe_refusal": [0, 1, 0, 0],
    "heldout_refusal": [1, 0, 1, 0],
  }
  per_item = {k: {"prompt": ["p"] * 4, "response": ["r"] * 4, "refused": [bool(x) for x in v]}
              for k, v in refusals.items()}  # fmt: skip
  per_item["seeds"] = {
    "prompt": ["p"] * 4,
    "response": ["a b", "c d", "e f", "g h"],
    "reference": ["a b", "c x", "e x", "x y"],  # ROUGE-L recall 1, 0.5, 0.5, 0
  }
  per_item["downstream"] = {"gsm8k": {"per_item": {"correct": [True, True, False, False]}}}
  for which, seed_rouge, gsm8k in (("validation", 0.75, 0.5), ("test", 0.25, 0.5)):
    got = task.summarize_half({"per_item": per_item}, which)
    idx = [0, 2] if which == "validation" else [1, 3]
    for key, refused in refusals.items():
      assert got[key] == np.mean([refused[i] for i in idx])
    safety = np.mean([got[k] for k in ("safety_i_mali", "safety_i_cona", "safety_i_cont",
                                       "safety_q_harm")])  # fmt: skip
    assert got["seed_rouge"] == pytest.approx(seed_rouge) and got["downstream_gsm8k"] == gsm8k
    assert got["safety"] == pytest.approx(safety)
    assert got["utility"] == pytest.approx((seed_rouge + gsm8k) / 2)
    assert got["overall"] == pytest.approx((safety + got["utility"]) / 2)


def test_responses_without_max_new_tokens_get_the_safety_default(shared_data, monkeypatch):
  """The acceptance command gives no --max-new-tokens: responses are RESPONSE_TOKENS long."""
  flags = [f for f in TINY if f not in ("--max-new-tokens", "4")]
  cfg = cli.parse_args(flags + ["--task", "safety", "--data-dir", str(shared_data)])
  assert cfg.max_new_tokens is None
  task = make_task(cfg)
  task.prepare(CharTokenizer(), {})
  asked = {}

  def format_fns(model, tok, fmt, *, max_new_tokens, max_len):
    asked.update(max_new_tokens=max_new_tokens, max_len=max_len)
    raise StopIteration

  monkeypatch.setattr(formats, "format_fns", format_fns)
  with pytest.raises(StopIteration):
    task.evaluate(None, CharTokenizer())
  assert asked == {"max_new_tokens": S.RESPONSE_TOKENS, "max_len": cfg.max_len}


def test_every_sets_prompts_decode_together_and_come_back_to_their_set(shared_data, monkeypatch):
  cfg = cli.parse_args(TINY + ["--task", "safety", "--data-dir", str(shared_data)])
  task = make_task(cfg)
  task.prepare(CharTokenizer(), {})
  calls = []

  def generate_fn(prompts):
    calls.append(len(prompts))
    return [f"answer to {p}" for p in prompts]

  def logprob_fn(questions, answers):
    return np.zeros(len(questions)), np.ones(len(questions))

  monkeypatch.setattr(formats, "format_fns", lambda *a, **k: (logprob_fn, generate_fn))
  got = task.evaluate(None, CharTokenizer())
  sets = {k: v for k, v in got["per_item"].items() if "response" in v}
  assert len(sets) == len(S.HARMFUL_SETS) + 4 + 1  # refusal sets and the held-out seed tasks
  for key, rows in sets.items():
    assert rows["response"] == [f"answer to {p}" for p in rows["prompt"]], key
  total = sum(len(rows["prompt"]) for rows in sets.values())
  assert calls == [total]  # 3 items per set: one call, not one per set


def test_safety_task_needs_data_dir():
  with pytest.raises(SystemExit):
    cli.parse_args(["--task", "safety"])


@pytest.mark.slow  # ~2 min on a loaded 2-core CPU
def test_tiny_safety_run_writes_its_columns(shared_data, tmp_path):
  argv = TINY + [
    "--task", "safety", "--data-dir", str(shared_data), "--presets", "alternate,dualoptim_plus",
    "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "o"),
  ]  # fmt: skip
  assert cli.main(argv) == 0
  md = (tmp_path / "o" / "results.md").read_text()
  header = md.split("\n")[2]
  for column in ("I-Mali", "I-CoNa", "I-Cont", "Q-Harm", "XSTest safe", "XSTest unsafe", "OVR"):
    assert column in header
  doc = json.loads((tmp_path / "o" / "results.json").read_text())
  assert list(doc["rows"]) == ["Initial", "alternate", "dualoptim_plus"]
  for row in doc["rows"].values():
    mean = row["mean"]
    for key in ("safety_i_mali", "xstest_safe_refusal", "safety", "utility", "overall"):
      assert 0.0 <= mean[key] <= 1.0
    assert mean["overall"] == pytest.approx(0.5 * (mean["safety"] + mean["utility"]))
  hist = doc["loss_histories"]["dualoptim_plus"][0]
  assert len(hist["forget"]) == 2 and len(hist["retain"]) == 10
  assert jax.tree.leaves(doc["config"]["timings"])
  lines = [json.loads(x) for x in (tmp_path / "o" / "per_item.jsonl").read_text().splitlines()]
  assert [x["row"] for x in lines] == ["Initial", "alternate", "dualoptim_plus"]
  mali = lines[0]["per_item"]["safety_i_mali"]
  assert len(mali["prompt"]) == len(mali["response"]) == len(mali["refused"]) == 3


@pytest.fixture(scope="module")
def job_flags(tmp_path_factory):
  """Flags of a tiny safety job; the tests share its tokenizer and model cache."""
  if not (SHARED_DATA / "safety").is_dir():
    pytest.skip(f"real data not found at {SHARED_DATA} (../shared/data beside the repo)")
  cache = tmp_path_factory.mktemp("cache")
  return TINY + ["--task", "safety", "--data-dir", str(SHARED_DATA), "--eval-items", "2",
                 "--steps", "1", "--cache-dir", str(cache)]  # fmt: skip


def test_safety_sweep_writes_a_record_per_run_and_a_rerun_skips_them(
  job_flags, tmp_path, capsys, monkeypatch
):
  """--sweep and the run records work for a task as for TOFU (issue 14)."""
  out = tmp_path / "o"
  argv = job_flags + ["--presets", "joint,alternate", "--sweep", "forget_lr_scale=0.5,2"]
  argv += ["--out", str(out)]
  assert cli.main(argv) == 0
  runs = out / "runs"
  records = {p.relative_to(runs).as_posix(): json.loads(p.read_text()) for p in runs.rglob("*")
             if p.is_file()}  # fmt: skip
  assert sorted(records) == [
    f"{p}/forget_lr_scale={v}/seed0.json" for p in ("alternate", "joint") for v in ("0.5", "2")
  ]
  for v in (0.5, 2.0):  # joint's lr scale weights the task's safety loss, alternate's its lr
    joint, alternate = (records[f"{p}/forget_lr_scale={v:g}/seed0.json"]["run"] for p in
                        ("joint", "alternate"))  # fmt: skip
    assert (joint["loss"]["forget_coef"], joint["loss"]["retain_coef"]) == (v, 1.0)
    assert alternate["loss"]["forget_coef"] == 1.0
    assert alternate["optimizer"]["forget_lr_scale"] == v
  doc = json.loads((out / "results.json").read_text())
  assert list(doc["rows"]) == ["Initial"] + [
    f"{p} [forget_lr_scale={v}]" for p in ("joint", "alternate") for v in ("0.5", "2")
  ]
  assert (out / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
  best = doc["best_settings"]  # chosen on the validation halves of the prompt sets
  assert sorted(best) == ["alternate", "joint"]
  assert all(b["value"] in (0.5, 2.0) and len(b["test_half"]) == 1 for b in best.values())
  best_table = (out / "results.md").read_text().split("Best setting per method")[1]
  assert "I-Mali ↑" in best_table and "OVR (ours) ↑" in best_table

  def no_run(*args, **kwargs):
    raise AssertionError("a finished run was run again")

  capsys.readouterr()
  monkeypatch.setattr(cli, "unlearn", no_run)
  assert cli.main(argv) == 0  # a rerun reuses the 4 records
  assert capsys.readouterr().out.count("finished earlier") == 4
  assert json.loads((out / "results.json").read_text())["rows"] == doc["rows"]


def test_safety_budget_authors_counts_the_safety_set(job_flags, tmp_path):
  """--budget authors: joint runs --epochs over objective 0 (the safety set), alternating
  presets AUTHORS_UPDATES updates; --budget equal: --steps forget updates each."""
  epochs, size = 0.002, len(S.load_safety(SHARED_DATA).safety_train)
  argv = job_flags + [
    "--presets",
    "joint,alternate",
    "--budget",
    "authors",
    "--epochs",
    str(epochs),
  ]
  assert cli.main(argv + ["--out", str(tmp_path / "o")]) == 0
  doc = json.loads((tmp_path / "o" / "results.json").read_text())
  joint_updates = math.ceil(epochs * size / 4)  # batch size 4; --steps 1 does not count here
  assert joint_updates > 1
  assert doc["config"]["updates"] == {"joint": joint_updates, "alternate": cli.AUTHORS_UPDATES}
  assert doc["rows"]["joint"]["seeds"][0]["run"]["updates"] == joint_updates
  (alternate,) = doc["rows"]["alternate"]["seeds"]
  assert alternate["run"]["updates"] == cli.AUTHORS_UPDATES
  assert alternate["run"]["forget_updates"] == cli.AUTHORS_UPDATES // 6  # cycles of 1 + 5
