"""Tokenizers: sentencepiece training and loading, and exact byte and word-list tokenizers for synthetic tasks;
`load_tokenizer(path)` also reads Hugging Face tokenizer directories (`lwjax.data.hf_tokenizer`).

All share one interface: `encode(str) -> list[int]` (no bos/eos; the pipeline adds them),
`decode(ids) -> str` (special ids dropped), `vocab_size`, `pad_id`, `bos_id`, `eos_id`, with the same
special ids everywhere: pad 0 (so zero-filled padding is pad), bos 1, eos 2 (a Hugging Face tokenizer keeps
its model's ids).
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence

import sentencepiece as spm
from etils import epath

from lwjax.data import hf_tokenizer

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
MODEL_FILENAME = "tokenizer.model"


def exact_text(tokenizer):
  """`tokenizer`, decoding the very text it encodes: a copy without the clean-up of spaces before punctuation that
  a Hugging Face tokenizer may do (`ans 7 .` -> `ans 7.`), for tasks whose texts are compared word by word; any
  other tokenizer as it is."""
  if getattr(tokenizer, "clean_up_spaces", False):
    tokenizer = copy.copy(tokenizer)
    tokenizer.clean_up_spaces = False
  return tokenizer


def bos_prefix(tokenizer) -> list[int]:
  """`[bos_id]`, or `[]` for a tokenizer without BOS (Qwen's): what a prompt starts with."""
  return [] if tokenizer.bos_id is None else [tokenizer.bos_id]


class ByteTokenizer:
  """UTF-8 bytes shifted by 3: id = byte + 3, so every string round-trips exactly."""
  pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID
  offset = 3
  vocab_size = 256 + offset

  def encode(self, text: str) -> list[int]:
    return [b + self.offset for b in text.encode("utf-8")]

  def decode(self, ids: Iterable[int]) -> str:
    # Ids that are not bytes (specials, or ids past 259 that a larger model vocabulary can emit) are dropped.
    data = bytes(int(i) - self.offset for i in ids if self.offset <= int(i) < self.vocab_size)
    return data.decode("utf-8", errors="replace")


class WordListTokenizer:
  """One id per space-separated word of a fixed word list (ids after the specials, in list order).

  `decode(encode(text)) == text` for text of single-space-separated words (what the synthetic generators
  write); a leading space is dropped. An unknown word raises ValueError naming it and `name`.
  """
  pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID

  def __init__(self, words: Sequence[str], name: str = "vocabulary"):
    if len(set(words)) != len(words):
      raise ValueError(f"{name}: the word list holds duplicates")
    self.name, self.pieces = name, tuple(words)
    first = UNK_ID + 1
    self._ids = {word: first + i for i, word in enumerate(self.pieces)}
    self._words = {i: word for word, i in self._ids.items()}
    self.vocab_size = first + len(self.pieces)

  def encode(self, text: str) -> list[int]:
    return self.encode_with_ends(text)[0]

  def encode_with_ends(self, text: str) -> tuple[list[int], list[int]]:
    """(ids, end): `end[i]` is the character offset just past word i."""
    ids, ends, at = [], [], 0
    for word in text.split(" "):
      if word:
        if word not in self._ids:
          raise ValueError(f"{word!r} is not a word of the {self.name} (at offset {at} of {text[:60]!r}...)")
        ids.append(self._ids[word])
        ends.append(at + len(word))
      at += len(word) + 1
    return ids, ends

  def decode(self, ids: Iterable[int]) -> str:
    """Words of the ids joined by spaces; special and unknown ids are skipped."""
    return " ".join(self._words[i] for i in map(int, ids) if i in self._words)


class SentencePieceTokenizer:
  """A trained sentencepiece model behind the shared tokenizer interface."""

  def __init__(self, model_proto: bytes):
    self.processor = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size = self.processor.vocab_size()
    self.pad_id, self.bos_id, self.eos_id = (self.processor.pad_id(), self.processor.bos_id(),
                                             self.processor.eos_id())

  def encode(self, text: str) -> list[int]:
    return self.processor.encode(text)

  def decode(self, ids: Iterable[int]) -> str:
    return self.processor.decode([int(i) for i in ids])


def train_sentencepiece(text_iterator: Iterator[str], model_prefix: str, vocab_size: int, *,
                        model_type: str = "unigram", input_sentence_size: int = 1_000_000,
                        num_threads: int | None = None) -> str:
  """Trains a sentencepiece model on `text_iterator`; returns the path `<model_prefix>.model`.

  Byte fallback (no unknown strings), digits split one per token (arithmetic stays learnable), and the
  identity normalisation without whitespace cleanup, so that decode(encode(s)) == s. Special ids:
  pad 0, bos 1, eos 2, unk 3. Byte fallback takes 256 ids, so `vocab_size` must exceed 260 plus the
  number of distinct characters. At most `input_sentence_size` texts are sampled for training. A corpus
  with fewer distinct pieces than `vocab_size` gives a smaller vocabulary (no hard limit) instead of failing.
  """
  if model_type not in ("unigram", "bpe"):
    raise ValueError(f"model_type must be 'unigram' or 'bpe', got {model_type!r}")
  spm.SentencePieceTrainer.train(
      sentence_iterator=text_iterator, model_prefix=model_prefix, vocab_size=vocab_size,
      model_type=model_type, pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID,
      byte_fallback=True, split_digits=True, character_coverage=1.0,
      normalization_rule_name="identity", remove_extra_whitespaces=False,
      input_sentence_size=input_sentence_size, shuffle_input_sentence=True, hard_vocab_limit=False,
      num_threads=num_threads or os.cpu_count(), minloglevel=2)
  return f"{model_prefix}.model"


def load(path: str) -> SentencePieceTokenizer:
  """Loads a sentencepiece model from any path `etils.epath` reads (local or cloud)."""
  return SentencePieceTokenizer(epath.Path(path).read_bytes())


def load_tokenizer(path: str) -> SentencePieceTokenizer | hf_tokenizer.HFTokenizer:
  """The tokenizer at `path`: a sentencepiece model file, or a directory holding a Hugging Face `tokenizer.json`
  (an `HFTokenizer`) or only a sentencepiece `tokenizer.model`. Anything else raises ValueError naming `path`."""
  root = epath.Path(path)
  if not root.is_dir():
    if not root.exists():
      raise ValueError(f"{path}: does not exist; provide a sentencepiece model file or a Hugging Face tokenizer "
                       f"directory ({hf_tokenizer.TOKENIZER_FILE}, {hf_tokenizer.CONFIG_FILE})")
    return load(path)
  if (root / hf_tokenizer.TOKENIZER_FILE).exists():
    return hf_tokenizer.load(path)
  if (root / MODEL_FILENAME).exists():
    return load(str(root / MODEL_FILENAME))
  raise ValueError(f"{path}: holds neither {hf_tokenizer.TOKENIZER_FILE} (Hugging Face) nor {MODEL_FILENAME} "
                   "(sentencepiece); provide one of them")


def get_or_train(workdir: str, spec_path: str | None, text_iterator_fn: Callable[[], Iterator[str]],
                 vocab_size: int, **train_kwargs) -> SentencePieceTokenizer:
  """The tokenizer of a run: `spec_path` if given, else `<workdir>/tokenizer.model`, trained there if absent.

  A resumed run finds the model of its first start and so reuses the same tokenizer. The model is
  trained in a local temporary directory and then written to `workdir` in one write.
  In a multi-process run, call it on process 0 and wait at a barrier before the others load it.
  """
  if spec_path:
    return load(spec_path)
  path = epath.Path(workdir) / MODEL_FILENAME
  if not path.exists():
    with tempfile.TemporaryDirectory() as tmp:
      model = train_sentencepiece(text_iterator_fn(), os.path.join(tmp, "tokenizer"), vocab_size, **train_kwargs)
      path.parent.mkdir(parents=True, exist_ok=True)
      tmp_path = path.parent / f"{MODEL_FILENAME}.tmp-{os.getpid()}"
      tmp_path.write_bytes(epath.Path(model).read_bytes())
      tmp_path.rename(path)
  return load(str(path))
