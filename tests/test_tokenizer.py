"""Tests for dualoptim_jax.models.tokenizer."""

import pytest
import tokenizers

from dualoptim_jax.models import tokenizer as tokmod
from dualoptim_jax.models.tokenizer import Tokenizer

CORPUS = [
  f"Author number {i} was born in the city of Town{i % 37} in {1900 + i}." for i in range(300)
] + ["The quick brown fox jumps over the lazy dog. Ünïcödé, 日本語, emoji 🙂."] * 20

SAMPLES = [
  "Author number 7 was born in the city of Town7 in 1907.",
  " leading and trailing spaces  ",
  "Ünïcödé 日本語 🙂 — never seen: ∮ E⋅da = Q, Ω ≈ ∞; 한국어; עברית",
  "tabs\tnewlines\n\r\nand \x00 control bytes",
  "",
]


@pytest.fixture(scope="module")
def tok():
  return Tokenizer.train(CORPUS, vocab_size=400)


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tok, text):
  ids = tok.encode(text)
  assert all(0 <= i < tok.vocab_size for i in ids)
  assert tok.decode(ids) == text
  assert tok.decode(tok.encode(text, add_bos=True, add_eos=True)) == text


def test_special_ids(tok):
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  assert tok.id_to_token(tok.bos_id) == "<|bos|>"
  ids = tok.encode("hello", add_bos=True, add_eos=True)
  assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
  assert tok.bos_id not in tok.encode("hello") and tok.eos_id not in tok.encode("hello")
  # The literal text of a special token is kept by decode only on request.
  assert tok.decode([tok.bos_id, *tok.encode("hi")], skip_special_tokens=False) == "<|bos|>hi"
  assert tok.encode_batch(["hello", "hi"], add_bos=True) == [
    tok.encode(t, add_bos=True) for t in ("hello", "hi")
  ]


def test_training_learns_merges(tok):
  assert tok.vocab_size == 400
  text = "Author number 12 was born in the city"
  assert len(tok.encode(text)) < len(text.encode()) / 2


def test_training_is_deterministic(tok):
  again = Tokenizer.train(CORPUS, vocab_size=400)
  assert again.hf_tokenizer.get_vocab() == tok.hf_tokenizer.get_vocab()


def test_cache_reuse(tmp_path, monkeypatch):
  first = Tokenizer.train(CORPUS, vocab_size=300, cache_path=tmp_path)
  files = list(tmp_path.glob("*.json"))
  assert len(files) == 1 and "300" in files[0].name

  class NoTraining:
    def BpeTrainer(*args, **kwargs):
      raise AssertionError("trained again instead of reusing the cache")

  monkeypatch.setattr(tokmod, "trainers", NoTraining)
  cached = Tokenizer.train(CORPUS, vocab_size=300, cache_path=tmp_path)
  assert cached.encode(SAMPLES[2]) == first.encode(SAMPLES[2])
  with pytest.raises(AssertionError, match="trained again"):
    Tokenizer.train(CORPUS[:-1], vocab_size=300, cache_path=tmp_path)  # other texts, other key
  with pytest.raises(AssertionError, match="trained again"):
    Tokenizer.train(CORPUS, vocab_size=301, cache_path=tmp_path)


def test_save_and_from_file(tok, tmp_path):
  path = tmp_path / "sub" / "tok.json"
  tok.save(path)
  loaded = Tokenizer.from_file(path)
  assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
  assert all(loaded.encode(s) == tok.encode(s) for s in SAMPLES)
  with pytest.raises(ValueError, match="special token '<s>'"):
    Tokenizer.from_file(path, bos_token="<s>")


def test_from_hf_tokenizer(tok):
  hf = tokenizers.Tokenizer.from_str(tok.hf_tokenizer.to_str())
  wrapped = Tokenizer.from_hf_tokenizer(hf, bos_id=2, eos_id=1, pad_id=1)
  assert (wrapped.bos_id, wrapped.eos_id, wrapped.pad_id) == (2, 1, 1)
  assert wrapped.encode("x", add_bos=True)[0] == 2
  with pytest.raises(ValueError, match="eos_id=400 is outside the vocabulary"):
    Tokenizer.from_hf_tokenizer(hf, bos_id=1, eos_id=400, pad_id=0)


def test_validation():
  with pytest.raises(ValueError, match="vocab_size must be an int >= 259, got 100"):
    Tokenizer.train(CORPUS, vocab_size=100)
  with pytest.raises(ValueError, match="texts must not be empty"):
    Tokenizer.train([], vocab_size=300)
