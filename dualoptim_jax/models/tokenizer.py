"""Byte-level BPE tokenizer (Hugging Face ``tokenizers``) with cached training.

Byte-level BPE maps every UTF-8 byte to one of 256 base symbols before merging, so any string
encodes without unknown tokens and ``decode(encode(s)) == s`` exactly. Trained tokenizers reserve
ids 0, 1, 2 for ``<|pad|>``, ``<|bos|>``, ``<|eos|>``. :meth:`Tokenizer.from_hf_tokenizer` wraps any
other ``tokenizers.Tokenizer`` (e.g. one built from GGUF metadata) with its own special ids.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

__all__ = ["Tokenizer", "PAD_TOKEN", "BOS_TOKEN", "EOS_TOKEN"]

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<|pad|>", "<|bos|>", "<|eos|>"
_SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)
# Bump when the training recipe changes so stale cache files are not reused.
_RECIPE_VERSION = "bytelevel-bpe-v1"


def _cache_key(texts: Sequence[str], vocab_size: int) -> str:
  digest = hashlib.sha256()
  digest.update(f"{_RECIPE_VERSION}|{vocab_size}|{'|'.join(_SPECIAL_TOKENS)}|".encode())
  for text in texts:
    data = text.encode("utf-8")
    digest.update(len(data).to_bytes(8, "little"))  # length prefix: no ambiguity between splits
    digest.update(data)
  return digest.hexdigest()[:20]


class Tokenizer:
  """Text <-> token ids, with ``bos_id``, ``eos_id``, ``pad_id`` and ``vocab_size``.

  Example::

    tok = Tokenizer.train(["some text", "more text"], vocab_size=512, cache_path="~/.cache/dj")
    ids = tok.encode("some text", add_bos=True)
    assert tok.decode(ids) == "some text"
  """

  def __init__(
    self,
    hf_tokenizer: tokenizers.Tokenizer,
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    chat_template: str | None = None,
  ):
    size = hf_tokenizer.get_vocab_size(with_added_tokens=True)
    for name, value in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id)):
      if not 0 <= int(value) < size:
        raise ValueError(f"{name}={value} is outside the vocabulary [0, {size})")
    self._tok = hf_tokenizer
    self.bos_id, self.eos_id, self.pad_id = int(bos_id), int(eos_id), int(pad_id)
    # The Jinja chat template shipped with a pretrained model (e.g. GGUF metadata), kept verbatim.
    self.chat_template = chat_template

  @property
  def hf_tokenizer(self) -> tokenizers.Tokenizer:
    """The wrapped ``tokenizers.Tokenizer``."""
    return self._tok

  @property
  def vocab_size(self) -> int:
    """Number of ids, special tokens included."""
    return self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    """Token ids of ``text``, optionally framed by BOS / EOS."""
    ids = self._tok.encode(text, add_special_tokens=False).ids
    return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

  def encode_batch(
    self, texts: Sequence[str], *, add_bos: bool = False, add_eos: bool = False
  ) -> list[list[int]]:
    """:meth:`encode` over many texts (parallel in the Rust library)."""
    encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
    head, tail = ([self.bos_id] if add_bos else []), ([self.eos_id] if add_eos else [])
    return [head + e.ids + tail for e in encs]

  def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
    """Text of ``ids``; special tokens (pad/bos/eos) are dropped unless asked otherwise."""
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def token_to_id(self, token: str) -> int | None:
    return self._tok.token_to_id(token)

  def id_to_token(self, idx: int) -> str | None:
    return self._tok.id_to_token(int(idx))

  # Construction -------------------------------------------------------------------------------

  @classmethod
  def from_hf_tokenizer(
    cls,
    hf_tokenizer: tokenizers.Tokenizer,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    chat_template: str | None = None,
  ) -> Tokenizer:
    """Wraps an existing ``tokenizers.Tokenizer`` (e.g. built from a GGUF file)."""
    return cls(
      hf_tokenizer, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, chat_template=chat_template
    )

  @classmethod
  def from_file(
    cls,
    path: str | os.PathLike,
    *,
    bos_token: str = BOS_TOKEN,
    eos_token: str = EOS_TOKEN,
    pad_token: str = PAD_TOKEN,
  ) -> Tokenizer:
    """Loads a ``tokenizer.json``; special ids are looked up by their token strings."""
    tok = tokenizers.Tokenizer.from_file(str(path))
    ids = {}
    for name, token in (("bos", bos_token), ("eos", eos_token), ("pad", pad_token)):
      idx = tok.token_to_id(token)
      if idx is None:
        raise ValueError(f"{path}: special token {token!r} ({name}) is not in the vocabulary")
      ids[name] = idx
    return cls(tok, bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["pad"])

  def save(self, path: str | os.PathLike) -> None:
    """Writes the ``tokenizer.json`` (atomically, so concurrent readers never see half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
      self._tok.save(tmp)
      os.replace(tmp, path)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)

  @classmethod
  def train(
    cls, texts: Sequence[str], vocab_size: int = 4096, cache_path: str | os.PathLike | None = None
  ) -> Tokenizer:
    """Trains a byte-level BPE on ``texts`` (deterministic for the same inputs).

    Args:
      texts: training corpus.
      vocab_size: target vocabulary size including the 256 byte symbols and 3 special tokens
        (the result can be smaller when the corpus runs out of merges).
      cache_path: a directory; the trained tokenizer is stored there as
        ``bpe-<vocab_size>-<hash>.json`` keyed by a SHA-256 of the texts and the vocabulary size,
        and reused by later calls with the same inputs. ``None`` disables caching.
    """
    min_size = 256 + len(_SPECIAL_TOKENS)
    if not isinstance(vocab_size, int) or vocab_size < min_size:
      raise ValueError(f"vocab_size must be an int >= {min_size}, got {vocab_size!r}")
    texts = list(texts)
    if not texts:
      raise ValueError("texts must not be empty")
    cache_file = None
    if cache_path is not None:
      cache_file = (
        Path(cache_path).expanduser() / f"bpe-{vocab_size}-{_cache_key(texts, vocab_size)}.json"
      )
      if cache_file.exists():
        return cls.from_file(cache_file)

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
      vocab_size=vocab_size,
      special_tokens=list(_SPECIAL_TOKENS),
      min_frequency=2,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    ids = {t: tok.token_to_id(t) for t in (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)}
    if any(i is None for i in ids.values()):
      raise ValueError(f"the trained tokenizer lacks a special token: {ids}")
    result = cls(
      tok,
      bos_id=int(ids[BOS_TOKEN] or 0),
      eos_id=int(ids[EOS_TOKEN] or 0),
      pad_id=int(ids[PAD_TOKEN] or 0),
    )
    if cache_file is not None:
      result.save(cache_file)
    return result

  def __repr__(self) -> str:
    return (
      f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id}, "
      f"pad_id={self.pad_id})"
    )
